"""Request and response shapes of the REST API (pydantic), which also make /openapi.json.

Requests are validated here for form (types, enums, lengths, unknown fields); the exchange then
checks the trading rules (tick, lot, band, funds). Decimal values travel as strings, exactly as
API.md says; api/orders.py turns them into integers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from exchange.text import UNSAFE_RANGES, unsafe

Decimal = str  # a decimal string such as "13.89" or "1.200"
_DEC = r"^[0-9]+(\.[0-9]+)?$"
Id = Annotated[str, Field(description="an id of the exchange: a string of decimal digits")]
MAX_ID = 2**62


def id_input(value: Any) -> Any:
    """API.md sends ids as strings; a client sends one back as it got it. An integer (the form
    of ids before they were strings) is still taken, so that older clients keep working."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit() and len(value) <= 19):
            raise ValueError(f"an id is a string of decimal digits such as \"12\", got {value[:40]!r}")
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("an id is a string of decimal digits such as \"12\"")


IdInput = Annotated[int, BeforeValidator(id_input), Field(ge=1, le=MAX_ID), WithJsonSchema({
    "anyOf": [{"type": "string", "pattern": "^[0-9]{1,19}$"}, {"type": "integer", "minimum": 1, "maximum": MAX_ID}],
    "description": "an id as the exchange sent it (a string of digits); an integer is accepted too"})]


MAX_SERIAL_NUMBER = 9_999_999_999  # serial numbers have ten digits (exchange/serials.py)


def serial_number_input(value: Any) -> Any:
    """A serial number as a cursor carries it: the first unit of a block, in decimal digits (the
    number a serial text starts with, without its zero padding or with it)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        return int(value)
    raise ValueError(f"a serial number is a string of up to ten decimal digits such as \"1201\", "
                     f"got {str(value)[:40]!r}")


SerialNumberInput = Annotated[int, BeforeValidator(serial_number_input), Field(ge=1, le=MAX_SERIAL_NUMBER),
                              WithJsonSchema({"type": "string", "pattern": "^[0-9]{1,10}$",
                                              "description": "a serial number"})]


# Characters no text of a request may hold: exchange/text.py's rule, which the exchange's own
# checks share.
TEXT_PATTERN = f"^[^{UNSAFE_RANGES}]*$"  # the rule as /openapi.json states it (Python's and ECMA-262's regex alike)


def _unsafe(value: str) -> str | None:
    """Why `value` is not plain text, or None."""
    return unsafe(value)


def plain_text(value: str) -> str:
    """Text a person reads back (names, beneficiaries, references, reasons): refused with a message
    that the route prefixes with the field's name (api/rest.py)."""
    why = _unsafe(value)
    if why is not None:
        raise PydanticCustomError("plain_text", why)
    return value


# Every free-text and name field of a request; the pattern lets schema-driven clients (and
# schemathesis) generate valid text. Lengths are each field's own.
Text = Annotated[str, AfterValidator(plain_text), Field(json_schema_extra={"pattern": TEXT_PATTERN})]


def payment_reference(value: str) -> str:
    """A payment reference as the core and the ledger take it: printable, not only spaces (the
    ledger's CHECK trims spaces), at most 100 characters (the field's max_length); read without
    surrounding spaces, so that a retry whose reference gained or lost one is a repeat, not a
    second payment (review32), as issuance references are read."""
    if not value.strip(" "):
        raise PydanticCustomError("blank_reference", "must not be blank (only spaces)")
    if not value.isprintable():
        at, ch = next((i, c) for i, c in enumerate(value) if not c.isprintable())
        raise PydanticCustomError("unprintable_reference",
                                  f"must be printable characters (no control, format or separator characters other "
                                  f"than the space): U+{ord(ch):04X} at position {at}")
    return value.strip(" ")


PaymentReference = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(plain_text),
                             AfterValidator(payment_reference),
                             Field(json_schema_extra={"pattern": f"^ *[^ {UNSAFE_RANGES}][^{UNSAFE_RANGES}]*$",
                                                      "description": "1-100 printable characters, not only spaces; "
                                                                     "the payment's idempotency key"})]


@dataclass(frozen=True, slots=True)
class FillCursor:
    """Where a page of a member's fills ends: the last fill's place in their order, newest first by
    (seq, symbol, trade_id, side) descending. The fills table's key is (symbol, trade_id, side),
    so the order is total: one command (one seq) may fill many times, and one account could be on
    both sides of a trade; a page boundary inside either skips and repeats nothing."""

    seq: int
    symbol: str
    trade_id: int
    side: str

    def __str__(self) -> str:
        # The symbol goes last because it is the one part whose characters the cursor does not
        # choose; the rest are digits and a word, so the string splits back unambiguously.
        return f"{self.seq}.{self.trade_id}.{self.side}.{self.symbol}"


_CURSOR = re.compile(r"([1-9][0-9]{0,18})\.([1-9][0-9]{0,18})\.(buy|sell)\.(.{1,40})")
CURSOR_PATTERN = f"^{_CURSOR.pattern}$"  # the same rule, as /openapi.json states it


def fill_cursor(text: str) -> FillCursor:
    """A cursor as GET /v1/fills wrote it in a Link header, exactly: one spelling per fill (no
    leading zeros, signs or spaces), so that a cursor is either the server's or refused. The
    symbol is checked against the listings by the route, which knows them. ValueError if not."""
    m = _CURSOR.fullmatch(text)
    if m is None or int(m[1]) > MAX_ID or int(m[2]) > MAX_ID:
        raise ValueError(f"not a fills cursor: give the before= of a Link header of GET /v1/fills unchanged, "
                         f"got {text[:60]!r}")
    return FillCursor(int(m[1]), m[4], int(m[2]), m[3])


# The query parameter is a plain string for FastAPI (which takes no dataclass there); the route
# parses it with fill_cursor so that a malformed cursor gets a detail saying what a cursor is.
CursorText = Annotated[str, WithJsonSchema({
    "type": "string", "pattern": CURSOR_PATTERN, "maxLength": 85,
    "description": "an opaque cursor: the before= of the previous page's Link header"})]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str


class OrderRequest(Strict):
    symbol: Text = Field(min_length=1, max_length=40)
    side: Literal["buy", "sell"]
    type: Literal["limit", "market"] = "limit"
    price: Decimal | None = Field(default=None, pattern=_DEC, max_length=24)
    quantity: Decimal = Field(pattern=_DEC, max_length=24)
    time_in_force: Literal["GTC", "GTD", "IOC", "FOK"] | None = None
    expire_time: str | None = Field(default=None, max_length=40, description="ISO 8601, for GTD")
    post_only: StrictBool = False  # true or false: "yes" and 1 were taken as true
    max_cash: Decimal | None = Field(default=None, pattern=_DEC, max_length=24, description="market buys: CNY cap")
    client_order_id: Text | None = Field(default=None, min_length=1, max_length=64)


class AmendRequest(Strict):
    quantity: Decimal | None = Field(default=None, pattern=_DEC, max_length=24)
    price: Decimal | None = Field(default=None, pattern=_DEC, max_length=24)


class Fill(BaseModel):
    trade_id: str
    order_id: str
    symbol: str
    side: Literal["buy", "sell"]
    liquidity: Literal["maker", "taker"]
    price: Decimal
    quantity: Decimal
    value: Decimal
    fee: Decimal
    time: str | None


class Order(BaseModel):
    order_id: str
    client_order_id: str | None
    symbol: str
    side: Literal["buy", "sell"]
    type: Literal["limit", "market"]
    time_in_force: Literal["GTC", "GTD", "IOC", "FOK"]
    post_only: bool
    price: Decimal | None
    quantity: Decimal
    status: Literal["new", "partially_filled", "filled", "cancelled", "rejected", "expired"]
    reason: str | None
    filled_quantity: Decimal
    remaining_quantity: Decimal
    average_price: Decimal | None
    filled_value: Decimal
    fees: Decimal
    max_cash: Decimal | None
    expire_time: str | None
    created_at: str | None
    updated_at: str | None
    fills: list[Fill]


class CancelAll(BaseModel):
    cancelled: list[Order]


class Holding(BaseModel):
    symbol: str
    available: Decimal
    encumbered: Decimal
    locked: Decimal = Field(description="bought today; sellable from the next trading day (T+1)")


SelfTradePrevention = Literal["cancel_resting", "cancel_incoming", "cancel_both"]


class AccountView(BaseModel):
    code: str
    name: str
    kind: str
    role: str
    cash_available: Decimal
    cash_reserved: Decimal
    holdings: list[Holding]
    retired: list[dict[str, str]] = Field(description="retired tonnes per project vintage")
    frozen: list[dict[str, str]] = Field(description="frozen tonnes per project vintage: still the account's in "
                                                     "the registry, but out of trading until an operator unfreezes "
                                                     "them")
    self_trade_prevention: SelfTradePrevention


class AccountSettings(Strict):
    self_trade_prevention: SelfTradePrevention = Field(
        description="when an order of this account would trade with another of its own: cancel the resting one "
                    "(the default), the incoming one, or both")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    seq: int
    durable_seq: int
    instruments: int
    time: str | None


class Band(BaseModel):
    low: Decimal
    high: Decimal


class Instrument(BaseModel):
    symbol: str
    project: str | None
    project_name: str | None
    vintage: int | None
    methodology: str | None
    tick: Decimal
    lot: Decimal
    min_quantity: Decimal
    price_band: Band | None
    band_percent: Decimal
    reference_price: Decimal | None
    session: Literal["open", "closed", "halted"]
    maker_fee_bp: int
    taker_fee_bp: int
    resale_rule: Literal["T+1", "T+0"]


class Book(BaseModel):
    symbol: str
    seq: int
    bids: list[list[str]]
    asks: list[list[str]]
    checksum: int


class TradeView(BaseModel):
    symbol: str
    trade_id: str
    price: Decimal
    quantity: Decimal
    taker_side: Literal["buy", "sell"]
    time: str | None


class Ticker(BaseModel):
    symbol: str
    last: Decimal | None
    open: Decimal | None
    high: Decimal | None
    low: Decimal | None
    volume: Decimal
    vwap: Decimal | None
    time: str | None


class Candle(BaseModel):
    start: str
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    trades: int


class IssuanceSummary(BaseModel):
    id: Id
    vintage: int
    serial: str
    quantity: Decimal


class ProjectView(BaseModel):
    code: str
    scheme: str
    name: str
    methodology: str
    region: str
    developer: str
    status: str
    issued: Decimal | None = None
    retired: Decimal | None = None
    traded: Decimal | None = None
    issuances: list[IssuanceSummary] | None = None


class Block(BaseModel):
    serial: str
    quantity: Decimal
    holder: str
    state: str
    certificate_code: str | None


class IssuanceView(BaseModel):
    id: Id
    project: str
    vintage: int
    serial: str
    quantity: Decimal
    issued_to: str
    blocks: list[Block] = Field(description="a page of the issuance's blocks in serial order, `limit` of them; "
                                            "the Link header rel=\"next\" gives the next page")


class IssuanceResult(IssuanceView):
    replayed: bool = Field(description="true: issued earlier under this reference, nothing new (status 200)")


class Movement(BaseModel):
    id: Id = Field(description="the transfer's id; a serial's history is in id order, and `after=` takes it")
    serial: str
    quantity: Decimal
    from_account: str | None
    from_state: str | None
    to_account: str
    to_state: str
    cause: str
    reference: str
    time: str | None


class SerialView(BaseModel):
    serial: str
    issuance_id: Id
    history: list[Movement] = Field(description="a page of the movements that touched the range, oldest first, "
                                                "`limit` of them; the Link header rel=\"next\" gives the next page")
    holders: list[Block] = Field(description="a page of who holds the range now, in serial order, `limit` of them; "
                                             "the Link header rel=\"next-holders\" gives the next page")


class RetirementView(BaseModel):
    id: Id
    certificate_code: str
    account: str
    beneficiary: str
    purpose: str
    quantity: Decimal
    time: str | None
    serials: list[str]


class Certificate(BaseModel):
    certificate_code: str
    beneficiary: str
    purpose: str
    quantity: Decimal
    account: str
    time: str | None
    ranges: list[dict[str, str | int]]
    verified: bool


class RetireRequest(Strict):
    symbol: Text | None = Field(default=None, min_length=1, max_length=40)
    issuance_id: IdInput | None = None
    quantity: Decimal = Field(pattern=_DEC, max_length=24)
    beneficiary: Text = Field(min_length=1, max_length=200)
    purpose: Text = Field(min_length=1, max_length=500)


class AccountRequest(Strict):
    code: Text = Field(min_length=1, max_length=40)
    name: Text = Field(default="", max_length=200)
    kind: Literal["operator", "project_developer", "enterprise", "scenic_area", "event_organiser", "individual"]
    role: Literal["operator", "member"] | None = Field(default=None, description="operator for kind operator, "
                                                      "member for every other kind (the default)")


class AccountCreated(BaseModel):
    code: str
    name: str
    kind: str
    role: str
    api_key: str


class KeyRequest(Strict):
    revoke_others: bool = Field(default=False, description="revoke the account's earlier keys in the same step")


class KeyIssued(BaseModel):
    account: str
    api_key: str
    revoked: int


class KeysRevoked(BaseModel):
    account: str
    revoked: int


class PaymentRequest(Strict):
    amount: Decimal = Field(pattern=_DEC, max_length=24)
    reference: PaymentReference


class PaymentView(BaseModel):
    account: str
    direction: Literal["deposit", "withdrawal"]
    amount: Decimal
    reference: str
    seq: int | None
    duplicate: bool


class ProjectRequest(Strict):
    code: Text = Field(min_length=1, max_length=32)
    name: Text = Field(min_length=1, max_length=200)
    methodology: Literal["forest_carbon_sink", "grassland_carbon_sink", "wetland_carbon_sink", "energy_substitution",
                         "renewable_energy", "energy_efficiency", "methane_recovery", "low_carbon_transport", "other"]
    developer: Text = Field(min_length=1, max_length=40)
    region: Text = Field(default="", max_length=100)
    scheme: Text = Field(default="CDHF", min_length=2, max_length=16)


class IssuanceRequest(Strict):
    project: Text = Field(min_length=1, max_length=32)
    vintage: StrictInt = Field(ge=1990, le=2100)  # a JSON integer: "2023" and 2023.0 were taken
    quantity: Decimal = Field(pattern=_DEC, max_length=24)
    to_account: Text | None = Field(default=None, min_length=1, max_length=40)
    reference: Text = Field(default="", max_length=200)


class SerialRequest(Strict):
    serial: Text = Field(min_length=1, max_length=120)
    reason: Text = Field(min_length=1, max_length=500)


class SerialResult(BaseModel):
    serials: list[str]
    quantity: Decimal
    replayed: bool = Field(description="true when this is what an earlier request with the same Idempotency-Key "
                                        "moved (nothing was moved now)")


class ListingRequest(Strict):
    symbol: Text = Field(min_length=6, max_length=40)
    tick: Decimal = Field(default="0.01", pattern=_DEC, max_length=24)
    lot: Decimal = Field(default="1.000", pattern=_DEC, max_length=24)
    min_quantity: Decimal | None = Field(default=None, pattern=_DEC, max_length=24)
    band_percent: Decimal = Field(default="10", pattern=_DEC, max_length=8)
    reference_price: Decimal | None = Field(default=None, pattern=_DEC, max_length=24)
    # JSON integers and booleans: "5", true (a 1 bp fee) and "yes" were taken.
    maker_fee_bp: StrictInt = Field(default=0, ge=0, le=1000)
    taker_fee_bp: StrictInt = Field(default=0, ge=0, le=1000)
    resale_rule: Literal["T+1", "T+0"] = "T+1"
    always_open: StrictBool = False


class EstimateLine(BaseModel):
    category: str
    field: str
    factor: str
    factor_value: str
    factor_unit: str
    factor_status: str
    quantity: str
    quantity_unit: str
    co2e: Decimal = Field(description="tonnes CO2e of this line")


class Estimate(BaseModel):
    factor_table_version: str
    total: Decimal = Field(description="tonnes CO2e, half-up to the kg")
    offset: Decimal = Field(description="tonnes to offset: the exact footprint rounded up to the kg (an offset then "
                                        "rounds it up to the instrument's lot)")
    categories: dict[str, Decimal]
    lines: list[EstimateLine]
    attendees: int | None
    days: int | None
    per_attendee_day: Decimal | None = Field(description="tonnes CO2e per attendee and day")
    rounding: str


class OffsetRequest(Strict):
    symbol: Text = Field(min_length=1, max_length=40)
    activity: dict | None = Field(default=None, description="activity data as for /neutrality/estimate")
    quantity: Decimal | None = Field(default=None, pattern=_DEC, max_length=24, description="tonnes, instead of "
                                     "an activity")
    max_cash: Decimal = Field(pattern=_DEC, max_length=24, description="the most to spend, fees included (CNY)")
    beneficiary: Text = Field(min_length=1, max_length=200)
    purpose: Text = Field(min_length=1, max_length=500)


class OffsetResult(BaseModel):
    estimate: Estimate | None
    quantity: Decimal
    order_id: str
    cost: Decimal
    retirement: RetirementView
    certificate_url: str


class BinanceDepth(BaseModel):
    lastUpdateId: int
    bids: list[list[str]]
    asks: list[list[str]]


class BinanceError(BaseModel):
    """Binance's error body (its spot API's error codes), answered by the compatibility routes."""

    code: int
    msg: str
