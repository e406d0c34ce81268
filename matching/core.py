"""The sequenced exchange core: every book, every reservation, one command at a time, no I/O.

``ExchangeCore.apply(command, ts)`` is the only way state changes. A command is a plain dict
(``{"op": "place", ...}``, layouts in :data:`COMMANDS`) and ``ts`` is UTC microseconds given by
the caller. An accepted command gets the next global sequence number and returns the events it
caused; a rejected command returns a code and changes nothing at all, so it needs no journal
entry and replays to nothing. Applying the same accepted commands with the same ``ts`` to a fresh
core (or to a restored snapshot) gives the same events and the same :meth:`state_digest`: that is
the whole basis of the journal and of recovery (exchange/journal.py, exchange/service.py).

What the core holds, besides the books (matching/engine.py):

- cash per account: ``[balance, reserved]`` fen. A buy reserves its worst-case cost
  (matching/risk.py); a fill consumes from the reservation, and what the remainder no longer
  needs goes back. Withdrawals may take only ``balance - reserved``.
- credits per instrument and account: ``[available, encumbered, locked, locked_day]`` kg. A sell
  encumbers; a fill delivers from the encumbrance; cancels and expiries release it. Credits
  bought on a trading day are ``locked`` until the next Shanghai calendar day when the
  instrument has the T+1 resale rule (on by default). Of the credits a freeze took from the core
  today, the kg that were bought today: ``frozen_locked[(symbol, account)] = [day, kg]``, so
  that an unfreeze on the same day gives them back locked (kept until the next ``roll``).
- takes for registry changes that took bought-today credits: ``locked_takes[seq] = [day, frozen,
  [[symbol, account, kg, locked kg], ...]]`` for the day (an ``adjust`` marked ``take``), until
  given back (``gives_back``). A start after a crash between a take and its registry change
  gives those back locked, as the service's own give-back would have (exchange/service.py).
- open orders: ``[symbol, account, side, kind, price, remaining, reserved, expire_ts]``.
- client order ids per account (resending one returns the original order): each is kept while
  its order is open and, once the order has closed, until the second trading-day close after
  that (``roll``), so a retry within the day still finds its order and the table holds about two
  days of orders instead of every order ever placed. Those beginning :data:`KEPT_COID_PREFIX`
  (an offset's purchase, exchange/offsetting.py) are kept for good. Payment references (deposits
  and withdrawals are idempotent by reference) and per-instrument trade ids (contiguous).

Order ids are the sequence number of the command that placed the order. GTD orders expire only
through an explicit ``expire`` command: the service issues one, with its own sequence number,
whenever :meth:`expiry_due` says so, so no other command ever changes state as a side effect of
time passing (and a rejected command stays a pure no-op).
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson

from matching import events as E
from matching.engine import InstrumentRules, MatchingEngine
from matching.reference import LIMIT_MAX_PRICE, MAX_CASH, MAX_QTY
from matching.risk import (
    BP,
    MAX_FEE_BP,
    buy_reservation,
    buyer_cost,
    fill_amounts,
    market_buy_reservation,
    rounding_allowance,
)
from matching.units import round_to_tick, vwap_fen

# Journal events beyond the book's (book events gain the symbol after the type; see module doc).
EV_DEPOSIT = 20  # (20, account, amount, reference)
EV_WITHDRAWAL = 21  # (21, account, amount, reference)
EV_LISTED = 30  # (30, symbol)
EV_HALTED = 31  # (31, symbol)
EV_RESUMED = 32  # (32, symbol)
EV_CASH_ADJUSTED = 33  # (33, account, delta)            external change found at start-up
EV_CREDITS_ADJUSTED = 34  # (34, symbol, account, delta)  external change found at start-up
EV_CLOSE = 35  # (35, symbol, trading_day, close, volume): the day's VWAP, next day's reference price
EV_STP_SET = 36  # (36, account, mode): the account's self-trade prevention from now on

# Book events in the journal carry the symbol after the type, and closing events say whose order
# it was: (1, symbol, order_id, account, side, price, qty) accepted; (4, symbol, order_id,
# remaining, reason, account, side) cancelled; (5, symbol, order_id, remaining, account, side)
# expired; (6, symbol, order_id, price, qty, account, side, qty_change) amended; (7, symbol,
# side, price, level_qty) level. Trade event:
# (3, symbol, trade_id, taker_id, maker_id, buyer, seller, taker_side, price, qty, value,
#  buyer_fee, seller_fee)
T_SYMBOL, T_ID, T_TAKER, T_MAKER, T_BUYER, T_SELLER, T_SIDE, T_PRICE, T_QTY, T_VALUE, T_BFEE, T_SFEE = range(1, 13)

# Order record fields.
O_SYMBOL, O_ACCOUNT, O_SIDE, O_KIND, O_PRICE, O_REMAINING, O_RESERVED, O_EXPIRE = range(8)
# Credit position fields.
P_AVAILABLE, P_ENCUMBERED, P_LOCKED, P_LOCKED_DAY = range(4)

COMMANDS: dict[str, tuple[str, ...]] = {
    "place": ("account", "symbol", "side", "kind", "price", "qty", "tif", "post_only", "expire_ts",
              "cash_cap", "coid"),
    "cancel": ("account", "order_id"),
    "amend": ("account", "order_id", "price", "qty"),
    "deposit": ("account", "amount", "ref"),
    "withdraw": ("account", "amount", "ref"),
    "list": ("symbol", "rules", "holdings"),
    "halt": ("symbol",),
    "resume": ("symbol",),
    "expire": (),
    "roll": ("cancel_outside_band", "tick_floor"),
    "adjust": ("cash", "credits", "frozen", "frozen_left", "take", "gives_back"),
    "stp": ("account", "mode"),
}

SIDES = {"buy": E.BID, "sell": E.ASK}
DAY_US = 86_400_000_000
_CST_US = 8 * 3_600_000_000
MAX_COID = 64
# The most cash members may hold together, in fen (about 4.6e16 CNY). The ledger keeps balances
# in bigint and the custody account carries minus all of it (plus the fees): deposits each within
# MAX_CASH once added up past 2**63 there, the projector could not apply them, and every start
# replayed the failure (review32). Well short of 2**63, so that fees collected over the years fit too.
MAX_HELD_CASH = 1 << 62
# A client order id's entry: [order_id, symbol, side, kind, price, qty, tif, post_only, cash_cap,
# expire_ts, closed mark]; the terms are the order's as placed.
C_TIF, C_MARK = 6, 10
# An offset's purchase is the order offset:KEY; a repeat of the offset, at any later time, finds it
# by this client_order_id, so the roll never forgets one.
KEPT_COID_PREFIX = "offset:"


def trading_day(ts: int) -> int:
    """Days since 1970-01-01 on the Asia/Shanghai calendar (UTC+8, no DST since 1991)."""
    return (ts + _CST_US) // DAY_US


@dataclass(frozen=True)
class Listing:
    """An instrument's matching rules plus what the core needs on top: fees and the resale rule."""

    rules: InstrumentRules
    maker_bp: int = 0
    taker_bp: int = 0
    t1: bool = True  # credits bought on a trading day cannot be sold the same day

    def to_wire(self) -> dict[str, Any]:
        rules = asdict(self.rules)
        if not rules["tick_floor"]:  # as listings journaled before it was known were written
            del rules["tick_floor"]
        rules["sessions"] = [list(s) for s in self.rules.sessions]
        rules["weekdays"] = sorted(self.rules.weekdays)
        return {"rules": rules, "maker_bp": self.maker_bp, "taker_bp": self.taker_bp, "t1": self.t1}

    @classmethod
    def from_wire(cls, data: Any) -> Listing:
        """Validate and build from a command's ``rules`` dict; raises ValueError with the reason."""
        if not isinstance(data, dict):
            raise ValueError("rules must be an object")
        known = {"rules", "maker_bp", "taker_bp", "t1"}
        if set(data) - known:
            raise ValueError(f"unknown listing fields {sorted(set(data) - known)}")
        raw = dict(data.get("rules") or {})
        fields = set(InstrumentRules.__dataclass_fields__)
        if set(raw) - fields:
            raise ValueError(f"unknown rule fields {sorted(set(raw) - fields)}")
        for key in ("tick", "lot", "min_qty", "band_bp", "max_price"):
            if key in raw and not _is_int(raw[key]):
                raise ValueError(f"{key} must be an integer")
        if raw.get("reference_price") is not None and not _is_int(raw["reference_price"]):
            raise ValueError("reference_price must be an integer or null")
        if "sessions" in raw:
            sessions = raw["sessions"]
            if not isinstance(sessions, list) or not all(
                isinstance(s, list) and len(s) == 2 and all(_is_int(m) for m in s)
                and 0 <= s[0] < s[1] <= 1440 for s in sessions
            ):
                raise ValueError("sessions must be [[start_minute, end_minute], ...] within a day")
            raw["sessions"] = tuple(tuple(s) for s in sessions)
        if "weekdays" in raw:
            days = raw["weekdays"]
            if not isinstance(days, list) or not all(_is_int(d) and 0 <= d <= 6 for d in days):
                raise ValueError("weekdays must be a list of 0 (Monday) .. 6")
            raw["weekdays"] = frozenset(days)
        for key in ("always_open", "tick_floor"):
            if key in raw and not isinstance(raw[key], bool):
                raise ValueError(f"{key} must be true or false")
        rules = InstrumentRules(**raw)
        if rules.tick <= 0 or rules.lot <= 0 or rules.min_qty < rules.lot or rules.min_qty % rules.lot:
            raise ValueError("tick and lot must be positive; min_qty a positive multiple of the lot")
        if not 0 <= rules.band_bp < 10_000:
            raise ValueError("band_bp must be in [0, 10000)")
        if not 0 < rules.max_price <= LIMIT_MAX_PRICE:
            raise ValueError(f"max_price must be in (0, {LIMIT_MAX_PRICE}]")
        if rules.reference_price is not None and not 0 < rules.reference_price <= rules.max_price:
            raise ValueError("reference_price must be positive and at most max_price")
        maker, taker, t1 = data.get("maker_bp", 0), data.get("taker_bp", 0), data.get("t1", True)
        if not (_is_int(maker) and _is_int(taker) and 0 <= maker <= MAX_FEE_BP and 0 <= taker <= MAX_FEE_BP):
            raise ValueError(f"maker_bp and taker_bp must be integers in [0, {MAX_FEE_BP}]")
        if not isinstance(t1, bool):
            raise ValueError("t1 must be true or false")
        return cls(rules, maker, taker, t1)


class Outcome:
    """What one command did. ``seq`` is None for a rejected command (``code`` says why) and for a
    repeat that only returned an earlier result (``duplicate``)."""

    __slots__ = ("code", "detail", "duplicate", "events", "order_id", "seq")

    def __init__(self, seq: int | None, events: list, code: str | None = None, detail: str = "",
                 order_id: int | None = None, duplicate: bool = False) -> None:
        self.seq = seq
        self.events = events
        self.code = code
        self.detail = detail
        self.order_id = order_id
        self.duplicate = duplicate

    @property
    def accepted(self) -> bool:
        return self.code is None

    def __repr__(self) -> str:
        return (f"Outcome(seq={self.seq}, code={self.code!r}, order_id={self.order_id}, "
                f"duplicate={self.duplicate}, events={len(self.events)})")


class Rejected(Exception):
    """Raised inside the core before any state changed; becomes a rejected Outcome."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def _is_int(v: Any) -> bool:
    return type(v) is int


def _need_int(c: dict, key: str, low: int = 0, high: int = MAX_CASH) -> int:
    v = c.get(key)
    if type(v) is not int or not low <= v <= high:
        raise Rejected("invalid_command", f"{key} must be an integer in [{low}, {high}]")
    return v


def _need_text(c: dict, key: str, max_len: int) -> str:
    v = c.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= max_len or not v.isprintable():
        raise Rejected("invalid_command", f"{key} must be 1..{max_len} printable characters")
    return v


class ExchangeCore:
    """Books, cash, credits and open orders of every instrument, changed only by :meth:`apply`."""

    def __init__(self, engine: str | None = None) -> None:
        self._book_engine = engine
        self.engine = MatchingEngine(engine, default_stp=E.STP_CANCEL_RESTING)
        self.seq = 0
        self.ts = 0
        self.listings: dict[str, Listing] = {}
        self.cash: dict[int, list[int]] = {}
        self.credits: dict[str, dict[int, list[int]]] = {}
        self.orders: dict[int, list] = {}
        self.coids: dict[int, dict[str, list]] = {}
        self.stp: dict[int, int] = {}  # accounts whose self-trade prevention is not cancel-resting
        self.payments: dict[str, list] = {}
        self.frozen_locked: dict[tuple[str, int], list[int]] = {}
        self.locked_takes: dict[int, list] = {}
        self.trade_ids: dict[str, int] = {}
        self._gtd: list[tuple[int, int]] = []
        # The current trading day's trades per symbol: [sum of price * qty, sum of qty].
        self.day_stats: dict[str, list[int]] = {}
        self.stats_day = 0
        # Level changes per symbol so far: the market-data feed's book sequence (API.md), kept here
        # so that it is part of the deterministic state and continues across restarts.
        self.book_seqs: dict[str, int] = {}
        self._ops = {
            "place": self._place, "cancel": self._cancel, "amend": self._amend,
            "deposit": self._deposit, "withdraw": self._withdraw, "list": self._list,
            "halt": self._halt, "resume": self._resume, "expire": self._expire,
            "adjust": self._adjust, "roll": self._roll, "stp": self._stp,
        }

    # ---- the one entry point ---------------------------------------------------------------

    def apply(self, command: dict, ts: int) -> Outcome:
        """Apply one command at time `ts` (UTC µs, never earlier than the previous command's)."""
        if type(ts) is not int or ts < self.ts:
            return Outcome(None, [], "invalid_command", "time must not go backwards")
        op = command.get("op") if isinstance(command, dict) else None
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return Outcome(None, [], "invalid_command", "unknown op")
        if op != "expire" and self.expiry_due(ts):
            # Expiring inside another command would make its rejection change state; the caller
            # (the service) applies ``expire`` first, as its own journal entry.
            return Outcome(None, [], "expiry_due", "apply the due expire command first")
        try:
            return handler(command, ts)
        except Rejected as r:
            return Outcome(None, [], r.code, r.detail)

    def _accept(self, ts: int, events: list, order_id: int | None = None) -> Outcome:
        self.ts = ts
        return Outcome(self.seq, events, order_id=order_id)

    def expiry_due(self, ts: int) -> bool:
        """Whether a GTD order expires at or before `ts` (the service then applies ``expire``)."""
        first = self._next_expiry()
        return first is not None and first <= ts

    def _next_expiry(self) -> int | None:
        """When the first open GTD order expires; the heap's entries for orders closed meanwhile
        are dropped on the way (they are not state: restore rebuilds the heap from the orders)."""
        heap, orders = self._gtd, self.orders
        while heap and heap[0][1] not in orders:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    # ---- orders ----------------------------------------------------------------------------

    def _place(self, c: dict, ts: int) -> Outcome:
        account = _need_int(c, "account", 1)
        symbol = c.get("symbol")
        listing = self.listings.get(symbol) if isinstance(symbol, str) else None
        if listing is None:
            raise Rejected("unknown_instrument", f"no instrument {symbol!r}")
        side = c.get("side")
        kind = c.get("kind", E.LIMIT)
        tif = c.get("tif", E.GTC)
        post_only = c.get("post_only", False)
        # type() rather than ==: True == 1 would pass as a side or a time in force.
        if (type(side) is not int or type(kind) is not int or type(tif) is not int
                or side not in (E.BID, E.ASK) or kind not in (E.LIMIT, E.MARKET)
                or tif not in (E.GTC, E.IOC, E.FOK, E.GTD)):
            raise Rejected("invalid_order", "side, kind or time in force out of range")
        if not isinstance(post_only, bool):
            raise Rejected("invalid_command", "post_only must be true or false")
        qty = _need_int(c, "qty", 0, MAX_QTY)
        price = _need_int(c, "price", 0, LIMIT_MAX_PRICE) if kind == E.LIMIT else 0
        cash_cap = _need_int(c, "cash_cap", 0) if c.get("cash_cap") is not None else 0
        expire_ts = _need_int(c, "expire_ts", 0, 1 << 62) if tif == E.GTD else 0
        coid = c.get("coid")
        if coid is not None:
            coid = _need_text(c, "coid", MAX_COID)
            known = self.coids.get(account, {}).get(coid)
            if known is not None:
                # Every term, or a resend as IOC of a resting GTC order would be answered with the
                # GTC order as if the IOC had been placed. (Terms a snapshot from before they were
                # kept lacks are None: those compare on the first five.)
                if known[1:6] == [symbol, side, kind, price, qty] and (
                        known[C_TIF] is None or known[C_TIF:C_MARK] == [tif, post_only, cash_cap, expire_ts]):
                    return Outcome(None, [], order_id=known[0], duplicate=True)
                raise Rejected("duplicate_client_order_id",
                               f"client_order_id {coid!r} was already used for order {known[0]}")
        code = self.engine.check_order(symbol, ts, side, price, qty, tif, kind, post_only, cash_cap)
        if code:
            raise Rejected(E.REJECT_NAMES[code])
        rules = listing.rules
        if tif == E.GTD and expire_ts <= ts:
            raise Rejected("invalid_expiry", "expire time must be in the future")

        # Risk: check, then reserve. Nothing above this line has changed any state.
        if side == E.BID:
            fee_bp = max(listing.maker_bp, listing.taker_bp)
            need = (market_buy_reservation(cash_cap, qty, rules.lot, fee_bp) if kind == E.MARKET
                    else buy_reservation(price, qty, rules.lot, fee_bp))
            purse = self.cash.get(account)
            if kind == E.LIMIT and tif in (E.IOC, E.FOK) and (purse is None or purse[0] - purse[1] < need):
                # It never rests, so what it meets in the book now is all it can pay for, exactly:
                # the worst case allows 2 fen a lot for rounding, on a 1 kg lot 2.4 times the cost
                # of a tonne at 13.89 CNY (review31). Only when the worst case does not fit: a walk.
                # Nothing to meet keeps the worst case: a zero would admit the order on an empty
                # purse, and a core restored from a snapshot, which keeps no empty purse, refused it.
                need = min(need, buyer_cost(self.taker_fills(symbol, account, price, qty, ts), listing.taker_bp)
                           or need)
            if purse is None or purse[0] - purse[1] < need:
                free = purse[0] - purse[1] if purse else 0
                raise Rejected("insufficient_funds", f"needs {need} fen free, has {free}")
            saved = purse[1]
            purse[1] += need
            undo = (purse, 1, saved)
        else:
            need = 0
            positions = self.credits[symbol]
            pos = positions.get(account)
            if pos is None or self._sellable(pos, listing, ts) < qty:
                have = self._sellable(pos, listing, ts) if pos else 0
                raise Rejected("insufficient_credits", f"needs {qty} kg available, has {have}")
            old = pos[:]
            self._unlock(pos, ts)
            pos[P_AVAILABLE] -= qty
            pos[P_ENCUMBERED] += qty
            undo = (pos, None, old)

        order_id = self.seq + 1
        self.orders[order_id] = [symbol, account, side, kind, price, qty, need, expire_ts]
        evs = self.engine.submit(symbol, order_id, account, side, price, qty, ts, tif, kind, post_only,
                                 expire_ts, cash_cap, checked=True)
        if evs[0][0] == E.EV_REJECTED:  # post-only would take, FOK not fillable: book untouched
            del self.orders[order_id]
            target, index, value = undo
            if index is None:
                target[:] = value
            else:
                target[index] = value
            raise Rejected(E.REJECT_NAMES[evs[0][2]])
        self.seq = order_id
        out = self._book_events(symbol, listing, evs, ts)
        if order_id in self.orders:  # it rests, keeping what is left of its reservation
            if kind == E.MARKET or tif in (E.IOC, E.FOK):
                raise AssertionError(f"order {order_id} left open after a non-resting command")
            if tif == E.GTD:
                heapq.heappush(self._gtd, (expire_ts, order_id))
        if coid is not None:
            self.coids.setdefault(account, {})[coid] = [order_id, symbol, side, kind, price, qty, tif, post_only,
                                                        cash_cap, expire_ts, 0]
        return self._accept(ts, out, order_id)

    def _owned(self, c: dict) -> tuple[int, list]:
        order_id = _need_int(c, "order_id", 1, 1 << 62)
        account = c.get("account")
        o = self.orders.get(order_id)
        # An order of another account is "not found": its existence is not the caller's business.
        if o is None or (account is not None and o[O_ACCOUNT] != account):
            raise Rejected("not_found", f"no open order {order_id}")
        return order_id, o

    def _cancel(self, c: dict, ts: int) -> Outcome:
        order_id, o = self._owned(c)
        symbol = o[O_SYMBOL]
        evs = self.engine.cancel(symbol, order_id, ts)
        if evs and evs[0][0] == E.EV_REJECTED:
            raise AssertionError(f"core and book disagree about order {order_id}")
        self.seq += 1
        return self._accept(ts, self._book_events(symbol, self.listings[symbol], evs, ts), order_id)

    def _amend(self, c: dict, ts: int) -> Outcome:
        order_id, o = self._owned(c)
        symbol, account, side = o[O_SYMBOL], o[O_ACCOUNT], o[O_SIDE]
        listing = self.listings[symbol]
        price = _need_int(c, "price", 0, LIMIT_MAX_PRICE)
        qty = _need_int(c, "qty", 0, MAX_QTY)
        code = self.engine.check_amend(symbol, ts, price, qty)
        if code:
            raise Rejected(E.REJECT_NAMES[code])
        old_order = o[:]
        if side == E.BID:
            fee_bp = max(listing.maker_bp, listing.taker_bp)
            extra = buy_reservation(price, qty, listing.rules.lot, fee_bp) - o[O_RESERVED]
            purse = self.cash[account]
            if extra > purse[0] - purse[1]:
                raise Rejected("insufficient_funds", f"needs {extra} fen more, has {purse[0] - purse[1]}")
            saved: list = purse[:]
            purse[1] += extra
            o[O_RESERVED] += extra
        else:
            extra = qty - o[O_REMAINING]
            purse = self.credits[symbol][account]
            if extra > self._sellable(purse, listing, ts):
                raise Rejected("insufficient_credits", f"needs {extra} kg more available")
            saved = purse[:]
            if extra > 0:
                self._unlock(purse, ts)
            purse[P_AVAILABLE] -= extra
            purse[P_ENCUMBERED] += extra
        o[O_PRICE], o[O_REMAINING] = price, qty
        evs = self.engine.amend(symbol, order_id, price, qty, ts)
        if evs[0][0] == E.EV_REJECTED:  # e.g. a post-only order moved across the spread
            purse[:] = saved
            o[:] = old_order
            raise Rejected(E.REJECT_NAMES[evs[0][2]])
        self.seq += 1
        # The amended event also says who and by how much the open quantity moved, so that a
        # consumer can follow encumbrances and reservations without the order book.
        amended = (E.EV_AMENDED, symbol, order_id, price, qty, account, side, qty - old_order[O_REMAINING])
        return self._accept(ts, [amended, *self._book_events(symbol, listing, evs[1:], ts)], order_id)

    def _expire(self, c: dict, ts: int) -> Outcome:
        if not self.expiry_due(ts):
            raise Rejected("invalid_command", "nothing to expire")
        self.seq += 1
        out: list = []
        for symbol in self.engine.instruments():
            book = self.engine.book(symbol)
            book.expire(ts)
            evs = book.events()
            if evs:
                out.extend(self._book_events(symbol, self.listings[symbol], evs, ts))
        return self._accept(ts, out)

    # ---- what the book did -----------------------------------------------------------------

    def _book_events(self, symbol: str, listing: Listing, evs: list, ts: int) -> list:
        """Settle the core's side of each book event and return the journal events."""
        out = []
        orders = self.orders
        levels = 0
        for ev in evs:
            kind = ev[0]
            if kind == E.EV_LEVEL:
                levels += 1
                out.append((kind, symbol, *ev[1:]))
            elif kind == E.EV_TRADE:
                out.append(self._trade(symbol, listing, ev, ts))
            elif kind == E.EV_CANCELLED or kind == E.EV_EXPIRED:
                o = orders.pop(ev[1])
                self._close(ev[1], o)
                out.append((kind, symbol, *ev[1:], o[O_ACCOUNT], o[O_SIDE]))
            else:
                out.append((kind, symbol, *ev[1:]))
        if levels:
            self.book_seqs[symbol] = self.book_seqs.get(symbol, 0) + levels
        return out

    def _trade(self, symbol: str, listing: Listing, ev: tuple, ts: int) -> tuple:
        _, taker_id, maker_id, taker_acct, maker_acct, taker_side, price, qty = ev
        if taker_side == E.BID:
            buy_id, sell_id, buyer, seller = taker_id, maker_id, taker_acct, maker_acct
            buyer_bp, seller_bp = listing.taker_bp, listing.maker_bp
        else:
            buy_id, sell_id, buyer, seller = maker_id, taker_id, maker_acct, taker_acct
            buyer_bp, seller_bp = listing.maker_bp, listing.taker_bp
        value, buyer_fee, seller_fee = fill_amounts(price, qty, buyer_bp, seller_bp)
        orders = self.orders
        cash = self.cash

        b = orders[buy_id]
        cost = value + buyer_fee
        purse = cash[buyer]
        purse[0] -= cost
        purse[1] -= cost
        b[O_RESERVED] -= cost
        b[O_REMAINING] -= qty
        if b[O_REMAINING] == 0:
            purse[1] -= b[O_RESERVED]
            del orders[buy_id]
        elif b[O_KIND] == E.LIMIT:
            keep = buy_reservation(b[O_PRICE], b[O_REMAINING], listing.rules.lot,
                                   max(listing.maker_bp, listing.taker_bp))
            if b[O_RESERVED] > keep:
                purse[1] -= b[O_RESERVED] - keep
                b[O_RESERVED] = keep
        positions = self.credits[symbol]
        pos = positions.get(buyer)
        if pos is None:
            pos = positions[buyer] = [0, 0, 0, 0]
        if listing.t1:
            day = trading_day(ts)
            if pos[P_LOCKED_DAY] != day:
                pos[P_AVAILABLE] += pos[P_LOCKED]
                pos[P_LOCKED], pos[P_LOCKED_DAY] = 0, day
            pos[P_LOCKED] += qty
        else:
            pos[P_AVAILABLE] += qty

        s = orders[sell_id]
        s[O_REMAINING] -= qty
        if s[O_REMAINING] == 0:
            del orders[sell_id]
        positions[seller][P_ENCUMBERED] -= qty
        spurse = cash.get(seller)
        if spurse is None:
            spurse = cash[seller] = [0, 0]
        spurse[0] += value - seller_fee

        trade_id = self.trade_ids[symbol] + 1
        self.trade_ids[symbol] = trade_id
        stats = self.day_stats.get(symbol)
        if stats is None:
            stats = self.day_stats[symbol] = [0, 0]
            if not self.stats_day:
                self.stats_day = trading_day(ts)
        stats[0] += price * qty
        stats[1] += qty
        return (E.EV_TRADE, symbol, trade_id, taker_id, maker_id, buyer, seller, taker_side, price,
                qty, value, buyer_fee, seller_fee)

    def _close(self, order_id: int, o: list) -> None:
        """An order left the book unfilled (cancel, expiry, IOC/market remainder, STP)."""
        if o[O_SIDE] == E.BID:
            self.cash[o[O_ACCOUNT]][1] -= o[O_RESERVED]
        else:
            pos = self.credits[o[O_SYMBOL]][o[O_ACCOUNT]]
            pos[P_ENCUMBERED] -= o[O_REMAINING]
            pos[P_AVAILABLE] += o[O_REMAINING]

    @staticmethod
    def _sellable(pos: list, listing: Listing, ts: int) -> int:
        if pos[P_LOCKED] and pos[P_LOCKED_DAY] < trading_day(ts):
            return pos[P_AVAILABLE] + pos[P_LOCKED]
        return pos[P_AVAILABLE]

    @staticmethod
    def _unlock(pos: list, ts: int) -> None:
        if pos[P_LOCKED] and pos[P_LOCKED_DAY] < trading_day(ts):
            pos[P_AVAILABLE] += pos[P_LOCKED]
            pos[P_LOCKED] = pos[P_LOCKED_DAY] = 0

    def next_due(self) -> int | None:
        """When the next expiry or day's close falls due (UTC µs), None if nothing will: the
        service's timer applies them then, so that a quiet market shows them on time too."""
        first = self._next_expiry()
        times = [first] if first is not None else []
        if self.day_stats:
            times.append((self.stats_day + 1) * DAY_US - _CST_US)  # the next Shanghai midnight
        return min(times, default=None)

    def roll_due(self, ts: int) -> bool:
        """Whether `ts` falls on a later trading day than the trades not yet closed (the service
        then applies ``roll``)."""
        return bool(self.day_stats) and trading_day(ts) > self.stats_day

    def _roll(self, c: dict, ts: int) -> Outcome:
        """Close the trading day: each traded instrument's volume-weighted average price, rounded
        half-up to its tick, becomes its reference price (the centre of the price band). With
        ``cancel_outside_band`` (every roll the service journals now) the orders left resting
        outside an instrument's new band are cancelled (reason price_band): they would otherwise
        trade at prices the day's band refuses to any new order. With ``tick_floor`` (the same)
        the new bands are at least one tick either way of the reference (InstrumentRules.band).
        Rolls journaled without them replay as they ran."""
        sweep, floor = c.get("cancel_outside_band", False), c.get("tick_floor", False)
        if not isinstance(sweep, bool) or not isinstance(floor, bool):
            raise Rejected("invalid_command", "cancel_outside_band and tick_floor must be true or false")
        if not self.roll_due(ts):
            raise Rejected("invalid_command", "no trading day to close")
        self.seq += 1
        out = []
        for symbol in sorted(self.day_stats):
            pq, q = self.day_stats[symbol]
            listing = self.listings[symbol]
            tick = listing.rules.tick
            close = min(round_to_tick(vwap_fen(pq, q), tick), listing.rules.max_price)
            rules = replace(listing.rules, reference_price=close, tick_floor=listing.rules.tick_floor or floor)
            self.engine.set_rules(symbol, rules)
            self.listings[symbol] = replace(listing, rules=rules)
            out.append((EV_CLOSE, symbol, self.stats_day, close, q))
            if sweep:
                out.extend(self._cancel_outside_band(symbol, ts))
        self.day_stats = {}
        self.stats_day = 0
        self._forget_coids()
        # Bought before today: free once the day has passed, so nothing to relock any more.
        today = trading_day(ts)
        self.frozen_locked = {k: v for k, v in self.frozen_locked.items() if v[0] >= today}
        self.locked_takes = {k: v for k, v in self.locked_takes.items() if v[0] >= today}
        return self._accept(ts, out)

    def _cancel_outside_band(self, symbol: str, ts: int) -> list:
        listing = self.listings[symbol]
        low, high = listing.rules.band()
        out: list = []
        for order_id in sorted(oid for oid, o in self.orders.items()
                               if o[O_SYMBOL] == symbol and not low <= o[O_PRICE] <= high):
            evs = [(*ev[:3], E.CANCEL_PRICE_BAND) if ev[0] == E.EV_CANCELLED else ev
                   for ev in self.engine.cancel(symbol, order_id, ts)]
            out.extend(self._book_events(symbol, listing, evs, ts))
        return out

    def _forget_coids(self) -> None:
        """At a day's close: forget the client_order_ids whose orders were already closed at the
        previous close, and mark those closed since (C_MARK), to be forgotten at the next."""
        orders = self.orders
        for account in list(self.coids):
            known = self.coids[account]
            for coid, v in list(known.items()):
                if v[0] in orders or coid.startswith(KEPT_COID_PREFIX):
                    continue
                if v[C_MARK]:
                    del known[coid]
                else:
                    v[C_MARK] = 1
            if not known:
                del self.coids[account]

    # ---- cash --------------------------------------------------------------------------------

    def _payment(self, c: dict, ts: int, direction: int) -> Outcome:
        account = _need_int(c, "account", 1)
        amount = _need_int(c, "amount", 1)
        ref = _need_text(c, "ref", 100)
        if not ref.strip(" "):
            # The ledger's CHECK (length(btrim(reference)) >= 1) would refuse it after the journal
            # took it: the projector could never apply that entry, and the exchange would stop.
            raise Rejected("invalid_command", "ref must not be only spaces")
        known = self.payments.get(ref)
        if known is not None:
            if known[:3] == [account, direction, amount]:
                return Outcome(None, [], duplicate=True)
            raise Rejected("duplicate_reference", f"payment reference {ref!r} was used for another payment")
        purse = self.cash.get(account)
        if direction == 1 and (purse is None or purse[0] - purse[1] < amount):
            free = purse[0] - purse[1] if purse else 0
            raise Rejected("insufficient_funds", f"withdrawal of {amount} fen, {free} fen free")
        if direction == 0 and sum(p[0] for p in self.cash.values()) + amount > MAX_HELD_CASH:
            raise Rejected("cash_limit", f"a deposit of {amount} fen would take the cash members hold together "
                                         f"past {MAX_HELD_CASH} fen, the most the ledger is made to hold")
        if purse is None:
            purse = self.cash[account] = [0, 0]
        purse[0] += amount if direction == 0 else -amount
        self.seq += 1
        self.payments[ref] = [account, direction, amount, self.seq]
        kind = EV_DEPOSIT if direction == 0 else EV_WITHDRAWAL
        return self._accept(ts, [(kind, account, amount, ref)])

    def _deposit(self, c: dict, ts: int) -> Outcome:
        return self._payment(c, ts, 0)

    def _withdraw(self, c: dict, ts: int) -> Outcome:
        return self._payment(c, ts, 1)

    # ---- instruments -------------------------------------------------------------------------

    def _list(self, c: dict, ts: int) -> Outcome:
        symbol = _need_text(c, "symbol", 40)
        if symbol in self.listings:
            raise Rejected("instrument_exists", f"{symbol} is already listed")
        try:
            listing = Listing.from_wire(c.get("rules") or {})
        except (TypeError, ValueError) as exc:
            raise Rejected("invalid_rules", str(exc)) from None
        holdings = c.get("holdings") or []
        if not isinstance(holdings, list) or not all(
            isinstance(h, list) and len(h) == 2 and _is_int(h[0]) and _is_int(h[1]) and h[0] > 0 and h[1] > 0
            for h in holdings
        ):
            raise Rejected("invalid_command", "holdings must be [[account, kg], ...] with positive values")
        if len({h[0] for h in holdings}) != len(holdings):
            raise Rejected("invalid_command", "an account appears twice in holdings")
        self.seq += 1
        self.engine.add_instrument(symbol, listing.rules)
        self.listings[symbol] = listing
        self.credits[symbol] = {acct: [kg, 0, 0, 0] for acct, kg in holdings}
        self.trade_ids[symbol] = 0
        return self._accept(ts, [(EV_LISTED, symbol)])

    def _stp(self, c: dict, ts: int) -> Outcome:
        """An account's self-trade prevention (DESIGN: configurable per account): when its order
        would trade with its own, cancel the resting one (the default), the incoming one, or both."""
        account = _need_int(c, "account", 1)
        mode = c.get("mode")
        if type(mode) is not int or mode not in (E.STP_CANCEL_RESTING, E.STP_CANCEL_INCOMING, E.STP_CANCEL_BOTH):
            raise Rejected("invalid_command", "mode must be 1 (cancel resting), 2 (cancel incoming) or 3 (both)")
        self.engine.set_account_stp(account, mode)
        if mode == E.STP_CANCEL_RESTING:
            self.stp.pop(account, None)
        else:
            self.stp[account] = mode
        self.seq += 1
        return self._accept(ts, [(EV_STP_SET, account, mode)])

    def _halt(self, c: dict, ts: int) -> Outcome:
        symbol = c.get("symbol")
        if not isinstance(symbol, str) or symbol not in self.listings:
            raise Rejected("unknown_instrument", f"no instrument {symbol!r}")
        if self.engine.is_halted(symbol):
            raise Rejected("already_halted", f"{symbol} is halted already")
        self.engine.halt(symbol)
        self.seq += 1
        return self._accept(ts, [(EV_HALTED, symbol)])

    def _resume(self, c: dict, ts: int) -> Outcome:
        symbol = c.get("symbol")
        if not isinstance(symbol, str) or symbol not in self.listings:
            raise Rejected("unknown_instrument", f"no instrument {symbol!r}")
        if not self.engine.is_halted(symbol):
            raise Rejected("not_halted", f"{symbol} is not halted")
        self.engine.resume(symbol)
        self.seq += 1
        return self._accept(ts, [(EV_RESUMED, symbol)])

    def _adjust(self, c: dict, ts: int) -> Outcome:
        """Changes made to cash or credits outside the service (while it was stopped), found by
        comparing the database with the core at start-up, and the service's own takes and
        give-backs around registry changes (retirements, freezes); journaled so that replay sees
        them. A credits entry may carry a fourth number: of a positive delta, `relock`, the kg
        that go back to bought-today credits (locked under T+1) while their day lasts, so that
        giving back what a refused retirement took restores the position it took them from; of a
        negative delta, the kg to take from bought-today credits first (a retirement: those
        cannot be sold today anyway, and an offset retires what it just bought). Otherwise a take
        comes from available credits first.

        ``"frozen": true`` marks credits going into a freeze (negative deltas) or coming out of
        one (positive): what a take into a freeze finds it must take from bought-today credits is
        remembered per position for the day, and a give-back out of a freeze without its own
        relock relocks as much of that as it can (an unfreeze on the same day would otherwise
        make today's purchase sellable today, T+1). A relock, given or worked out, uses the
        remembered kg up. ``frozen_left`` ([[symbol, account, kg]]): what is still frozen of the
        member's credits after a cancel took frozen ones; the remembered kg never exceed it.

        ``"take": true`` marks the service's take for a registry change: what it takes of
        bought-today credits is remembered for the day under this entry's seq (:attr:`locked_takes`),
        and ``"gives_back": seq`` (the give-back of that take) forgets it. A start finds the takes
        whose change the registry never made (a crash between the two) and gives them back locked."""
        cash, credits = c.get("cash") or [], c.get("credits") or []
        frozen, take, gives_back = c.get("frozen", False), c.get("take", False), c.get("gives_back")
        if not isinstance(frozen, bool):
            raise Rejected("invalid_command", "frozen must be true or false")
        if not isinstance(take, bool):
            raise Rejected("invalid_command", "take must be true or false")
        if gives_back is not None and not (_is_int(gives_back) and 0 < gives_back <= self.seq):
            raise Rejected("invalid_command", "gives_back names the seq of an earlier take")
        if take and gives_back is not None:
            raise Rejected("invalid_command", "an adjust is a take or a give-back, not both")
        cash_ok = isinstance(cash, list) and all(
            isinstance(x, list) and len(x) == 2 and all(map(_is_int, x)) for x in cash)
        credits_ok = isinstance(credits, list) and all(
            isinstance(x, list) and len(x) in (3, 4) and isinstance(x[0], str) and x[0] in self.listings
            and all(map(_is_int, x[1:])) and (len(x) == 3 or 0 <= x[3] <= abs(x[2]))
            for x in credits)
        if not (cash_ok and credits_ok):
            raise Rejected("invalid_command", "adjust takes cash [[account, delta]] and credits "
                                              "[[symbol, account, delta, locked?]] with 0 <= locked <= |delta|")
        left = c.get("frozen_left") or []
        if not (isinstance(left, list) and all(
                isinstance(x, list) and len(x) == 3 and isinstance(x[0], str) and x[0] in self.listings
                and _is_int(x[1]) and _is_int(x[2]) and x[2] >= 0 for x in left)):
            raise Rejected("invalid_command", "frozen_left takes [[symbol, account, kg]] with kg >= 0")
        if not cash and not credits and not left:
            raise Rejected("invalid_command", "nothing to adjust")
        out: list = []
        for account, delta in cash:
            purse = self.cash.setdefault(account, [0, 0])
            purse[0] += delta
            out.append((EV_CASH_ADJUSTED, account, delta))
        day = trading_day(ts)
        took: list[list] = []
        for symbol, account, delta, *relock in credits:
            pos = self.credits[symbol].setdefault(account, [0, 0, 0, 0])
            held = self.frozen_locked.get((symbol, account)) if frozen else None
            if held is not None and held[0] < day:
                held = None
            if frozen and delta > 0 and not relock and held is not None:
                relock = [min(delta, held[1])]
            # Still the day they were bought: they go back locked (a later day would have freed them).
            if delta >= 0:
                back = relock[0] if relock and pos[P_LOCKED_DAY] >= day else 0
            else:
                back = -min(relock[0], pos[P_LOCKED]) if relock else 0
            locked_before = pos[P_LOCKED]
            pos[P_LOCKED] += back
            pos[P_AVAILABLE] += delta - back
            if pos[P_AVAILABLE] < 0:  # the outside change took credits bought today
                pos[P_LOCKED] += pos[P_AVAILABLE]
                pos[P_AVAILABLE] = 0
            if frozen:
                self._frozen_locked(symbol, account, held, pos[P_LOCKED] - locked_before,
                                    day if pos[P_LOCKED_DAY] >= day else 0)
            if take and delta < 0 and locked_before > pos[P_LOCKED] and pos[P_LOCKED_DAY] >= day:
                took.append([symbol, account, -delta, locked_before - pos[P_LOCKED]])
            out.append((EV_CREDITS_ADJUSTED, symbol, account, delta))
        # What is left frozen of a member's credits after frozen ones left the registry (a cancel):
        # no more of it can have been bought today than that.
        for symbol, account, kg in left:
            held = self.frozen_locked.get((symbol, account))
            if held is not None and held[1] > kg:
                self._frozen_locked(symbol, account, held, held[1] - kg, held[0])
        self.seq += 1
        if took:
            self.locked_takes[self.seq] = [day, frozen, took]
        if gives_back is not None:
            self.locked_takes.pop(gives_back, None)
        return self._accept(ts, out)

    def _frozen_locked(self, symbol: str, account: int, held: list[int] | None, change: int, day: int) -> None:
        """Remember `change` kg more (taken into a freeze) or fewer (relocked out of one) frozen
        bought-today credits of a position locked on `day` (0: not locked today, nothing to remember)."""
        kg = (held[1] if held is not None else 0) - change
        if day and kg > 0:
            self.frozen_locked[(symbol, account)] = [day, kg]
        else:
            self.frozen_locked.pop((symbol, account), None)

    # ---- views -------------------------------------------------------------------------------

    def free_cash(self, account: int) -> int:
        purse = self.cash.get(account)
        return purse[0] - purse[1] if purse else 0

    def taker_fills(self, symbol: str, account: int, limit: int, qty: int, ts: int) -> list[tuple[int, int]]:
        """The (price, kg) fills a buy of up to `qty` kg at `limit` by `account` would take from the
        book at `ts`, in the book's priority order: offers due to expire by `ts` are left out (the
        book expires them first), and the account's own are skipped under cancel-resting
        self-trade prevention or end the walk under the modes that cancel the incoming order."""
        stp = self.engine.account_stp(account)
        fills: list[tuple[int, int]] = []
        left = qty
        for _oid, owner, side, price, kg, tif, expire_ts, *_ in self.engine.book(symbol).orders():  # bids first
            if side != E.ASK or (tif == E.GTD and expire_ts <= ts):
                continue
            if not left or price > limit:
                break
            if owner == account:
                if stp == E.STP_CANCEL_RESTING:
                    continue
                break
            fills.append((price, min(left, kg)))
            left -= fills[-1][1]
        return fills

    def position(self, symbol: str, account: int, ts: int | None = None) -> tuple[int, int, int]:
        """(available, encumbered, locked until the next trading day) kg; as of `ts` if given:
        credits bought on an earlier day count as available then, as a sell would find them (the
        position itself moves them only when next touched)."""
        pos = self.credits.get(symbol, {}).get(account)
        if not pos:
            return (0, 0, 0)
        if ts is not None and pos[P_LOCKED] and pos[P_LOCKED_DAY] < trading_day(ts):
            return (pos[P_AVAILABLE] + pos[P_LOCKED], pos[P_ENCUMBERED], 0)
        return (pos[P_AVAILABLE], pos[P_ENCUMBERED], pos[P_LOCKED])

    def check_invariants(self) -> list[str]:
        """Reservations against open orders and the books; returns what disagrees (empty = fine)."""
        problems: list[str] = []
        reserved: dict[int, int] = {}
        encumbered: dict[tuple[str, int], int] = {}
        for oid, o in self.orders.items():
            book_qty = self.engine.book(o[O_SYMBOL]).order_qty(oid)
            if book_qty != o[O_REMAINING]:
                problems.append(f"order {oid}: core remaining {o[O_REMAINING]}, book {book_qty}")
            if o[O_SIDE] == E.BID:
                reserved[o[O_ACCOUNT]] = reserved.get(o[O_ACCOUNT], 0) + o[O_RESERVED]
                if o[O_KIND] == E.LIMIT and not self._covers(o):
                    problems.append(f"order {oid}: reserved {o[O_RESERVED]} cannot cover its remaining fills")
            else:
                key = (o[O_SYMBOL], o[O_ACCOUNT])
                encumbered[key] = encumbered.get(key, 0) + o[O_REMAINING]
        for symbol in self.engine.instruments():
            resting = {o[0] for o in self.engine.book(symbol).orders()}
            missing = resting - self.orders.keys()
            if missing:
                problems.append(f"{symbol}: book orders unknown to the core: {sorted(missing)[:5]}")
        for account, (balance, held) in self.cash.items():
            if held != reserved.get(account, 0):
                problems.append(f"account {account}: reserved {held}, open buys need {reserved.get(account, 0)}")
            if balance < held or held < 0:
                problems.append(f"account {account}: balance {balance} below reserved {held}")
        for symbol, positions in self.credits.items():
            for account, pos in positions.items():
                if pos[P_ENCUMBERED] != encumbered.get((symbol, account), 0):
                    problems.append(f"{symbol} account {account}: encumbered {pos[P_ENCUMBERED]}, "
                                    f"open sells {encumbered.get((symbol, account), 0)}")
                if min(pos[:3]) < 0:
                    problems.append(f"{symbol} account {account}: negative position {pos}")
        return problems

    def _covers(self, o: list) -> bool:
        """The invariant of matching/risk.py, in exact integers, for one open limit buy."""
        listing = self.listings[o[O_SYMBOL]]
        lot, fee_bp = listing.rules.lot, max(listing.maker_bp, listing.taker_bp)
        rem = o[O_REMAINING]
        bound = o[O_PRICE] * rem * (BP + fee_bp) + rounding_allowance(lot, fee_bp) * (rem // lot) * BP * 1000
        return o[O_RESERVED] * BP * 1000 >= bound

    # ---- state -------------------------------------------------------------------------------

    def _state(self, books: Any) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "listings": [[s, self.listings[s].to_wire(), self.engine.is_halted(s), self.trade_ids[s]]
                         for s in sorted(self.listings)],
            "books": books,
            "cash": sorted([a, *p] for a, p in self.cash.items() if p != [0, 0]),
            # an empty position's locked day stays: a give-back's relock reads it
            "credits": sorted([s, a, *p] for s, ps in self.credits.items() for a, p in ps.items()
                              if p != [0, 0, 0, 0]),
            "orders": sorted([k, *o] for k, o in self.orders.items()),
            "coids": sorted([a, k, *v] for a, m in self.coids.items() for k, v in m.items()),
            "stp": sorted([a, m] for a, m in self.stp.items()),
            "payments": sorted([k, *v] for k, v in self.payments.items()),
            "frozen_locked": sorted([s, a, *v] for (s, a), v in self.frozen_locked.items()),
            "locked_takes": sorted([k, *v] for k, v in self.locked_takes.items()),
            # sum of price * qty as text: a long day could pass orjson's 64-bit integers
            "book_seqs": sorted([s, n] for s, n in self.book_seqs.items()),
            "day": [self.stats_day, sorted([s, str(pq), q] for s, (pq, q) in self.day_stats.items())],
        }

    def snapshot(self) -> bytes:
        """Everything needed to rebuild this core exactly, as bytes."""
        books = [[s, self.engine.book(s).snapshot()] for s in sorted(self.listings)]
        return orjson.dumps(self._state(books))

    def state_digest(self) -> str:
        """SHA-256 over books, reservations, positions, open orders and idempotency keys."""
        books = [[s, self.engine.book(s).state_digest()] for s in sorted(self.listings)]
        return hashlib.sha256(orjson.dumps(self._state(books))).hexdigest()

    @staticmethod
    def snapshot_digest(data: bytes, restored: ExchangeCore) -> str:
        """The :meth:`state_digest` the core that wrote snapshot `data` had, from `data` itself
        and the books `restored` from it: what a stored digest is checked against. Not the
        restored core's own digest, which follows this version's state layout (an entry another
        version laid out differently, or a field it did not have, would fail a sound snapshot and
        stop the exchange from starting after an upgrade)."""
        state = orjson.loads(data)
        state["books"] = [[s, restored.engine.book(s).state_digest()] for s, _ in state["books"]]
        return hashlib.sha256(orjson.dumps(state)).hexdigest()

    @classmethod
    def restore(cls, data: bytes, engine: str | None = None) -> ExchangeCore:
        """A core rebuilt from :meth:`snapshot` output."""
        state = orjson.loads(data)
        core = cls(engine)
        core.seq, core.ts = state["seq"], state["ts"]
        for symbol, wire, halted, trades in state["listings"]:
            listing = Listing.from_wire(wire)
            core.engine.add_instrument(symbol, listing.rules)
            core.listings[symbol] = listing
            core.credits[symbol] = {}
            core.trade_ids[symbol] = trades
            if halted:
                core.engine.halt(symbol)
        for symbol, book in state["books"]:
            core.engine.book(symbol).restore(book)
        core.cash = {a: [b, r] for a, b, r in state["cash"]}
        for symbol, account, *pos in state["credits"]:
            core.credits[symbol][account] = pos
        core.orders = {k: o for k, *o in state["orders"]}
        for account, coid, *v in state["coids"]:
            if len(v) == 6:  # a snapshot from before the other terms and the mark were kept
                v += [None, None, None, None, 0]
            core.coids.setdefault(account, {})[coid] = v
        core.payments = {k: v for k, *v in state["payments"]}
        core.frozen_locked = {(s, a): v for s, a, *v in state.get("frozen_locked", [])}  # none before it was kept
        core.locked_takes = {k: v for k, *v in state.get("locked_takes", [])}
        for account, mode in state.get("stp", []):  # snapshots from before the setting have none
            core.stp[account] = mode
            core.engine.set_account_stp(account, mode)
        core.book_seqs = {s: n for s, n in state.get("book_seqs", [])}
        core.stats_day = state["day"][0]
        core.day_stats = {s: [int(pq), q] for s, pq, q in state["day"][1]}
        core._gtd = [(o[O_EXPIRE], k) for k, o in core.orders.items() if o[O_EXPIRE]]
        heapq.heapify(core._gtd)
        return core
