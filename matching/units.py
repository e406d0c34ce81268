"""Units of the exchange: parsing and formatting the wire's decimal strings, and cash arithmetic.

Internally a quantity is an integer number of kilograms of CO2e, a price is integer fen per tonne
and cash is integer fen. The wire speaks tonnes (3 decimals), CNY per tonne (2 decimals) and CNY
(2 decimals) as decimal strings. Input with more decimals than allowed is rejected, never rounded.
No float ever touches these values.
"""

from __future__ import annotations

import re

KG_PER_TONNE = 1000

_DECIMAL = re.compile(r"^(?P<sign>-?)(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]+))?$")  # ASCII digits only


class UnitError(ValueError):
    """A decimal string that cannot be read as the unit asked for; `code` is the API error code."""

    def __init__(self, message: str, code: str = "invalid_decimal") -> None:
        super().__init__(message)
        self.code = code


def parse_decimal(text: str, places: int, what: str) -> int:
    """Read a decimal string as an integer count of 10**-places units, exactly.

    `what` names the value in error messages. Signs are allowed here; callers that need positive
    values check them, so the error can say which rule was broken.
    """
    if not isinstance(text, str):
        raise UnitError(f"{what} must be a decimal string such as \"1.200\", got {text!r}")
    m = _DECIMAL.match(text.strip())
    if m is None:
        raise UnitError(f"{what} must be a decimal string such as \"1.200\", got {text!r}")
    frac = m.group("frac") or ""
    if len(frac) > places:
        raise UnitError(
            f"{what} {text!r} has {len(frac)} decimals; at most {places} are allowed",
            code="too_many_decimals",
        )
    value = int(m.group("int")) * 10**places + int(frac.ljust(places, "0") or "0")
    return -value if m.group("sign") else value


def format_decimal(value: int, places: int) -> str:
    """Format an integer count of 10**-places units as a string with exactly `places` decimals."""
    if value >= 0 and 0 < places < 19:
        # Every price, quantity and amount on the wire goes through here: one %-format of a
        # divmod is about 40 % cheaper than the general f-string below.
        return _FORMATS[places] % divmod(value, _SCALES[places])
    sign = "-" if value < 0 else ""
    value = abs(value)
    if places == 0:
        return f"{sign}{value}"
    scale = 10**places
    return f"{sign}{value // scale}.{value % scale:0{places}d}"


_FORMATS = {p: f"%d.%0{p}d" for p in range(1, 19)}
_SCALES = {p: 10**p for p in range(1, 19)}


def parse_tonnes(text: str, what: str = "quantity") -> int:
    """Tonnes as a decimal string (≤ 3 decimals) → kilograms."""
    return parse_decimal(text, 3, what)


def format_tonnes(kg: int) -> str:
    """Kilograms → tonnes with 3 decimals: 1200 → "1.200"."""
    return "%d.%03d" % divmod(kg, 1000) if kg >= 0 else format_decimal(kg, 3)  # noqa: UP031 (format_decimal says why)


def parse_price(text: str, what: str = "price") -> int:
    """CNY per tonne as a decimal string (≤ 2 decimals) → fen per tonne."""
    return parse_decimal(text, 2, what)


def format_price(fen_per_tonne: int) -> str:
    """Fen per tonne → CNY per tonne with 2 decimals: 1389 → "13.89"."""
    return "%d.%02d" % divmod(fen_per_tonne, 100) if fen_per_tonne >= 0 else format_decimal(fen_per_tonne, 2)  # noqa: UP031 (format_decimal says why)


def parse_cash(text: str, what: str = "amount") -> int:
    """CNY as a decimal string (≤ 2 decimals) → fen."""
    return parse_decimal(text, 2, what)


def format_cash(fen: int) -> str:
    """Fen → CNY with 2 decimals."""
    return "%d.%02d" % divmod(fen, 100) if fen >= 0 else format_decimal(fen, 2)  # noqa: UP031 (format_decimal says why)


def trade_value_fen(price_fen_per_tonne: int, qty_kg: int) -> int:
    """Cash value of `qty_kg` at `price_fen_per_tonne`, rounded half-up to the fen.

    The one rounding rule for trade values everywhere (DESIGN.md): price × qty / 1000, half-up.
    Both operands are non-negative on every path that calls this.
    """
    return (price_fen_per_tonne * qty_kg * 2 + KG_PER_TONNE) // (2 * KG_PER_TONNE)


def reserve_value_fen(price_fen_per_tonne: int, qty_kg: int) -> int:
    """Cash a buy must reserve for `qty_kg` at `price_fen_per_tonne`: the value rounded up."""
    return -(-(price_fen_per_tonne * qty_kg) // KG_PER_TONNE)


def fee_fen(value_fen: int, rate_bp: int) -> int:
    """A fee of `rate_bp` basis points on `value_fen`, rounded half-up to the fen."""
    return (value_fen * rate_bp * 2 + 10_000) // 20_000


def vwap_fen(sum_price_qty: int, sum_qty: int) -> int:
    """Volume-weighted average price in fen per tonne, half-up, from sum(price × qty) and sum(qty)."""
    return (2 * sum_price_qty + sum_qty) // (2 * sum_qty)


def round_to_tick(price: int, tick: int) -> int:
    """`price` rounded half-up to a multiple of `tick` (at least one tick)."""
    return max((2 * price + tick) // (2 * tick) * tick, tick)
