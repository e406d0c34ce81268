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

# The HTTP status of each stable error code; anything unlisted is a 400 (or 409 for states).
STATUS = {
    "unauthorized": 401, "forbidden": 403, "not_found": 404, "unknown_instrument": 404, "unknown_account": 404,
    "rate_limited": 429, "payload_too_large": 413, "unavailable": 503, "service_running": 409,
    "duplicate_client_order_id": 409, "duplicate_reference": 409, "account_exists": 409, "project_exists": 409,
    "instrument_exists": 409, "already_halted": 409, "not_halted": 409, "market_closed": 409, "halted": 409,
    "insufficient_funds": 422, "insufficient_credits": 422, "post_only_would_take": 422, "fok_not_fillable": 422,
    "price_out_of_band": 422, "invalid_tick": 422, "invalid_lot": 422, "min_quantity": 422,
    "offset_not_filled": 422, "idempotency_key_reused": 422, "internal_error": 500,
}


def http_status(code: str) -> int:
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
