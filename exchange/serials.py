"""Serial numbers as people read them: `{scheme}-{project}-{vintage}-{first}-{last}`.

Units are kilograms, numbered from 1 within a project vintage; `first` and `last` are inclusive
and zero-padded to ten digits. A single unit may be written `{scheme}-{project}-{vintage}-{n}`.
Internally a range is half-open `[lo, hi)` like PostgreSQL's int8range, so `last = hi - 1`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exchange.errors import CarbonxError

WIDTH = 10
_SCHEME = re.compile(r"^[A-Z][A-Z0-9]{1,15}$")
_VINTAGE = re.compile(r"^[0-9]{4}$")
_NUMBER = re.compile(r"^[0-9]{1,10}$")


@dataclass(frozen=True)
class SerialRange:
    """A parsed serial text: a half-open range of units of one project vintage."""

    scheme: str
    project_code: str
    vintage: int
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def text(self) -> str:
        return format_serial(self.scheme, self.project_code, self.vintage, self.lo, self.hi)


def format_serial(scheme: str, project_code: str, vintage: int, lo: int, hi: int) -> str:
    """The serial text of units `[lo, hi)`."""
    return f"{scheme}-{project_code}-{vintage}-{lo:0{WIDTH}d}-{hi - 1:0{WIDTH}d}"


def parse_serial(text: str) -> list[SerialRange]:
    """Every reading of `text` as a serial range or a single unit; the caller picks the one whose
    project exists (a project code may itself end in digits). Raises `invalid_serial` when none."""
    parts = text.strip().upper().split("-")
    readings: list[SerialRange] = []
    # Range form: SCHEME-PROJECT…-VINTAGE-FIRST-LAST
    if len(parts) >= 5 and _VINTAGE.match(parts[-3]) and _NUMBER.match(parts[-2]) and _NUMBER.match(parts[-1]):
        first, last = int(parts[-2]), int(parts[-1])
        if 1 <= first <= last:
            readings.append(SerialRange(parts[0], "-".join(parts[1:-3]), int(parts[-3]), first, last + 1))
    # Single unit: SCHEME-PROJECT…-VINTAGE-N
    if len(parts) >= 4 and _VINTAGE.match(parts[-2]) and _NUMBER.match(parts[-1]) and int(parts[-1]) >= 1:
        n = int(parts[-1])
        readings.append(SerialRange(parts[0], "-".join(parts[1:-2]), int(parts[-2]), n, n + 1))
    readings = [r for r in readings if _SCHEME.match(r.scheme) and r.project_code]
    if not readings:
        raise CarbonxError(
            "invalid_serial",
            f"{text!r} is not a serial: expected SCHEME-PROJECT-VINTAGE-FIRST-LAST "
            "(e.g. CDHF-LQS-FS-2023-0000000001-0000001200) or SCHEME-PROJECT-VINTAGE-N",
        )
    return readings
