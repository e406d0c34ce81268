"""The reference order book: pure Python on sortedcontainers, written to be read, not to be fast.

It defines the semantics that the Cython book (cext/book.pyx) must reproduce event for event; the
differential tests in tests/test_matching_differential.py hold them to it. Everything here is
integers; the book does matching only (tick, lot, band, session and halt rules live in
matching/engine.py) and never reads a clock: every command carries its timestamp ``ts``.

Interface (identical on both books; see matching/README.md for the full contract):

- ``submit(order_id, account, side, price, qty, tif=GTC, ts=0, kind=LIMIT, post_only=False,
  expire_ts=0, stp=STP_NONE, cash_cap=0) -> int``
- ``cancel(order_id, ts=0)``, ``amend(order_id, new_price, new_qty, ts=0)``,
  ``reduce(order_id, reduce_by, ts=0)``, ``move(order_id, new_price, ts=0)``, ``expire(ts)``
  — each returns how many events it appended.
- ``events()`` returns and clears the pending event tuples (layouts in matching/events.py);
  ``clear_events()`` drops them.
- Queries: ``order(id)``, ``orders()`` (resting orders in priority order), ``best_bid()``,
  ``best_ask()``, ``depth(side, n)``, ``len(book)``, ``state_digest()``, ``snapshot()``,
  ``restore(orders)``.

Order tuple (from ``order``/``orders``/``snapshot``):
``(order_id, account, side, price, qty, tif, expire_ts, post_only, stp, seq)`` where ``seq`` is
the book's arrival counter: time priority within a level is ascending ``seq``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Sequence

import orjson
from sortedcontainers import SortedDict, SortedList

from matching.events import (
    ASK,
    BID,
    CANCEL_CASH_CAP,
    CANCEL_SELF_TRADE,
    CANCEL_UNFILLED,
    CANCEL_USER,
    EV_ACCEPTED,
    EV_AMENDED,
    EV_CANCELLED,
    EV_EXPIRED,
    EV_LEVEL,
    EV_REJECTED,
    EV_TRADE,
    FOK,
    GTC,
    GTD,
    LIMIT,
    MARKET,
    OP_AMEND,
    OP_CANCEL,
    OP_EXPIRE,
    OP_MOVE,
    OP_REDUCE,
    OP_SUBMIT,
    REJECT_DUPLICATE_ORDER_ID,
    REJECT_FOK_NOT_FILLABLE,
    REJECT_INVALID_EXPIRY,
    REJECT_INVALID_ORDER,
    REJECT_INVALID_PRICE,
    REJECT_INVALID_QUANTITY,
    REJECT_NOT_FOUND,
    REJECT_POST_ONLY_WOULD_TAKE,
    STP_CANCEL_BOTH,
    STP_CANCEL_INCOMING,
    STP_CANCEL_RESTING,
    STP_NONE,
)
from matching.units import KG_PER_TONNE

# The Cython book maps prices straight onto an array, so both books bound the price the same way.
DEFAULT_MAX_PRICE = (1 << 22) - 1
LIMIT_MAX_PRICE = 1 << 26  # the largest max_price either book accepts (Cython ladder memory)
# Bounds that keep every product in the Cython book inside int64; both books enforce them.
MAX_QTY = 1 << 40
MAX_CASH = 1 << 50

# run_batch layout (shared with cext.book): BATCH_STRIDE int64 per command,
# (op, order_id, account, flags, price, qty, ts, extra) with
# flags = side | tif << 2 | kind << 4 | post_only << 6 | stp << 8 and extra = expire_ts (GTD limit)
# or cash_cap (market buy). MOVE uses price, REDUCE uses qty as reduce_by, AMEND uses both.
BATCH_STRIDE = 8

OrderTuple = tuple[int, int, int, int, int, int, int, int, int, int]


class _Order:
    __slots__ = (
        "account", "expire_ts", "id", "post_only", "price", "qty", "seq", "side", "stp", "tif",
    )

    def __init__(
        self, oid: int, account: int, side: int, price: int, qty: int, tif: int,
        expire_ts: int, post_only: bool, stp: int, seq: int,
    ) -> None:
        self.id = oid
        self.account = account
        self.side = side
        self.price = price
        self.qty = qty
        self.tif = tif
        self.expire_ts = expire_ts
        self.post_only = post_only
        self.stp = stp
        self.seq = seq

    def as_tuple(self) -> OrderTuple:
        return (self.id, self.account, self.side, self.price, self.qty, self.tif,
                self.expire_ts, int(self.post_only), self.stp, self.seq)


def max_qty_for_cash(price: int, cash: int, lot: int) -> int:
    """Largest lot multiple q with trade_value_fen(price, q) <= cash (price > 0, cash >= 0).

    trade_value_fen rounds half-up: (2pq + 1000) // 2000 <= c  ⟺  2pq <= 2000c + 999.
    """
    q = (2 * KG_PER_TONNE * cash + KG_PER_TONNE - 1) // (2 * price)
    return q - q % lot


def _trade_value(price: int, qty: int) -> int:
    return (price * qty * 2 + KG_PER_TONNE) // (2 * KG_PER_TONNE)


def validate_snapshot(snapshot: dict, max_price: int) -> None:
    """Raise ValueError unless `snapshot` could have come from a book: both books check this
    before restoring, so a corrupt snapshot can neither crash the C book nor build a bad book."""
    orders = snapshot.get("orders")
    seq = snapshot.get("seq")
    if not isinstance(orders, list | tuple) or not isinstance(seq, int):
        raise ValueError("a snapshot is {'seq': int, 'orders': [order tuples]}")
    ids, seqs = set(), set()
    best = [None, None]
    for t in orders:
        if len(t) != 10 or not all(isinstance(x, int) for x in t):
            raise ValueError(f"bad order tuple {t!r}")
        oid, _account, side, price, qty, tif, _expire, post_only, stp, oseq = t
        if side not in (BID, ASK) or not 0 < price <= max_price or not 0 < qty <= MAX_QTY:
            raise ValueError(f"order {oid}: side, price or quantity out of range")
        if tif not in (GTC, GTD) or post_only not in (0, 1) or not STP_NONE <= stp <= STP_CANCEL_BOTH:
            raise ValueError(f"order {oid}: a resting order must be GTC/GTD with valid flags")
        if oid in ids or oseq in seqs or not 0 <= oseq < seq:
            raise ValueError(f"order {oid}: duplicate id or bad seq")
        ids.add(oid)
        seqs.add(oseq)
        b = best[side]
        best[side] = price if b is None else (max(b, price) if side == BID else min(b, price))
    if best[BID] is not None and best[ASK] is not None and best[BID] >= best[ASK]:
        raise ValueError("snapshot book is crossed")


class ReferenceBook:
    """One instrument's order book; see the module docstring for the interface."""

    def __init__(
        self,
        *,
        max_price: int = DEFAULT_MAX_PRICE,
        lot: int = 1,
        reduce_loses_priority: bool = False,
    ) -> None:
        if not 1 <= max_price <= LIMIT_MAX_PRICE or lot < 1:
            raise ValueError(f"need 1 <= max_price <= {LIMIT_MAX_PRICE} and lot >= 1")
        self.max_price = max_price
        self.lot = lot
        self.reduce_loses_priority = reduce_loses_priority
        # price -> {order_id: _Order}; dicts keep insertion order, which is the FIFO queue.
        self._levels: tuple[SortedDict, SortedDict] = (SortedDict(), SortedDict())
        self._totals: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self._orders: dict[int, _Order] = {}
        self._gtd: SortedList = SortedList()  # (expire_ts, order_id), the expiry order
        self._events: list[tuple[int, ...]] = []
        self._seq = 0

    # ---- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._orders)

    def best_bid(self) -> int | None:
        levels = self._levels[BID]
        return levels.peekitem(-1)[0] if levels else None

    def best_ask(self) -> int | None:
        levels = self._levels[ASK]
        return levels.peekitem(0)[0] if levels else None

    def depth(self, side: int, n: int = 10) -> list[tuple[int, int]]:
        """Top `n` levels of one side, best first, as (price, total quantity)."""
        if side not in (BID, ASK):
            raise ValueError("side must be 0 (bid) or 1 (ask)")
        prices = self._levels[side].keys()
        ordered = reversed(prices) if side == BID else iter(prices)
        out = []
        for price in ordered:
            if len(out) == n:
                break
            out.append((price, self._totals[side][price]))
        return out

    def order(self, order_id: int) -> OrderTuple | None:
        o = self._orders.get(order_id)
        return o.as_tuple() if o is not None else None

    def order_qty(self, order_id: int) -> int:
        """Open quantity of a resting order, 0 if it is not in the book."""
        o = self._orders.get(order_id)
        return o.qty if o is not None else 0

    def orders(self) -> list[OrderTuple]:
        """Every resting order in priority order: bids best price first, then asks; FIFO within."""
        out = []
        for side in (BID, ASK):
            prices = self._levels[side].keys()
            for price in reversed(prices) if side == BID else prices:
                out.extend(o.as_tuple() for o in self._levels[side][price].values())
        return out

    def snapshot(self) -> dict[str, object]:
        """Everything needed to rebuild the book: the arrival counter and the resting orders."""
        return {"seq": self._seq, "orders": self.orders()}

    def restore(self, snapshot: dict[str, object]) -> None:
        """Rebuild from :meth:`snapshot` output (replaces current contents, emits no events)."""
        validate_snapshot(snapshot, self.max_price)
        self.__init__(  # type: ignore[misc]
            max_price=self.max_price, lot=self.lot, reduce_loses_priority=self.reduce_loses_priority
        )
        orders = snapshot["orders"]
        for oid, account, side, price, qty, tif, expire_ts, post_only, stp, seq in sorted(
            orders, key=lambda t: t[9]  # type: ignore[arg-type]
        ):
            o = _Order(oid, account, side, price, qty, tif, expire_ts, bool(post_only), stp, seq)
            self._rest(o)
        self._seq = snapshot["seq"]  # type: ignore[assignment]

    def state_digest(self) -> str:
        """SHA-256 of the resting orders in priority order plus the arrival counter."""
        return hashlib.sha256(orjson.dumps([self._seq, self.orders()])).hexdigest()

    def events(self) -> list[tuple[int, ...]]:
        out = self._events
        self._events = []
        return out

    def clear_events(self) -> None:
        self._events = []

    # ---- commands ------------------------------------------------------------------------

    def submit(
        self, order_id: int, account: int, side: int, price: int, qty: int, tif: int = GTC,
        ts: int = 0, kind: int = LIMIT, post_only: bool = False, expire_ts: int = 0,
        stp: int = STP_NONE, cash_cap: int = 0,
    ) -> int:
        """A new order. For a market order `price` is ignored; a market buy with cash_cap > 0
        spends at most cash_cap (fen, trade values summed per trade, half-up)."""
        start = len(self._events)
        self._expire(ts)
        ev = self._events
        market = kind == MARKET
        if market:
            price = 0
        if not (side in (BID, ASK) and 0 <= tif <= GTD and kind in (LIMIT, MARKET)
                and STP_NONE <= stp <= STP_CANCEL_BOTH):
            ev.append((EV_REJECTED, order_id, REJECT_INVALID_ORDER))
        elif not 0 < qty <= MAX_QTY:
            ev.append((EV_REJECTED, order_id, REJECT_INVALID_QUANTITY))
        elif not market and not 0 < price <= self.max_price:
            ev.append((EV_REJECTED, order_id, REJECT_INVALID_PRICE))
        elif order_id in self._orders:
            ev.append((EV_REJECTED, order_id, REJECT_DUPLICATE_ORDER_ID))
        elif not market and tif == GTD and expire_ts <= ts:
            ev.append((EV_REJECTED, order_id, REJECT_INVALID_EXPIRY))
        elif not market and post_only and self._crosses(side, price):
            ev.append((EV_REJECTED, order_id, REJECT_POST_ONLY_WOULD_TAKE))
        elif not market and tif == FOK and self._fillable(side, price, qty, account, stp) < qty:
            ev.append((EV_REJECTED, order_id, REJECT_FOK_NOT_FILLABLE))
        else:
            ev.append((EV_ACCEPTED, order_id, account, side, price, qty))
            o = _Order(order_id, account, side, price, qty, tif, expire_ts if tif == GTD else 0,
                       post_only, stp, 0)
            cap = min(cash_cap, MAX_CASH) if market and side == BID and cash_cap > 0 else -1
            reason = self._match(o, market, cap)
            if o.qty > 0:
                if reason < 0 and not market and tif in (GTC, GTD):
                    self._enqueue(o)
                else:
                    why = CANCEL_UNFILLED if reason < 0 else reason
                    ev.append((EV_CANCELLED, o.id, o.qty, why))
        return len(self._events) - start

    def cancel(self, order_id: int, ts: int = 0) -> int:
        start = len(self._events)
        self._expire(ts)
        o = self._orders.get(order_id)
        if o is None:
            self._events.append((EV_REJECTED, order_id, REJECT_NOT_FOUND))
        else:
            self._cancel_resting(o)
        return len(self._events) - start

    def reduce(self, order_id: int, reduce_by: int, ts: int = 0) -> int:
        """Decrease open quantity by `reduce_by`; reducing to zero or below cancels the order."""
        start = len(self._events)
        self._expire(ts)
        o = self._orders.get(order_id)
        if o is None:
            self._events.append((EV_REJECTED, order_id, REJECT_NOT_FOUND))
        elif reduce_by <= 0:
            self._events.append((EV_REJECTED, order_id, REJECT_INVALID_QUANTITY))
        elif reduce_by >= o.qty:
            self._cancel_resting(o)
        else:
            self._amend(o, o.price, o.qty - reduce_by)
        return len(self._events) - start

    def move(self, order_id: int, new_price: int, ts: int = 0) -> int:
        """Cancel-replace at a new price, same open quantity (loses priority if the price moves)."""
        start = len(self._events)
        self._expire(ts)
        o = self._orders.get(order_id)
        if o is None:
            self._events.append((EV_REJECTED, order_id, REJECT_NOT_FOUND))
        else:
            self._checked_amend(o, new_price, o.qty)
        return len(self._events) - start

    def amend(self, order_id: int, new_price: int, new_qty: int, ts: int = 0) -> int:
        """Set a resting order's price and open quantity.

        Same price and a lower (or equal) quantity keeps time priority (unless the book was built
        with reduce_loses_priority); a price change or a quantity increase re-queues the order at
        the back, and a new price may trade as a taker at once.
        """
        start = len(self._events)
        self._expire(ts)
        o = self._orders.get(order_id)
        if o is None:
            self._events.append((EV_REJECTED, order_id, REJECT_NOT_FOUND))
        else:
            self._checked_amend(o, new_price, new_qty)
        return len(self._events) - start

    def expire(self, ts: int) -> int:
        """Expire every GTD order with expire_ts <= ts, in (expire_ts, order_id) order."""
        start = len(self._events)
        self._expire(ts)
        return len(self._events) - start

    def run_batch(self, cmds: Sequence[int]) -> int:
        """Execute commands laid out as in cext.book.CythonBook.run_batch (BATCH_STRIDE ints each)."""
        start = len(self._events)
        if len(cmds) % BATCH_STRIDE:
            raise ValueError("batch length is not a multiple of BATCH_STRIDE")
        for k in range(0, len(cmds), BATCH_STRIDE):
            op, oid, account, flags, price, qty, ts, extra = cmds[k : k + BATCH_STRIDE]
            if op == OP_SUBMIT:
                self.submit(oid, account, flags & 3, price, qty, (flags >> 2) & 3, ts,
                            (flags >> 4) & 3, bool((flags >> 6) & 1), extra, (flags >> 8) & 3, extra)
            elif op == OP_MOVE:
                self.move(oid, price, ts)
            elif op == OP_CANCEL:
                self.cancel(oid, ts)
            elif op == OP_REDUCE:
                self.reduce(oid, qty, ts)
            elif op == OP_AMEND:
                self.amend(oid, price, qty, ts)
            elif op == OP_EXPIRE:
                self.expire(ts)
            else:
                raise ValueError(f"unknown op {op} in command {k // BATCH_STRIDE}")
        return len(self._events) - start

    def take_trades(self) -> array:
        """Return and clear pending events, keeping only trades as a flat array('q') of
        (taker_id, maker_id, price, qty) quadruples (the replay tool's fill output)."""
        out = array("q")
        for e in self._events:
            if e[0] == EV_TRADE:
                out.extend((e[1], e[2], e[6], e[7]))
        self._events = []
        return out

    @property
    def pending_events(self) -> int:
        return len(self._events)

    # ---- internals -----------------------------------------------------------------------

    def _checked_amend(self, o: _Order, new_price: int, new_qty: int) -> None:
        if not 0 < new_qty <= MAX_QTY:
            self._events.append((EV_REJECTED, o.id, REJECT_INVALID_QUANTITY))
        elif not 0 < new_price <= self.max_price:
            self._events.append((EV_REJECTED, o.id, REJECT_INVALID_PRICE))
        elif o.post_only and new_price != o.price and self._crosses(o.side, new_price):
            self._events.append((EV_REJECTED, o.id, REJECT_POST_ONLY_WOULD_TAKE))
        else:
            self._amend(o, new_price, new_qty)

    def _amend(self, o: _Order, new_price: int, new_qty: int) -> None:
        ev = self._events
        keeps = new_price == o.price and (
            new_qty == o.qty or (new_qty < o.qty and not self.reduce_loses_priority)
        )
        if keeps:
            self._totals[o.side][o.price] += new_qty - o.qty
            o.qty = new_qty
            ev.append((EV_AMENDED, o.id, new_price, new_qty))
            self._level_event(o.side, o.price)
            return
        self._remove(o)
        ev.append((EV_AMENDED, o.id, new_price, new_qty))
        if new_price != o.price:
            self._level_event(o.side, o.price)
        o.price = new_price
        o.qty = new_qty
        reason = self._match(o, False, -1)
        if o.qty > 0:
            if reason < 0:
                self._enqueue(o)
            else:
                ev.append((EV_CANCELLED, o.id, o.qty, reason))

    def _crosses(self, side: int, price: int) -> bool:
        if side == BID:
            best = self.best_ask()
            return best is not None and best <= price
        best = self.best_bid()
        return best is not None and best >= price

    def _opposite_prices(self, side: int, limit: int) -> Iterator[int]:
        """Opposite-side prices an order at `limit` may trade with, best first (limit 0 = market).

        A lazy iterator: only valid while the opposite side is not modified.
        """
        if side == BID:
            return self._levels[ASK].irange(maximum=limit if limit else None)
        return self._levels[BID].irange(minimum=limit if limit else None, reverse=True)

    def _fillable(self, side: int, price: int, qty: int, account: int, stp: int) -> int:
        """How much a FOK order could fill, honouring self-trade prevention (capped at qty)."""
        opp = 1 - side
        got = 0
        for p in self._opposite_prices(side, price):
            if stp == STP_NONE:
                got += self._totals[opp][p]
            else:
                for m in self._levels[opp][p].values():
                    if m.account == account:
                        if stp == STP_CANCEL_RESTING:
                            continue
                        return got
                    got += m.qty
                    if got >= qty:
                        return got
            if got >= qty:
                return got
        return got

    def _match(self, o: _Order, market: bool, cash: int) -> int:
        """Trade `o` against the opposite side, best price first, FIFO within a price.

        Returns -1 if it stopped for lack of liquidity or price (or is filled), else the cancel
        reason for its remainder (self-trade prevention or cash cap). cash < 0 means no cap.
        """
        ev = self._events
        opp = 1 - o.side
        levels = self._levels[opp]
        totals = self._totals[opp]
        while o.qty > 0 and levels:
            price = levels.peekitem(0 if opp == ASK else -1)[0]
            if not market and (price > o.price if opp == ASK else price < o.price):
                break
            queue = levels[price]
            stop = -1
            changed = False
            while queue and o.qty > 0:
                maker = next(iter(queue.values()))
                if o.stp != STP_NONE and maker.account == o.account:
                    if o.stp == STP_CANCEL_INCOMING:
                        stop = CANCEL_SELF_TRADE
                        break
                    # Cancel-resting and cancel-both remove the maker first.
                    del queue[maker.id]
                    del self._orders[maker.id]
                    self._forget_gtd(maker)
                    totals[price] -= maker.qty
                    changed = True
                    ev.append((EV_CANCELLED, maker.id, maker.qty, CANCEL_SELF_TRADE))
                    if o.stp == STP_CANCEL_BOTH:
                        stop = CANCEL_SELF_TRADE
                        break
                    continue
                q = min(o.qty, maker.qty)
                if cash >= 0:
                    q = min(q, max_qty_for_cash(price, cash, self.lot))
                    if q == 0:
                        stop = CANCEL_CASH_CAP
                        break
                    cash -= _trade_value(price, q)
                ev.append((EV_TRADE, o.id, maker.id, o.account, maker.account, o.side, price, q))
                changed = True
                o.qty -= q
                maker.qty -= q
                totals[price] -= q
                if maker.qty == 0:
                    del queue[maker.id]
                    del self._orders[maker.id]
                    self._forget_gtd(maker)
            if changed:
                ev.append((EV_LEVEL, opp, price, totals[price]))
            if not queue:
                del levels[price]
                del totals[price]
            if stop >= 0:
                return stop
        return -1

    def _rest(self, o: _Order) -> None:
        """Put `o` at the back of its level (no events); o.seq must already be set."""
        levels = self._levels[o.side]
        if o.price not in levels:
            levels[o.price] = {}
            self._totals[o.side][o.price] = 0
        levels[o.price][o.id] = o
        self._totals[o.side][o.price] += o.qty
        self._orders[o.id] = o
        if o.tif == GTD:
            self._gtd.add((o.expire_ts, o.id))

    def _enqueue(self, o: _Order) -> None:
        o.seq = self._seq
        self._seq += 1
        self._rest(o)
        self._level_event(o.side, o.price)

    def _cancel_resting(self, o: _Order) -> None:
        """Cancel a resting order at its owner's request: the event, then its level."""
        self._remove(o)
        self._events.append((EV_CANCELLED, o.id, o.qty, CANCEL_USER))
        self._level_event(o.side, o.price)

    def _remove(self, o: _Order) -> None:
        levels = self._levels[o.side]
        queue = levels[o.price]
        del queue[o.id]
        self._totals[o.side][o.price] -= o.qty
        if not queue:
            del levels[o.price]
            del self._totals[o.side][o.price]
        del self._orders[o.id]
        self._forget_gtd(o)

    def _forget_gtd(self, o: _Order) -> None:
        if o.tif == GTD:
            self._gtd.remove((o.expire_ts, o.id))

    def _level_event(self, side: int, price: int) -> None:
        self._events.append((EV_LEVEL, side, price, self._totals[side].get(price, 0)))

    def _expire(self, ts: int) -> None:
        gtd = self._gtd
        while gtd and gtd[0][0] <= ts:
            o = self._orders[gtd[0][1]]
            self._remove(o)
            self._events.append((EV_EXPIRED, o.id, o.qty))
            self._level_event(o.side, o.price)
