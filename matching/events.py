"""Event and command vocabulary shared by both order books: integer codes, tuples, serialisation.

Every book (the Cython one in cext/ and the reference one in matching/reference.py) reports what it
did as a list of plain tuples of integers whose first element is the event type. Plain int tuples
are immutable, cheap to build in C, compare with ``==`` and serialise byte for byte with
:func:`encode`, which is what makes differential tests, journals and state hashes possible.

Event layouts (all fields are ints):

=============  ===============================================================================
EV_ACCEPTED    (1, order_id, account, side, price, qty)            price 0 for a market order
EV_REJECTED    (2, order_id, code)                                 code: REJECT_* below
EV_TRADE       (3, taker_id, maker_id, taker_account, maker_account, taker_side, price, qty)
EV_CANCELLED   (4, order_id, remaining_qty, reason)                reason: CANCEL_* below
EV_EXPIRED     (5, order_id, remaining_qty)
EV_AMENDED     (6, order_id, new_price, new_qty)                   new_qty = new open quantity
EV_LEVEL       (7, side, price, total_qty_now_at_level)            market data: L2 change
=============  ===============================================================================

Sides: BID=0 (buy), ASK=1 (sell). Prices and quantities are whatever integer unit the caller uses
(the engine uses fen per tonne and kilograms; the replay tool uses ticks and lots).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import orjson

BID = 0
ASK = 1

# Time in force. Market orders ignore it: they never rest (IOC semantics).
GTC = 0
IOC = 1
FOK = 2
GTD = 3

LIMIT = 0
MARKET = 1

# Self-trade prevention, chosen by the incoming (taker) order; applies when taker and maker share
# an account. NONE lets them trade (the replay format has no STP).
STP_NONE = 0
STP_CANCEL_RESTING = 1  # cancel the resting order(s), keep matching the incoming one
STP_CANCEL_INCOMING = 2  # cancel what is left of the incoming order, resting order untouched
STP_CANCEL_BOTH = 3  # cancel the resting order and what is left of the incoming one

# Operations in a run_batch buffer (layout: cext.book.BATCH_STRIDE / ReferenceBook.run_batch).
OP_SUBMIT = 1
OP_CANCEL = 2
OP_MOVE = 3
OP_REDUCE = 4
OP_AMEND = 5
OP_EXPIRE = 6

EV_ACCEPTED = 1
EV_REJECTED = 2
EV_TRADE = 3
EV_CANCELLED = 4
EV_EXPIRED = 5
EV_AMENDED = 6
EV_LEVEL = 7

EVENT_NAMES = {
    EV_ACCEPTED: "accepted",
    EV_REJECTED: "rejected",
    EV_TRADE: "trade",
    EV_CANCELLED: "cancelled",
    EV_EXPIRED: "expired",
    EV_AMENDED: "amended",
    EV_LEVEL: "level",
}

EVENT_FIELDS = {
    EV_ACCEPTED: ("order_id", "account", "side", "price", "qty"),
    EV_REJECTED: ("order_id", "code"),
    EV_TRADE: (
        "taker_id", "maker_id", "taker_account", "maker_account", "taker_side", "price", "qty",
    ),
    EV_CANCELLED: ("order_id", "remaining", "reason"),
    EV_EXPIRED: ("order_id", "remaining"),
    EV_AMENDED: ("order_id", "price", "qty"),
    EV_LEVEL: ("side", "price", "qty"),
}

# Reject codes. The numbering is part of the serialised format: only append.
REJECT_INVALID_QUANTITY = 1
REJECT_INVALID_PRICE = 2
REJECT_DUPLICATE_ORDER_ID = 3
REJECT_NOT_FOUND = 4
REJECT_POST_ONLY_WOULD_TAKE = 5
REJECT_FOK_NOT_FILLABLE = 6
REJECT_INVALID_EXPIRY = 7
REJECT_INVALID_TICK = 8
REJECT_INVALID_LOT = 9
REJECT_PRICE_OUT_OF_BAND = 10
REJECT_MARKET_CLOSED = 11
REJECT_MIN_QUANTITY = 12
REJECT_HALTED = 13
REJECT_INVALID_ORDER = 14  # a combination the rules forbid, e.g. a post-only market order
REJECT_UNKNOWN_INSTRUMENT = 15

REJECT_NAMES = {
    REJECT_INVALID_QUANTITY: "invalid_quantity",
    REJECT_INVALID_PRICE: "invalid_price",
    REJECT_DUPLICATE_ORDER_ID: "duplicate_order_id",
    REJECT_NOT_FOUND: "not_found",
    REJECT_POST_ONLY_WOULD_TAKE: "post_only_would_take",
    REJECT_FOK_NOT_FILLABLE: "fok_not_fillable",
    REJECT_INVALID_EXPIRY: "invalid_expiry",
    REJECT_INVALID_TICK: "invalid_tick",
    REJECT_INVALID_LOT: "invalid_lot",
    REJECT_PRICE_OUT_OF_BAND: "price_out_of_band",
    REJECT_MARKET_CLOSED: "market_closed",
    REJECT_MIN_QUANTITY: "min_quantity",
    REJECT_HALTED: "halted",
    REJECT_INVALID_ORDER: "invalid_order",
    REJECT_UNKNOWN_INSTRUMENT: "unknown_instrument",
}

# Cancel reasons. Only append.
CANCEL_USER = 0  # cancel command, or a reduce to zero
CANCEL_UNFILLED = 1  # IOC or market remainder
CANCEL_SELF_TRADE = 2  # self-trade prevention
CANCEL_CASH_CAP = 3  # market buy stopped by its cash cap
CANCEL_PRICE_BAND = 4  # resting outside the band a day's close moved (roll with cancel_outside_band)

CANCEL_NAMES = {
    CANCEL_USER: "user",
    CANCEL_UNFILLED: "unfilled",
    CANCEL_SELF_TRADE: "self_trade",
    CANCEL_CASH_CAP: "cash_cap",
    CANCEL_PRICE_BAND: "price_band",
}

Event = tuple[int, ...]


def describe(event: Sequence[int]) -> dict[str, object]:
    """A readable dict for one event tuple (logs, API, debugging); not used on the hot path."""
    kind = event[0]
    out: dict[str, object] = {"type": EVENT_NAMES[kind]}
    out.update(zip(EVENT_FIELDS[kind], event[1:], strict=True))
    if kind == EV_REJECTED:
        out["code"] = REJECT_NAMES[event[2]]
    elif kind == EV_CANCELLED:
        out["reason"] = CANCEL_NAMES[event[3]]
    return out


def encode(events: Iterable[Sequence[int]]) -> bytes:
    """Deterministic byte serialisation of an event list: a JSON array of integer arrays."""
    return orjson.dumps([tuple(e) for e in events])


def digest(events: Iterable[Sequence[int]]) -> str:
    """SHA-256 of :func:`encode` — a compact fingerprint for comparing long event streams."""
    return hashlib.sha256(encode(events)).hexdigest()
