"""Orders, fills and the trade tape as members and the public see them, folded from the journal.

The core keeps only open orders and no fills; clients want closed orders, average prices and
fill lists. :func:`fold` turns one journal entry (its command and events) into order states,
fills and public trades. Two things run it on the same entries, so they always agree:

- the ``history`` journal consumer (:func:`project`), which writes ``orders``, ``fills`` and
  ``trades`` (migration 0004) with its position in the same transaction, exactly once, like the
  projector does for the registry;
- :class:`OrderTracker`, the service's in-memory view of open orders and of recently closed
  ones, which answers order entry and the private feed without a database round trip.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from exchange.journal import lock_position, read, save_position
from matching import events as E

NAME = "history"
BATCH = 5_000
SIDE = ("buy", "sell")
KIND = ("limit", "market")
TIF = ("GTC", "IOC", "FOK", "GTD")
OPEN = ("new", "partially_filled")
RECENT = 100_000  # closed orders the tracker remembers (answers to cancels and resends)
VIEW_FILLS = 100  # the newest fills an order view carries (api/orders.py); the tracker keeps no more


@dataclass(slots=True)
class Fill:
    symbol: str
    trade_id: int
    order_id: int
    account: int
    side: int
    maker: bool
    price: int
    qty: int
    value: int
    fee: int
    ts: int
    seq: int


@dataclass(slots=True)
class OrderState:
    order_id: int
    account: int
    symbol: str
    side: int
    kind: int
    tif: int
    post_only: bool
    price: int
    quantity: int
    remaining: int
    filled: int = 0
    value: int = 0
    fee: int = 0
    max_cash: int | None = None
    expire_ts: int | None = None
    client_order_id: str | None = None
    status: str = "new"
    reason: str | None = None
    created_ts: int = 0
    updated_ts: int = 0
    # The newest of those folded in this process: VIEW_FILLS at least, once there are that many
    # (trimmed as it grows: a market maker's order may fill thousands of times).
    fills: list[Fill] = field(default_factory=list)
    # Sum of price x quantity over the fills (fen per tonne x kg): the average price's numerator.
    # `value` cannot be: each trade's value is rounded to the fen, and on a 1 kg lot a 1 kg fill
    # at 35.00 is worth 0.04 CNY, which averaged to 40.00.
    notional: int = 0
    seq: int = 0  # the journal entry that last changed it (in this process's folding)
    answered: int = 0  # the last entry that changed it by its owner's command (answered with it)
    earlier_fills: bool = False  # it had fills before this process, which `fills` lacks


def fills_known(o: OrderState) -> bool:
    """Whether `o.fills` holds the order's newest VIEW_FILLS fills (or all, when fewer): not so
    for an order loaded at start with fills, until it has filled VIEW_FILLS times more."""
    return not o.earlier_fills or len(o.fills) >= VIEW_FILLS


def _copied(o: OrderState) -> OrderState:
    """A copy to go on changing, the original left as it stood (positional: a copy per maker
    that trades twice in one commit, on the order-entry path)."""
    return OrderState(o.order_id, o.account, o.symbol, o.side, o.kind, o.tif, o.post_only, o.price, o.quantity,
                      o.remaining, o.filled, o.value, o.fee, o.max_cash, o.expire_ts, o.client_order_id, o.status,
                      o.reason, o.created_ts, o.updated_ts, o.fills[-VIEW_FILLS:], o.notional, o.seq, o.answered,
                      o.earlier_fills)


@dataclass(slots=True)
class Trade:
    symbol: str
    trade_id: int
    price: int
    qty: int
    taker_side: int
    ts: int
    seq: int


@dataclass(slots=True)
class Folded:
    """What one batch of entries did: order states touched (final state), fills and trades."""

    orders: dict[int, OrderState] = field(default_factory=dict)
    fills: list[Fill] = field(default_factory=list)
    trades: list[Trade] = field(default_factory=list)


def new_order(seq: int, ts: int, command: dict, accepted: tuple) -> OrderState:
    _, symbol, oid, account, side, price, qty = accepted
    tif = command.get("tif", E.GTC)
    kind = command.get("kind", E.LIMIT)
    # Positional, in OrderState's field order: one of these per accepted order, and keywords
    # cost a third more.
    return OrderState(oid, account, symbol, side, kind, tif, bool(command.get("post_only", False)), price, qty, qty,
                      0, 0, 0, command.get("cash_cap"), command.get("expire_ts") if tif == E.GTD else None,
                      command.get("coid"), "new", None, ts, ts, [], 0, seq, seq)


def _changing(orders: dict[int, OrderState], o: OrderState, seq: int, fresh: int,
              watched: Container[int]) -> OrderState:
    """`o`, about to be changed by entry `seq`: a copy put in its place when an earlier entry's
    state of it is still to be shown (see :func:`fold`)."""
    if fresh <= o.seq < seq and (o.answered == o.seq or o.account in watched):
        o = orders[o.order_id] = _copied(o)
    o.seq = seq
    return o


def fold(seq: int, ts: int, command: dict, events: Iterable[Any], orders: dict[int, OrderState],
         out: Folded | None = None, keep_fills: bool = False, fresh_from: int | None = None,
         watched: Container[int] = ()) -> Folded:
    """Apply one journal entry to `orders` (open orders by id, changed in place; closed orders
    stay in it until the caller drops them) and record what changed in `out`.

    `fresh_from`: an order last changed by an entry from `fresh_from` on (an earlier entry of the
    same commit) is copied before this entry changes it when that state is still to be shown:
    the earlier entry was its owner's command (answered with it), or its owner's account is
    `watched` (the private feed shows each entry's state). That entry's `out` then goes on
    showing the order as the entry left it; other orders change in place (a copy per maker and
    trade cost a tenth of the in-process order rate)."""
    out = out or Folded()
    touched = out.orders
    fresh = fresh_from if fresh_from is not None else seq + 1
    owner = command.get("account")
    for ev in events:
        kind = ev[0]
        if kind == E.EV_LEVEL:
            continue
        if kind == E.EV_ACCEPTED:
            o = orders[ev[2]] = new_order(seq, ts, command, ev)
            touched[o.order_id] = o
        elif kind == E.EV_TRADE:
            (_, symbol, tid, taker, maker, _, _, taker_side, price, qty, value, bfee, sfee) = ev
            out.trades.append(Trade(symbol, tid, price, qty, taker_side, ts, seq))
            for oid, is_maker in ((taker, False), (maker, True)):
                o = orders.get(oid)
                if o is None:
                    raise KeyError(f"trade {symbol}:{tid} names order {oid}, which the history does not know")
                o = _changing(orders, o, seq, fresh, watched)
                fee = bfee if o.side == E.BID else sfee
                f = Fill(symbol, tid, oid, o.account, o.side, is_maker, price, qty, value, fee, ts, seq)
                out.fills.append(f)
                if keep_fills:
                    o.fills.append(f)
                    if len(o.fills) >= 2 * VIEW_FILLS:
                        del o.fills[:-VIEW_FILLS]
                o.filled += qty
                o.remaining -= qty
                o.value += value
                o.notional += price * qty
                o.fee += fee
                o.updated_ts = ts
                o.status = "filled" if o.remaining == 0 else "partially_filled"
                touched[oid] = o
        elif kind == E.EV_CANCELLED or kind == E.EV_EXPIRED:
            o = orders.get(ev[2])
            if o is None:
                raise KeyError(f"entry {seq} closes order {ev[2]}, which the history does not know")
            o = _changing(orders, o, seq, fresh, watched)
            if o.account == owner:
                o.answered = seq
            o.remaining = 0
            o.status = "expired" if kind == E.EV_EXPIRED else "cancelled"
            o.reason = "expired" if kind == E.EV_EXPIRED else E.CANCEL_NAMES.get(ev[4], str(ev[4]))
            o.updated_ts = ts
            touched[o.order_id] = o
        elif kind == E.EV_AMENDED:
            _, symbol, oid, price, qty = ev[:5]
            o = orders.get(oid)
            if o is None:
                raise KeyError(f"entry {seq} amends order {oid}, which the history does not know")
            o = _changing(orders, o, seq, fresh, watched)
            o.answered = seq  # only its owner amends it
            o.price, o.remaining, o.quantity = price, qty, o.filled + qty
            o.updated_ts = ts
            touched[oid] = o
    return out


def average_price(o: OrderState) -> int | None:
    """Fen per tonne, half-up, over the order's fills (None before the first)."""
    if not o.filled:
        return None
    return (o.notional * 2 + o.filled) // (2 * o.filled)


# ---- the database consumer ----------------------------------------------------------------------

_ORDER_COLUMNS = ("order_id", "account_id", "symbol", "side", "type", "time_in_force", "post_only", "price_fen",
                  "quantity_kg", "remaining_kg", "filled_kg", "value_fen", "fee_fen", "max_cash_fen", "expire_ts",
                  "client_order_id", "status", "reason", "created_ts", "updated_ts", "notional")
_ORDER_TYPES = ("bigint", "bigint", "text", "text", "text", "text", "boolean", "bigint", "bigint", "bigint", "bigint",
                "bigint", "bigint", "bigint", "bigint", "text", "text", "text", "bigint", "bigint", "numeric")
_MUTABLE = ("price_fen", "quantity_kg", "remaining_kg", "filled_kg", "value_fen", "fee_fen", "status", "reason",
            "updated_ts", "notional")
# An order is written once when placed (COPY, the cheap path) and updated when it changes: its id
# is the journal seq of the command that placed it, so among the orders a write touches those
# with ids from the write's first entry on are new, and all others are rows already there (the
# position moves with the rows, in one transaction). The upsert this replaced encoded and
# decoded all 20 columns of every touched order as arrays: 15 us per journal entry.
_UPDATE = (
    "UPDATE orders o SET " + ", ".join(f"{c} = u.{c}" for c in _MUTABLE)
    + " FROM unnest($1::bigint[], "
    + ", ".join(f"${i + 2}::{_ORDER_TYPES[_ORDER_COLUMNS.index(c)]}[]" for i, c in enumerate(_MUTABLE))
    + f") AS u(order_id, {', '.join(_MUTABLE)}) WHERE o.order_id = u.order_id"
)
_MUTABLE_AT = tuple(_ORDER_COLUMNS.index(c) for c in _MUTABLE)


def order_record(o: OrderState) -> tuple:
    return (o.order_id, o.account, o.symbol, SIDE[o.side], KIND[o.kind], TIF[o.tif], o.post_only, o.price,
            o.quantity, o.remaining, o.filled, o.value, o.fee, o.max_cash, o.expire_ts, o.client_order_id,
            o.status, o.reason, o.created_ts, o.updated_ts, o.notional)


def order_from_row(r: asyncpg.Record) -> OrderState:
    return OrderState(
        order_id=r["order_id"], account=r["account_id"], symbol=r["symbol"], side=SIDE.index(r["side"]),
        kind=KIND.index(r["type"]), tif=TIF.index(r["time_in_force"]), post_only=r["post_only"],
        price=r["price_fen"], quantity=r["quantity_kg"], remaining=r["remaining_kg"], filled=r["filled_kg"],
        value=r["value_fen"], fee=r["fee_fen"], max_cash=r["max_cash_fen"], expire_ts=r["expire_ts"],
        client_order_id=r["client_order_id"], status=r["status"], reason=r["reason"], created_ts=r["created_ts"],
        updated_ts=r["updated_ts"], notional=int(r["notional"]))


def trade_from_row(r: asyncpg.Record) -> Trade:
    return Trade(r["symbol"], r["trade_id"], r["price_fen"], r["qty_kg"], SIDE.index(r["taker_side"]), r["ts"],
                 r["seq"])


def fill_from_row(r: asyncpg.Record) -> Fill:
    return Fill(r["symbol"], r["trade_id"], r["order_id"], r["account_id"], SIDE.index(r["side"]),
                r["liquidity"] == "maker", r["price_fen"], r["qty_kg"], r["value_fen"], r["fee_fen"], r["ts"], r["seq"])


def _order_ids(events: list) -> set[int]:
    ids: set[int] = set()
    for ev in events:
        k = ev[0]
        if k == E.EV_TRADE:
            ids.add(ev[3])
            ids.add(ev[4])
        elif k in (E.EV_CANCELLED, E.EV_EXPIRED, E.EV_AMENDED):
            ids.add(ev[2])
    return ids


async def project(conn: asyncpg.Connection, limit: int = BATCH, upto: int | None = None) -> int:
    """Fold up to `limit` journal entries past the stored position into the history tables."""
    async with conn.transaction():
        start = await lock_position(conn, NAME)
        rows = await read(conn, start, limit, upto)
        if not rows:
            return 0
        entries = [(r["seq"], r["ts"], orjson.loads(r["command"]), orjson.loads(r["events"])) for r in rows]
        wanted: set[int] = set()
        for _, _, _, evs in entries:
            wanted |= _order_ids(evs)
        orders: dict[int, OrderState] = {}
        if wanted:
            for r in await conn.fetch("SELECT * FROM orders WHERE order_id = ANY($1::bigint[])", list(wanted)):
                orders[r["order_id"]] = order_from_row(r)
        out = Folded()
        for seq, ts, command, evs in entries:
            fold(seq, ts, command, evs, orders, out)
        await _write(conn, entries[0][0], [order_record(o) for o in out.orders.values()], out.fills, out.trades)
        await save_position(conn, NAME, entries[-1][0])
        return len(rows)


async def _write(conn: asyncpg.Connection, first: int, orders: list[tuple], fills: list[Fill],
                 trades: list[Trade]) -> None:
    """Write what entries `first`.. did: `orders` as records (order_record), fills and trades."""
    placed = [r for r in orders if r[0] >= first]
    changed = [[r[0], *(r[i] for i in _MUTABLE_AT)] for r in orders if r[0] < first]
    if placed:
        await conn.copy_records_to_table("orders", columns=_ORDER_COLUMNS, records=placed)
    if changed:
        status = await conn.execute(_UPDATE, *[list(col) for col in zip(*changed, strict=True)])
        if status != f"UPDATE {len(changed)}":  # a changed order must be there: never skip one silently
            raise RuntimeError(f"history: {len(changed)} orders to update before entry {first}, {status}")
    if fills:
        await conn.copy_records_to_table(
            "fills", columns=("symbol", "trade_id", "order_id", "account_id", "side", "liquidity", "price_fen",
                              "qty_kg", "value_fen", "fee_fen", "ts", "seq"),
            records=[(f.symbol, f.trade_id, f.order_id, f.account, SIDE[f.side], "maker" if f.maker else "taker",
                      f.price, f.qty, f.value, f.fee, f.ts, f.seq) for f in fills])
    if trades:
        await conn.copy_records_to_table(
            "trades", columns=("symbol", "trade_id", "price_fen", "qty_kg", "taker_side", "ts", "seq"),
            records=[(t.symbol, t.trade_id, t.price, t.qty, SIDE[t.taker_side], t.ts, t.seq) for t in trades])


@dataclass(slots=True)
class Batch:
    """What the service's tracker folded from committed entries `first..last`: the touched orders
    as records at `last`, and the fills and trades, ready to write without folding again."""

    first: int
    last: int
    orders: dict[int, tuple]
    fills: list[Fill]
    trades: list[Trade]


async def write_folded(conn: asyncpg.Connection, batches: list[Batch]) -> None:
    """Write consecutive folded batches with the position, in one transaction; if the stored
    position is not where they start (another writer, or a restart between), fold from the
    journal instead, which gives the same rows."""
    if not batches:
        return
    first, last = batches[0].first, batches[-1].last
    async with conn.transaction():
        start = await lock_position(conn, NAME)
        if start == first - 1:
            orders: dict[int, tuple] = {}
            fills: list[Fill] = []
            trades: list[Trade] = []
            for b in batches:
                orders.update(b.orders)
                fills.extend(b.fills)
                trades.extend(b.trades)
            await _write(conn, first, list(orders.values()), fills, trades)
            await save_position(conn, NAME, last)
            return
    if start < last:
        await catch_up(conn, upto=last)


async def catch_up(conn: asyncpg.Connection, upto: int | None = None, limit: int = BATCH) -> int:
    done = 0
    while n := await project(conn, limit, upto):
        done += n
    return done


# ---- the in-memory view -------------------------------------------------------------------------

class OrderTracker:
    """Open orders (and the most recently closed ones) with their fills, kept by folding every
    committed journal entry in order; loaded from the history tables at start-up."""

    def __init__(self) -> None:
        self.open: dict[int, OrderState] = {}
        self.recent: OrderedDict[int, OrderState] = OrderedDict()
        # The last commit's orders as each of its entries left them, for that entry's answer.
        self._as_of: dict[int, dict[int, OrderState]] = {}
        # Accounts whose every change is shown (the private feed's subscribers; api/feed.py sets it).
        self.watched: Container[int] = ()

    async def load(self, conn: asyncpg.Connection | asyncpg.Pool) -> None:
        rows = await conn.fetch("SELECT * FROM orders WHERE status IN ('new', 'partially_filled')")
        self.open = {r["order_id"]: order_from_row(r) for r in rows}
        for o in self.open.values():
            o.earlier_fills = o.filled > 0

    def apply_commit(self, entries: list[tuple[int, int, dict, list]]) -> list[Folded]:
        """Fold one commit's entries in order. Each entry's Folded (and :meth:`as_of` its seq)
        shows its orders as that entry left them: an amend answered after the cancel behind it
        in the same commit said "cancelled"."""
        first = entries[0][0]
        folded = [self.apply(seq, ts, command, events, first) for seq, ts, command, events in entries]
        self._as_of = {entry[0]: f.orders for entry, f in zip(entries, folded, strict=True)}
        return folded

    def as_of(self, seq: int, order_id: int) -> OrderState | None:
        """The order as entry `seq` left it, if that entry is of the last commit and touched it;
        else None (the tracker no longer knows: :meth:`get` has the order as it stands)."""
        touched = self._as_of.get(seq)
        return touched.get(order_id) if touched else None

    def apply(self, seq: int, ts: int, command: dict, events: list, fresh_from: int | None = None) -> Folded:
        out = fold(seq, ts, command, events, self.open, keep_fills=True, fresh_from=fresh_from, watched=self.watched)
        for oid, o in out.orders.items():
            if o.status not in OPEN:
                self.open.pop(oid, None)
                self.recent[oid] = o
        while len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        return out

    def get(self, order_id: int) -> OrderState | None:
        return self.open.get(order_id) or self.recent.get(order_id)
