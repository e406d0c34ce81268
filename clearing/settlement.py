"""What the journal means for the registry and the ledger: a pure plan, no I/O.

:func:`plan` reads journal entries (sequence number, timestamp and decoded events, layouts in
matching/core.py) in order and lists what must happen in the database to follow them:

- payments: deposits and withdrawals (a ledger entry against the custody account each);
- trades: delivery versus payment — the buyer pays value + buyer fee, the seller receives value −
  seller fee, the fees go to the exchange's fee account, and the traded quantity moves from the
  seller's encumbered credits to the buyer's available credits, naming the trade;
- movements in journal order: a sell order encumbers available credits when accepted (or when
  amended upwards) and releases them when cancelled, expired, or amended downwards.

Movements keep journal order because it is what makes each of them possible (a sale must be
encumbered before it is delivered; with the resale rule off, bought credits may be encumbered
again in the same batch). Cash is applied as one set of postings per batch: the ledger checks
balances once per statement, and the core guarantees every balance is non-negative at every
journal position, the batch's last included.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from matching import events as E
from matching.core import EV_DEPOSIT, EV_WITHDRAWAL
from matching.units import trade_value_fen

AVAILABLE = "available"
ENCUMBERED = "encumbered"
_INT = frozenset((int,))


# Named tuples, not frozen dataclasses: a batch makes several per trade, and a frozen dataclass
# costs ~1 us to build (object.__setattr__ per field) against ~0.3 us for a named tuple.
class Payment(NamedTuple):
    seq: int
    account: int
    direction: str  # deposit | withdrawal
    amount: int
    reference: str


class Trade(NamedTuple):
    seq: int
    ts: int
    symbol: str
    trade_id: int
    buyer: int
    seller: int
    price: int
    qty: int
    value: int
    buyer_fee: int
    seller_fee: int

    @property
    def reference(self) -> str:
        return f"trade:{self.symbol}:{self.trade_id}"


class Move(NamedTuple):
    """`qty` kg of `symbol` from (`from_account`, `from_state`) to (`to_account`, `to_state`)."""

    symbol: str
    from_account: int
    from_state: str
    to_account: int
    to_state: str
    qty: int
    cause: str  # encumber | release | trade
    reference: str
    seq: int = 0  # the journal entry it comes from


@dataclass(slots=True)
class Plan:
    payments: list[Payment] = field(default_factory=list)
    trades: list[Trade] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    last_seq: int = 0

    @property
    def symbols(self) -> set[str]:
        return {m.symbol for m in self.moves}


class MalformedEntry(ValueError):
    """A journal entry that cannot be settled as it stands; nothing of its batch is applied."""


def check_trade(ev: list) -> None:
    """Refuse a trade record that is not what the core would have written."""
    # {int} ⊇ the types: one C-level pass (a generator per trade showed in profiles); bools refused.
    if len(ev) != 13 or not isinstance(ev[1], str) or not _INT.issuperset(map(type, ev[2:])):
        raise MalformedEntry(f"trade record has the wrong shape: {ev!r}")
    _, symbol, tid, _, _, buyer, seller, side, price, qty, value, bfee, sfee = ev
    if tid <= 0 or price <= 0 or qty <= 0 or bfee < 0 or sfee < 0 or side not in (E.BID, E.ASK):
        raise MalformedEntry(f"trade {symbol}:{tid}: id, price, quantity, side and fees must be in range")
    if buyer <= 0 or seller <= 0:
        raise MalformedEntry(f"trade {symbol}:{tid}: buyer and seller must be accounts")
    if value != trade_value_fen(price, qty):
        raise MalformedEntry(f"trade {symbol}:{tid}: value {value} is not price × quantity "
                             f"({trade_value_fen(price, qty)})")
    if bfee > value or sfee > value:
        raise MalformedEntry(f"trade {symbol}:{tid}: a fee above the trade's value")


def plan(entries: Iterable[tuple[int, int, list]]) -> Plan:
    """The database work for journal `entries` given as (seq, ts, events) in sequence order;
    raises MalformedEntry for a trade record the core could not have written."""
    out = Plan()
    payments, trades, moves = out.payments, out.trades, out.moves
    for seq, ts, events in entries:
        out.last_seq = seq
        for ev in events:
            kind = ev[0]
            if kind == E.EV_TRADE:
                check_trade(ev)
                _, symbol, tid, _, _, buyer, seller, _, price, qty, value, bfee, sfee = ev
                t = Trade(seq, ts, symbol, tid, buyer, seller, price, qty, value, bfee, sfee)
                trades.append(t)
                moves.append(Move(symbol, seller, ENCUMBERED, buyer, AVAILABLE, qty, "trade", t.reference, seq))
            elif kind == E.EV_ACCEPTED:
                _, symbol, oid, account, side, _, qty = ev
                if side == E.ASK:
                    moves.append(Move(symbol, account, AVAILABLE, account, ENCUMBERED, qty, "encumber",
                                      f"order:{oid}", seq))
            elif kind in (E.EV_CANCELLED, E.EV_EXPIRED):
                symbol, oid, remaining = ev[1], ev[2], ev[3]
                account, side = ev[-2], ev[-1]
                if side == E.ASK and remaining:
                    moves.append(Move(symbol, account, ENCUMBERED, account, AVAILABLE, remaining, "release",
                                      f"order:{oid}", seq))
            elif kind == E.EV_AMENDED:
                _, symbol, oid, _, _, account, side, change = ev
                if side == E.ASK and change > 0:
                    moves.append(Move(symbol, account, AVAILABLE, account, ENCUMBERED, change, "encumber",
                                      f"order:{oid}", seq))
                elif side == E.ASK and change < 0:
                    moves.append(Move(symbol, account, ENCUMBERED, account, AVAILABLE, -change, "release",
                                      f"order:{oid}", seq))
            elif kind in (EV_DEPOSIT, EV_WITHDRAWAL):
                _, account, amount, ref = ev
                payments.append(Payment(seq, account, "deposit" if kind == EV_DEPOSIT else "withdrawal",
                                        amount, ref))
    return out


def netted(moves: list[Move]) -> list[Move]:
    """The batch's movements with each account's encumbrances and releases of a symbol netted:
    net encumbrances first, then the trades in journal order, then net releases.

    Why this order is always possible when the journal order was: take one (symbol, account)
    with E encumbered and R released in the batch, S sold, C0 encumbered at the start, and net
    N = E - R. Journal order ends with C0 + N - S >= 0 encumbered. Netted, the encumbered stock
    before any trade is C0 + max(N, 0) >= C0 + N, and each sale only lowers it, so every trade
    finds its credits, and the final release of max(-N, 0) leaves C0 + N - S >= 0. The one
    thing netting can need that journal order did not is *available* credits up front: a net
    encumbrance of credits the account only receives later in the same batch (bought and resold
    with T+1 off). The caller then falls back to journal order.

    A netted encumbrance or release that stands for one journal movement keeps its reference
    (``order:<id>``); one that stands for several is named ``journal:<first seq>-<last seq>``,
    the range of journal entries whose movements it nets (the orders are in those entries).
    Movements that net to zero disappear: the credits did not move at the end of the batch.
    """
    net: dict[tuple[str, int], list] = {}  # (symbol, account) -> [net qty, first seq, last seq, count, reference]
    trades: list[Move] = []
    for m in moves:
        if m.cause == "trade":
            trades.append(m)
            continue
        q = m.qty if m.cause == "encumber" else -m.qty
        entry = net.get((m.symbol, m.from_account))
        if entry is None:
            net[(m.symbol, m.from_account)] = [q, m.seq, m.seq, 1, m.reference]
        else:
            entry[0] += q
            entry[2] = m.seq
            entry[3] += 1
    before: list[Move] = []
    after: list[Move] = []
    for (symbol, account), (q, first, last, count, ref) in net.items():
        if not q:
            continue
        reference = ref if count == 1 else f"journal:{first}-{last}"
        if q > 0:
            before.append(Move(symbol, account, AVAILABLE, account, ENCUMBERED, q, "encumber", reference, last))
        else:
            after.append(Move(symbol, account, ENCUMBERED, account, AVAILABLE, -q, "release", reference, last))
    return before + trades + after


def postings(plan_: Plan, custody: int, fees: int) -> list[tuple[str, str, int, int]]:
    """(entry kind, entry reference, account, amount) for every cash posting of the plan; each
    entry's postings sum to zero and zero amounts are left out."""
    rows: list[tuple[str, str, int, int]] = []
    for p in plan_.payments:
        sign = 1 if p.direction == "deposit" else -1
        rows.append((p.direction, p.reference, p.account, sign * p.amount))
        rows.append((p.direction, p.reference, custody, -sign * p.amount))
    for t in plan_.trades:
        ref = t.reference
        for account, amount in ((t.buyer, -(t.value + t.buyer_fee)), (t.seller, t.value - t.seller_fee),
                                (fees, t.buyer_fee + t.seller_fee)):
            if amount:
                rows.append(("trade", ref, account, amount))
    return rows
