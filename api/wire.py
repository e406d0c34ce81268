"""The wire format of API.md: decimal strings, times, book checksums, order views, problem codes.

Everything the REST API and the websocket feed send is built here from the integers the
exchange keeps (fen per tonne, kg, fen, UTC microseconds), so the two speak exactly alike.
"""

from __future__ import annotations

import functools
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

from exchange.history import KIND, SIDE, TIF, OrderState, average_price
from matching import events as E
from matching.units import format_cash, format_price, format_tonnes

# The HTTP status of every stable error code the code base can raise, by what the code means
# (api/README.md, Errors). Explicit for each code, so that none gets a status by accident:
# tests/test_api_status_codes.py scans exchange/, matching/, api/ and clearing/ for the codes they
# raise and fails on one missing here.
_BY_STATUS = {
    # The request itself is wrong: malformed, out of range, or naming things that cannot be.
    400: ("invalid_request", "invalid_command", "invalid_json", "too_many_decimals", "invalid_decimal",
          "invalid_activity", "invalid_amount", "invalid_beneficiary", "invalid_certificate", "invalid_code",
          "invalid_expiry", "invalid_factor_table", "invalid_kind", "invalid_methodology", "invalid_name",
          "invalid_order", "invalid_price", "invalid_project", "invalid_purpose", "invalid_quantity",
          "invalid_reason", "invalid_reference", "invalid_role", "invalid_rules", "invalid_serial",
          "invalid_state", "invalid_symbol", "invalid_url", "invalid_vintage", "ambiguous_serial"),
    401: ("unauthorized",),
    403: ("forbidden",),
    404: ("not_found", "unknown_instrument", "unknown_account"),
    405: ("method_not_allowed",),
    # The request is well formed, but the current state forbids it: what exists already, a halt or
    # a closed market, a suspended project, credits in another state, a race lost (busy: retry).
    409: ("duplicate_client_order_id", "duplicate_order_id", "duplicate_reference", "account_exists",
          "project_exists", "instrument_exists", "already_halted", "not_halted", "market_closed", "halted",
          "project_not_active", "credits_available", "credits_encumbered", "credits_frozen", "credits_retired",
          "credits_cancelled", "busy", "service_running", "unsettled_journal", "registry_mismatch",
          "reserved_cash_withdrawn"),
    413: ("payload_too_large",),
    # Business refusals: well formed and allowed in the current state, but the market's rules (tick,
    # lot, band, minimum) or the caller's means (cash, credits) refuse this one.
    422: ("insufficient_funds", "insufficient_credits", "post_only_would_take", "fok_not_fillable",
          "price_out_of_band", "invalid_tick", "invalid_lot", "min_quantity", "offset_not_filled",
          "idempotency_key_reused", "cash_limit"),
    429: ("rate_limited",),
    # The command line's own (no request reaches them): a data directory or DATABASE_URL the
    # embedded server or asyncpg cannot use, a report file that cannot be written, stdin failing.
    500: ("internal_error", "invalid_data_dir", "invalid_database_url", "cannot_write", "stdin_failed"),
    503: ("unavailable",),
}
STATUS = {code: status for status, codes in _BY_STATUS.items() for code in codes}
# Codes only the websocket feed sends (about the connection itself: its buffer, its subscriptions);
# no HTTP request can get them, so they have no status.
FEED_ONLY = frozenset({"slow_consumer", "too_many_subscriptions"})


def http_status(code: str) -> int:
    # An unlisted code is a bug the scan test catches; until then 400 answers it without a 500.
    return STATUS.get(code, 400)


def problem(code: str, detail: str, status: int | None = None) -> dict[str, Any]:
    """An RFC 9457 problem body with the stable machine `code`."""
    status = status or http_status(code)
    return {"type": f"https://carbonx.dev/problems/{code}", "title": code.replace("_", " "), "status": status,
            "detail": detail, "code": code}


_last_iso: tuple[int, str] = (-1, "")


def iso(ts_us: int | None) -> str | None:
    """UTC microseconds as ISO 8601 with a Z."""
    global _last_iso
    if ts_us is None:
        return None
    # An order view names one time three times or more (created, updated, each fill of one
    # command): the last one formatted is usually the one asked for.
    last = _last_iso
    if last[0] == ts_us:
        return last[1]
    seconds, micros = divmod(ts_us, 1_000_000)
    text = "%s.%06dZ" % (_seconds(seconds), micros)  # noqa: UP031 (a %-format is the cheapest here)
    _last_iso = (ts_us, text)
    return text


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_datetime(dt: datetime) -> str:
    """A database time (timestamptz) on the wire exactly as iso() writes times: UTC, microseconds, Z
    (datetime.isoformat would say +00:00 and drop the microseconds when they are zero)."""
    return iso((dt - EPOCH) // timedelta(microseconds=1))


@functools.lru_cache(maxsize=4096)
def _seconds(s: int) -> str:
    # Times on the wire cluster in the current second: formatting it once is most of iso()'s cost.
    return datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def levels(pairs: list[tuple[int, int]]) -> list[list[str]]:
    return [[format_price(p), format_tonnes(q)] for p, q in pairs]


def checksum(asks: list[list[str]], bids: list[list[str]]) -> int:
    """API.md: crc32 of "price:qty" of the top 10 asks ascending then the top 10 bids descending,
    joined by ":", over the exact wire strings."""
    parts = [f"{p}:{q}" for p, q in asks[:10]] + [f"{p}:{q}" for p, q in bids[:10]]
    return zlib.crc32(":".join(parts).encode()) & 0xFFFFFFFF


def market_status(rules: Any, halted: bool, ts: int) -> dict[str, Any]:
    """An instrument's session at `ts`, reference price and band under `rules` (InstrumentRules),
    as REST's instrument and the feed's instruments channel show them."""
    band = rules.band()
    return {"session": "halted" if halted else "open" if rules.is_open(ts) else "closed",
            "reference_price": format_price(rules.reference_price) if rules.reference_price is not None else None,
            "price_band": {"low": format_price(band[0]), "high": format_price(band[1])} if band else None}


def side_name(side: int) -> str:
    return SIDE[side]


def fill_view(f: Any) -> dict[str, Any]:
    return {"trade_id": str(f.trade_id), "order_id": str(f.order_id), "symbol": f.symbol, "side": SIDE[f.side],
            "liquidity": "maker" if f.maker else "taker", "price": format_price(f.price),
            "quantity": format_tonnes(f.qty), "value": format_cash(f.value), "fee": format_cash(f.fee),
            "time": iso(f.ts)}


def order_view(o: OrderState, fills: list | None = None) -> dict[str, Any]:
    avg = average_price(o)
    return {
        "order_id": str(o.order_id), "client_order_id": o.client_order_id, "symbol": o.symbol,
        "side": SIDE[o.side], "type": KIND[o.kind], "time_in_force": TIF[o.tif], "post_only": o.post_only,
        "price": format_price(o.price) if o.kind == E.LIMIT else None,
        "quantity": format_tonnes(o.quantity), "status": o.status, "reason": o.reason,
        "filled_quantity": format_tonnes(o.filled), "remaining_quantity": format_tonnes(o.remaining),
        "average_price": format_price(avg) if avg is not None else None,
        "filled_value": format_cash(o.value), "fees": format_cash(o.fee),
        "max_cash": format_cash(o.max_cash) if o.max_cash is not None else None,
        "expire_time": iso(o.expire_ts) if o.expire_ts else None,
        "created_at": iso(o.created_ts), "updated_at": iso(o.updated_ts),
        "fills": [fill_view(f) for f in (o.fills if fills is None else fills)],
    }
