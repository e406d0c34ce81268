"""Carbon neutrality for an event or an organisation: a footprint from activity data, and how much to offset.

`estimate_footprint(activity)` turns activity data (venue electricity by grid region, travel by mode,
hotel room-nights, meals, materials, waste) into kg CO2e per category and in total, using the versioned
emission-factor table shipped in `exchange/data/emission_factors.json`; the estimate records the table
version it used, and the table's `history` lists every value an earlier version had, so an estimate made
with an earlier version can still be explained. `quantity_to_offset(total_kg, lot_kg)` is what to buy and
retire: the footprint (`offset_kg`, its exact value rounded up to a whole kg) rounded up to the
instrument's lot.

Numbers: quantities are ints or decimal strings, never floats, and factors are decimal strings, so every
product is exact (`fractions.Fraction`). Each reported figure is rounded half-up exactly once from the
exact value: grams for lines, kilograms for categories and totals (as the API shows them; `categories_g`
keeps grams too). Rounded parts therefore need not add
up to a rounded total. What to offset is rounded up instead, once, from the exact total (`offset_kg`):
half-up would leave up to half a kilogram of the footprint unoffset (review30).

Activity data (every field optional, unknown fields refused):

    {"attendees": 300, "days": 1,
     "electricity": [{"kwh": "1500", "region": "sichuan", "year": 2022}],        # year: latest if omitted
     "travel": [{"mode": "metro", "passenger_km": "4500"},
                {"mode": "high_speed_rail", "people": 20, "km_per_person": "300", "round_trip": true}],
     "hotel_room_nights": 10,
     "meals": [{"kind": "standard", "count": 300}],
     "materials": [{"kind": "paper", "kg": "30"}],
     "waste": [{"kind": "landfill", "kg": "100"}]}

Regions, modes and kinds are whatever the factor table holds (`describe_factor_table()` lists them).
Every refusal is a `CarbonxError` with code `invalid_activity` (an `ActivityError` whose `field` names
the offending field, e.g. `travel[1].mode`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

from exchange.errors import CarbonxError
from matching.units import format_tonnes

CATEGORIES = ("electricity", "travel", "hotel", "meals", "materials", "waste")
ROUNDING = ("exact arithmetic on decimal inputs and factors; each figure rounded half-up once from its exact "
            "value: grams for lines, kilograms for categories and totals")

# Bounds keep a hostile request from making us multiply huge numbers; a real event is far inside them.
_MAX_QUANTITY = 10**12
_MAX_DECIMALS = 6
_DECIMAL = re.compile(r"^(?P<int>[0-9]{1,13})(?:\.(?P<frac>[0-9]+))?$")
_FACTOR_DECIMAL = re.compile(r"^[0-9]{1,9}(?:\.[0-9]{1,9})?$")
_FACTOR_FIELDS = {"key", "value", "unit", "activity_unit", "source", "year", "status", "note"}
_FACTOR_REQUIRED = _FACTOR_FIELDS - {"note"}
_STATUSES = {"published", "provisional", "checked"}
_SOURCE_REQUIRED = {"publication", "publisher"}
_SOURCE_FIELDS = _SOURCE_REQUIRED | {"url"}


class ActivityError(CarbonxError):
    """Activity data that cannot be estimated; `field` is the path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__("invalid_activity", f"{field}: {message}")
        self.field = field


# --------------------------------------------------------------------------------------------
# The factor table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Factor:
    key: str
    value: Fraction
    value_text: str  # as published, so reports show the figure a reader can look up
    unit: str
    activity_unit: str
    publication: str
    publisher: str
    year: int
    status: str
    note: str = ""
    url: str = ""  # where the publication can be read, when known


@dataclass(frozen=True)
class FactorTable:
    version: str
    factors: Mapping[str, Factor]

    def options(self, prefix: str) -> list[str]:
        """The names that follow `prefix.` in the keys, e.g. the travel modes for "travel"."""
        return sorted({k.split(".")[1] for k in self.factors if k.startswith(prefix + ".")})

    def grid_years(self, region: str) -> list[int]:
        return sorted(int(k.split(".")[2]) for k in self.factors if k.startswith(f"electricity.{region}."))


def _table_error(message: str) -> CarbonxError:
    return CarbonxError("invalid_factor_table", message)


def _parse_table(doc: Any) -> FactorTable:
    if not isinstance(doc, dict) or not isinstance(doc.get("version"), str) or not doc["version"].strip():
        raise _table_error("a factor table needs a non-empty \"version\" string")
    if not isinstance(doc.get("factors"), list) or not doc["factors"]:
        raise _table_error("a factor table needs a non-empty \"factors\" list")
    factors: dict[str, Factor] = {}
    for i, f in enumerate(doc["factors"]):
        if not isinstance(f, dict) or not _FACTOR_REQUIRED <= f.keys() <= _FACTOR_FIELDS:
            raise _table_error(f"factors[{i}] must have the fields {sorted(_FACTOR_REQUIRED)} (and optionally note)")
        key, value, src = f["key"], f["value"], f["source"]
        parts = key.split(".") if isinstance(key, str) else []
        if not parts or parts[0] not in CATEGORIES or not all(parts) or len(parts) != (3 if parts[0] == "electricity"
                                                                                     else 2):
            raise _table_error(f"factors[{i}].key {key!r} is not category.name (electricity.region.year)")
        if parts[0] == "electricity" and not parts[2].isdigit():
            raise _table_error(f"factors[{i}].key {key!r}: the grid factor's last part is its year")
        if key in factors:
            raise _table_error(f"factor {key!r} appears twice")
        if not isinstance(value, str) or not _FACTOR_DECIMAL.match(value):
            raise _table_error(f"factor {key!r}: value must be a decimal string, got {value!r}")
        if not isinstance(src, dict) or not _SOURCE_REQUIRED <= src.keys() <= _SOURCE_FIELDS or not all(
                isinstance(v, str) and v.strip() for v in src.values()):
            raise _table_error(f"factor {key!r}: source must name its publication and publisher (and optionally url)")
        if "url" in src and not src["url"].startswith("https://"):
            raise _table_error(f"factor {key!r}: source url must be an https:// address")
        if not isinstance(f["year"], int) or isinstance(f["year"], bool) or f["status"] not in _STATUSES:
            raise _table_error(f"factor {key!r}: year must be an integer and status one of {sorted(_STATUSES)}")
        factors[key] = Factor(key, Fraction(value), value, f["unit"], f["activity_unit"], src["publication"],
                              src["publisher"], f["year"], f["status"], f.get("note", ""), src.get("url", ""))
    return FactorTable(doc["version"], factors)


def load_factor_table(path: str | Path | None = None) -> FactorTable:
    """Read and check a factor table; with no path, the one shipped in exchange/data."""
    if path is None:
        text = resources.files("exchange.data").joinpath("emission_factors.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return _parse_table(json.loads(text))


@functools.cache
def default_factor_table() -> FactorTable:
    """The shipped table, read once per process."""
    return load_factor_table()


def describe_factor_table(table: FactorTable | None = None) -> dict[str, Any]:
    """The table as JSON-ready data (for a public "which factors do you use" endpoint)."""
    table = table or default_factor_table()
    return {
        "version": table.version,
        "factors": [
            {"key": f.key, "value": f.value_text, "unit": f.unit, "activity_unit": f.activity_unit,
             "source": {"publication": f.publication, "publisher": f.publisher, **({"url": f.url} if f.url else {})},
             "year": f.year,
             "status": f.status, **({"note": f.note} if f.note else {})}
            for f in table.factors.values()
        ],
        "options": {
            "electricity_regions": {r: table.grid_years(r) for r in table.options("electricity")},
            "travel_modes": table.options("travel"),
            "meal_kinds": table.options("meals"),
            "material_kinds": table.options("materials"),
            "waste_kinds": table.options("waste"),
        },
    }


# --------------------------------------------------------------------------------------------
# Reading activity data
# --------------------------------------------------------------------------------------------
def _quantity(value: Any, field: str) -> Fraction:
    """A non-negative exact quantity: an int or a decimal string ("12.5"). Floats are refused because
    0.1 kWh as a float is not 0.1 kWh, and the figure ends up on a certificate."""
    if isinstance(value, (bool, float)):
        kind = "a boolean" if isinstance(value, bool) else "a float"
        raise ActivityError(field, f"must be an integer or a decimal string such as \"12.5\", not {kind}")
    if isinstance(value, int):
        q = Fraction(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ActivityError(field, f"must not be negative, got {value!r}")
        m = _DECIMAL.match(text)
        if m is None:
            raise ActivityError(field, f"must be a decimal string such as \"12.5\", got {value!r}")
        frac = m.group("frac") or ""
        if len(frac) > _MAX_DECIMALS:
            raise ActivityError(field, f"at most {_MAX_DECIMALS} decimals, got {value!r}")
        q = Fraction(int(m.group("int") + frac), 10 ** len(frac))
    else:
        raise ActivityError(field, f"must be an integer or a decimal string, got {type(value).__name__}")
    if q < 0:
        raise ActivityError(field, f"must not be negative, got {value!r}")
    if q > _MAX_QUANTITY:
        raise ActivityError(field, f"must be at most {_MAX_QUANTITY}, got {value!r}")
    return q


def _count(value: Any, field: str) -> int:
    """A whole number of people, days, meals: an int or a string of digits."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        digits = value.strip().lstrip("0") or "0"
        if len(digits) > len(str(_MAX_QUANTITY)):  # before int(): past 4,300 digits it raises (a 500)
            raise ActivityError(field, f"must be at most {_MAX_QUANTITY}, got a number of {len(digits):,} digits")
        value = int(digits)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ActivityError(field, f"must be a whole number, got {value!r}")
    if value < 0:
        raise ActivityError(field, f"must not be negative, got {value!r}")
    if value > _MAX_QUANTITY:
        raise ActivityError(field, f"must be at most {_MAX_QUANTITY}, got {value!r}")
    return value


def _object(value: Any, field: str, allowed: set[str], required: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ActivityError(field or "activity", f"must be an object, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            raise ActivityError(f"{field}.{k}" if field else str(k), f"unknown field; allowed: {sorted(allowed)}")
    for k in sorted(required):
        if k not in value:
            raise ActivityError(f"{field}.{k}" if field else k, "is required")
    return value


def _entries(activity: Mapping[str, Any], name: str) -> list[tuple[str, Any]]:
    items = activity.get(name, [])
    if not isinstance(items, list):
        raise ActivityError(name, f"must be a list, got {type(items).__name__}")
    if len(items) > 1000:
        raise ActivityError(name, "at most 1000 entries")
    return [(f"{name}[{i}]", item) for i, item in enumerate(items)]


def _choice(value: Any, field: str, options: list[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ActivityError(field, f"unknown {value!r}; one of {options}")
    return value


_TOP = {"attendees", "days", "electricity", "travel", "hotel_room_nights", "meals", "materials", "waste"}


@dataclass(frozen=True)
class _Line:
    category: str
    field: str
    factor: Factor
    quantity: Fraction

    @property
    def exact_kg(self) -> Fraction:
        return self.quantity * self.factor.value


def _lines(activity: Mapping[str, Any], table: FactorTable) -> list[_Line]:
    lines: list[_Line] = []
    regions = table.options("electricity")
    for field, e in _entries(activity, "electricity"):
        _object(e, field, {"kwh", "region", "year"}, {"kwh", "region"})
        region = _choice(e["region"], f"{field}.region", regions)
        years = table.grid_years(region)
        # No year: the newest published factor for that grid, which is what a reader would look up today.
        year = years[-1] if e.get("year") is None else e["year"]
        if isinstance(year, bool) or not isinstance(year, int):
            raise ActivityError(f"{field}.year", f"must be a whole number (a JSON integer such as 2022), got {year!r}")
        if year not in years:
            raise ActivityError(f"{field}.year", f"no {region} grid factor for {year!r}; have {years}")
        lines.append(_Line("electricity", field, table.factors[f"electricity.{region}.{year}"],
                           _quantity(e["kwh"], f"{field}.kwh")))
    modes = table.options("travel")
    for field, t in _entries(activity, "travel"):
        _object(t, field, {"mode", "passenger_km", "people", "km_per_person", "round_trip"}, {"mode"})
        mode = _choice(t["mode"], f"{field}.mode", modes)
        if "passenger_km" in t:
            if "people" in t or "km_per_person" in t:
                raise ActivityError(field, "give either passenger_km or people and km_per_person, not both")
            pkm = _quantity(t["passenger_km"], f"{field}.passenger_km")
        elif "people" in t and "km_per_person" in t:
            pkm = _count(t["people"], f"{field}.people") * _quantity(t["km_per_person"], f"{field}.km_per_person")
            if pkm > _MAX_QUANTITY:  # the bound passenger_km has (each factor alone was within its own)
                raise ActivityError(field, f"people x km_per_person must be at most {_MAX_QUANTITY} passenger-km")
        else:
            raise ActivityError(field, "give passenger_km, or people and km_per_person")
        round_trip = t.get("round_trip", False)
        if not isinstance(round_trip, bool):
            raise ActivityError(f"{field}.round_trip", f"must be true or false, got {round_trip!r}")
        lines.append(_Line("travel", field, table.factors[f"travel.{mode}"], pkm * (2 if round_trip else 1)))
    if "hotel_room_nights" in activity:
        if "hotel.room_night" not in table.factors:
            raise ActivityError("hotel_room_nights", f"factor table {table.version} has no hotel factor")
        lines.append(_Line("hotel", "hotel_room_nights", table.factors["hotel.room_night"],
                           Fraction(_count(activity["hotel_room_nights"], "hotel_room_nights"))))
    for category, unit_field, counter in (("meals", "count", _count), ("materials", "kg", _quantity),
                                          ("waste", "kg", _quantity)):
        kinds = table.options(category)
        for field, m in _entries(activity, category):
            _object(m, field, {"kind", unit_field}, {"kind", unit_field})
            kind = _choice(m["kind"], f"{field}.kind", kinds)
            lines.append(_Line(category, field, table.factors[f"{category}.{kind}"],
                               Fraction(counter(m[unit_field], f"{field}.{unit_field}"))))
    return lines


# --------------------------------------------------------------------------------------------
# Estimating
# --------------------------------------------------------------------------------------------
def round_half_up(x: Fraction) -> int:
    """The nearest integer to a non-negative exact value, halves going up."""
    return (2 * x.numerator + x.denominator) // (2 * x.denominator)


def _decimal_text(x: Fraction) -> str:
    """An exact decimal string for a value whose denominator divides a power of ten (every quantity here)."""
    places = 0
    while (x * 10**places).denominator != 1:
        places += 1
    scaled = int(x * 10**places)
    if places == 0:
        return str(scaled)
    return f"{scaled // 10**places}.{scaled % 10**places:0{places}d}"


def estimate_footprint(activity: Mapping[str, Any], table: FactorTable | None = None) -> dict[str, Any]:
    """The footprint of the activity data (see the module docstring for its shape).

    Returns JSON-ready data:
    `{"factor_table_version", "total_kg", "offset_kg", "total_g", "total_tonnes", "categories_kg", "categories_g",
      "lines": [{"category", "field", "factor", "factor_value", "factor_unit", "factor_status",
                 "quantity", "quantity_unit", "g"}],
      "attendees", "days", "per_attendee_day_g", "rounding"}`.
    `total_kg` is the footprint as reported (half-up), `offset_kg` the whole kilograms that cover it (up:
    the figure for `quantity_to_offset`); `per_attendee_day_g` is null unless both
    attendees and days are given and non-zero.
    """
    table = table or default_factor_table()
    _object(activity, "", _TOP, set())
    attendees = _count(activity["attendees"], "attendees") if "attendees" in activity else None
    days = _count(activity["days"], "days") if "days" in activity else None
    lines = _lines(activity, table)

    exact = {c: Fraction(0) for c in CATEGORIES}
    for line in lines:
        exact[line.category] += line.exact_kg
    total = sum(exact.values(), Fraction(0))
    total_kg = round_half_up(total)
    per_day = None
    if attendees and days:
        per_day = round_half_up(total * 1000 / (attendees * days))
    return {
        "factor_table_version": table.version,
        "total_kg": total_kg,
        "offset_kg": math.ceil(total),
        "total_g": round_half_up(total * 1000),
        "total_tonnes": format_tonnes(total_kg),
        "categories_kg": {c: round_half_up(v) for c, v in exact.items()},
        "categories_g": {c: round_half_up(v * 1000) for c, v in exact.items()},
        "lines": [
            {"category": line.category, "field": line.field, "factor": line.factor.key,
             "factor_value": line.factor.value_text, "factor_unit": line.factor.unit,
             "factor_status": line.factor.status, "quantity": _decimal_text(line.quantity),
             "quantity_unit": line.factor.activity_unit, "g": round_half_up(line.exact_kg * 1000)}
            for line in lines
        ],
        "attendees": attendees,
        "days": days,
        "per_attendee_day_g": per_day,
        "rounding": ROUNDING,
    }


def quantity_to_offset(total_kg: int, lot_kg: int) -> int:
    """The kilograms to buy and retire for a footprint of `total_kg`: rounded up to a whole number of lots.

    Up, never half-up: offsetting less than the footprint would make the neutrality claim false.
    """
    if isinstance(total_kg, bool) or not isinstance(total_kg, int) or total_kg < 0:
        raise CarbonxError("invalid_quantity", f"footprint must be a non-negative integer of kg, got {total_kg!r}")
    if isinstance(lot_kg, bool) or not isinstance(lot_kg, int) or lot_kg <= 0:
        raise CarbonxError("invalid_lot", f"lot must be a positive integer of kg, got {lot_kg!r}")
    return -(-total_kg // lot_kg) * lot_kg
