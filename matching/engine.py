"""The matching engine: per-instrument trading rules in front of one order book per instrument.

The books (matching/reference.py, cext/book.pyx) only match; this module applies the exchange's
rules before a command reaches a book and routes it to the right one:

- tick: price (fen per tonne) must be a multiple of ``tick`` (default 1 fen = 0.01 CNY);
- lot: quantity (kg) must be a multiple of ``lot`` (default 1000 kg = 1 t);
- minimum quantity for new orders (default one lot);
- price band: with a reference price set, a limit price must lie within ±``band_bp`` basis points
  of it (default 1000 = ±10%), bounds rounded inwards to whole fen;
- trading sessions in Asia/Shanghai (default Monday–Friday 09:30–11:30 and 13:00–15:00; a session
  includes its start and excludes its end); ``always_open`` for demos;
- halt and resume.

New orders and amends are checked against every rule; cancels are always allowed (a participant
can leave a halted or closed market). A market order must be IOC-like (tif IOC or GTC, which the
book treats alike), not post-only, and a market buy must carry a cash cap in fen. Self-trade
prevention is per account (``set_account_stp``), default cancel-resting.

Time is never read here: every command carries ``ts``, UTC microseconds since the epoch. Before
each command the instrument's book expires GTD orders with expire_ts <= ts; ``expire(ts)``
does it for every instrument in instrument-name order, so the output is deterministic.
Every method returns the list of event tuples it caused (layouts in matching/events.py).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from matching import events as E
from matching.book import make_book
from matching.reference import DEFAULT_MAX_PRICE

SHANGHAI = ZoneInfo("Asia/Shanghai")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

DEFAULT_SESSIONS = ((9 * 60 + 30, 11 * 60 + 30), (13 * 60, 15 * 60))


@dataclass(frozen=True)
class InstrumentRules:
    """Trading rules of one instrument. Prices in fen per tonne, quantities in kg."""

    tick: int = 1
    lot: int = 1000
    min_qty: int = 1000
    band_bp: int = 1000
    reference_price: int | None = None
    sessions: tuple[tuple[int, int], ...] = DEFAULT_SESSIONS  # minutes after local midnight
    weekdays: frozenset[int] = frozenset(range(5))  # Monday = 0
    always_open: bool = False
    max_price: int = DEFAULT_MAX_PRICE  # the books' price bound (fen per tonne), at most 2**26
    # The band is at least one tick either way of the reference: listings and closes journaled
    # since review32 say so; those journaled before replay as they ran.
    tick_floor: bool = False

    def percent_band(self) -> tuple[int, int] | None:
        """(low, high): the reference price less and plus band_bp, in fen inward, or None without
        a reference price. What the listing asked for; `band` is what orders are held to."""
        if self.reference_price is None:
            return None
        ref = self.reference_price
        return -(-(ref * (10_000 - self.band_bp)) // 10_000), ref * (10_000 + self.band_bp) // 10_000

    def band(self) -> tuple[int, int] | None:
        """Inclusive (low, high) limit-price bounds on the tick grid, or None without a reference
        price (:attr:`_band`, worked out once per rules: every limit order asks)."""
        return self._band

    @functools.cached_property
    def _band(self) -> tuple[int, int] | None:
        """Inclusive (low, high) limit-price bounds on the tick grid, or None without a reference
        price: the percent band, never past the book's price bound, and with `tick_floor` at
        least one tick either way of the reference. The day's close moves the reference to the
        day's average: on a coarse tick at a low price the percent alone could come to less than
        a tick either way, and only the reference could trade, that day and every day after
        (review32)."""
        raw = self.percent_band()
        if raw is None:
            return None
        ref, tick = self.reference_price, self.tick
        low, high = -(-raw[0] // tick) * tick, raw[1] // tick * tick  # the same prices: they are on the grid
        if self.tick_floor:
            low, high = min(low, ref - tick), max(high, ref + tick)
        return max(low, tick), min(high, self.max_price // tick * tick)

    def is_open(self, ts: int) -> bool:
        """Whether `ts` (UTC microseconds) falls inside a trading session in Asia/Shanghai."""
        if self.always_open:
            return True
        weekday, minute = shanghai_weekday_minute(ts)
        if weekday not in self.weekdays:
            return False
        return any(start <= minute < end for start, end in self.sessions)


# China has kept UTC+8 without daylight saving since 1991, so after that plain arithmetic gives the
# Asia/Shanghai wall clock at a fraction of the cost of a tz conversion on every command.
_FIXED_OFFSET_SINCE = 694_224_000_000_000  # 1992-01-01T00:00:00Z in microseconds
_CST_OFFSET_S = 8 * 3600


def shanghai_weekday_minute(ts: int) -> tuple[int, int]:
    """(weekday Monday=0, minute after local midnight) of UTC-microsecond `ts` in Asia/Shanghai."""
    if ts >= _FIXED_OFFSET_SINCE:
        days, secs = divmod(ts // 1_000_000 + _CST_OFFSET_S, 86_400)
        return (days + 3) % 7, secs // 60  # 1970-01-01 was a Thursday
    local = (_EPOCH + timedelta(microseconds=ts)).astimezone(SHANGHAI)
    return local.weekday(), local.hour * 60 + local.minute


def local_ts(year: int, month: int, day: int, hour: int, minute: int) -> int:
    """UTC microseconds for a wall-clock time in Asia/Shanghai (handy for tests and demos)."""
    local = datetime(year, month, day, hour, minute, tzinfo=SHANGHAI)
    return (local - _EPOCH) // timedelta(microseconds=1)


class _Instrument:
    __slots__ = ("book", "halted", "rules")

    def __init__(self, rules: InstrumentRules, engine: str | None) -> None:
        self.rules = rules
        self.halted = False
        self.book = make_book(engine, lot=rules.lot, max_price=rules.max_price)


class MatchingEngine:
    """Routes commands to per-instrument books after checking the instrument's rules."""

    def __init__(self, engine: str | None = None, default_stp: int = E.STP_CANCEL_RESTING) -> None:
        self._engine = engine
        self._instruments: dict[str, _Instrument] = {}
        self._stp: dict[int, int] = {}
        self.default_stp = default_stp

    # ---- configuration -------------------------------------------------------------------

    def add_instrument(self, name: str, rules: InstrumentRules | None = None) -> None:
        if name in self._instruments:
            raise ValueError(f"instrument {name!r} already exists")
        self._instruments[name] = _Instrument(rules or InstrumentRules(), self._engine)

    def set_rules(self, name: str, rules: InstrumentRules) -> None:
        """Replace an instrument's rules (e.g. a new reference price); lot and max_price are
        fixed when the book is built."""
        inst = self._instruments[name]
        if rules.lot != inst.rules.lot or rules.max_price != inst.rules.max_price:
            raise ValueError("the lot and max_price of a live instrument cannot change")
        inst.rules = rules

    def set_account_stp(self, account: int, mode: int) -> None:
        self._stp[account] = mode

    def account_stp(self, account: int) -> int:
        """The account's self-trade prevention mode."""
        return self._stp.get(account, self.default_stp)

    def halt(self, name: str) -> None:
        self._instruments[name].halted = True

    def resume(self, name: str) -> None:
        self._instruments[name].halted = False

    def rules(self, name: str) -> InstrumentRules:
        return self._instruments[name].rules

    def is_halted(self, name: str) -> bool:
        return self._instruments[name].halted

    def book(self, name: str) -> Any:
        return self._instruments[name].book

    def instruments(self) -> list[str]:
        return sorted(self._instruments)

    # ---- commands ------------------------------------------------------------------------

    def submit(
        self, instrument: str, order_id: int, account: int, side: int, price: int, qty: int,
        ts: int, tif: int = E.GTC, kind: int = E.LIMIT, post_only: bool = False,
        expire_ts: int = 0, cash_cap: int = 0, checked: bool = False,
    ) -> list[tuple[int, ...]]:
        """A new order; `checked` skips the rule checks when the caller has just run
        :meth:`check_order` with the same arguments and time (the exchange core does)."""
        inst = self._instruments.get(instrument)
        if inst is None:
            return [(E.EV_REJECTED, order_id, E.REJECT_UNKNOWN_INSTRUMENT)]
        book = inst.book
        code = 0 if checked else self._check_order(inst, ts, side, price, qty, tif, kind, post_only, cash_cap)
        if code:
            # The rule checks do not look at the book, so expiring only now gives the same
            # events as expiring first (which book.submit does itself on the accepted path).
            book.expire(ts)
            return [*book.events(), (E.EV_REJECTED, order_id, code)]
        book.submit(order_id, account, side, price, qty, tif, ts, kind, post_only, expire_ts,
                    self._stp.get(account, self.default_stp), cash_cap)
        return book.events()

    def cancel(self, instrument: str, order_id: int, ts: int) -> list[tuple[int, ...]]:
        inst = self._instruments.get(instrument)
        if inst is None:
            return [(E.EV_REJECTED, order_id, E.REJECT_UNKNOWN_INSTRUMENT)]
        inst.book.cancel(order_id, ts)
        return inst.book.events()

    def amend(
        self, instrument: str, order_id: int, new_price: int, new_qty: int, ts: int
    ) -> list[tuple[int, ...]]:
        """Change price and/or open quantity (see ReferenceBook.amend for priority rules)."""
        inst = self._instruments.get(instrument)
        if inst is None:
            return [(E.EV_REJECTED, order_id, E.REJECT_UNKNOWN_INSTRUMENT)]
        book = inst.book
        book.expire(ts)
        code = self._check_common(inst, ts)
        if not code and book.order(order_id) is None:
            code = E.REJECT_NOT_FOUND
        if not code:
            code = self._check_qty(inst.rules, new_qty, new_order=False)
        if not code:
            code = self._check_price(inst.rules, new_price)
        if code:
            return [*book.events(), (E.EV_REJECTED, order_id, code)]
        book.amend(order_id, new_price, new_qty, ts)
        return book.events()

    def expire(self, ts: int) -> list[tuple[str, tuple[int, ...]]]:
        """Expire due GTD orders on every instrument; returns (instrument, event) pairs."""
        out = []
        for name in sorted(self._instruments):
            book = self._instruments[name].book
            book.expire(ts)
            out.extend((name, e) for e in book.events())
        return out

    # ---- rules ---------------------------------------------------------------------------

    def check_order(
        self, instrument: str, ts: int, side: int, price: int, qty: int, tif: int = E.GTC,
        kind: int = E.LIMIT, post_only: bool = False, cash_cap: int = 0,
    ) -> int:
        """The reject code `submit` would give on the rules alone (0 when they pass), without
        touching the book: lets a caller run its own checks (risk) before anything changes."""
        inst = self._instruments.get(instrument)
        if inst is None:
            return E.REJECT_UNKNOWN_INSTRUMENT
        return self._check_order(inst, ts, side, price, qty, tif, kind, post_only, cash_cap)

    def check_amend(self, instrument: str, ts: int, new_price: int, new_qty: int) -> int:
        """The reject code the rules give an amend to `new_price`/`new_qty` (0 when they pass)."""
        inst = self._instruments.get(instrument)
        if inst is None:
            return E.REJECT_UNKNOWN_INSTRUMENT
        return (self._check_common(inst, ts) or self._check_qty(inst.rules, new_qty, new_order=False)
                or self._check_price(inst.rules, new_price))

    def _check_common(self, inst: _Instrument, ts: int) -> int:
        if inst.halted:
            return E.REJECT_HALTED
        if not inst.rules.is_open(ts):
            return E.REJECT_MARKET_CLOSED
        return 0

    @staticmethod
    def _check_qty(rules: InstrumentRules, qty: int, new_order: bool) -> int:
        if qty <= 0:
            return E.REJECT_INVALID_QUANTITY
        if qty % rules.lot:
            return E.REJECT_INVALID_LOT
        if new_order and qty < rules.min_qty:
            return E.REJECT_MIN_QUANTITY
        return 0

    @staticmethod
    def _check_price(rules: InstrumentRules, price: int) -> int:
        if price <= 0:
            return E.REJECT_INVALID_PRICE
        if price % rules.tick:
            return E.REJECT_INVALID_TICK
        band = rules.band()
        if band is not None and not band[0] <= price <= band[1]:
            return E.REJECT_PRICE_OUT_OF_BAND
        return 0

    def _check_order(
        self, inst: _Instrument, ts: int, side: int, price: int, qty: int, tif: int, kind: int,
        post_only: bool, cash_cap: int,
    ) -> int:
        code = self._check_common(inst, ts)
        if code:
            return code
        if side not in (E.BID, E.ASK) or tif not in (E.GTC, E.IOC, E.FOK, E.GTD):
            return E.REJECT_INVALID_ORDER
        if kind == E.MARKET:
            if post_only or tif not in (E.GTC, E.IOC) or (side == E.BID and cash_cap <= 0):
                return E.REJECT_INVALID_ORDER
        elif kind != E.LIMIT:
            return E.REJECT_INVALID_ORDER
        code = self._check_qty(inst.rules, qty, new_order=True)
        if code or kind == E.MARKET:
            return code
        return self._check_price(inst.rules, price)

    # ---- state ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Books and halt flags by instrument (rules are configuration, not state)."""
        return {
            name: {"halted": inst.halted, "book": inst.book.snapshot()}
            for name, inst in sorted(self._instruments.items())
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Load :meth:`snapshot` output into already-added instruments."""
        for name, state in snapshot.items():
            inst = self._instruments[name]
            inst.halted = state["halted"]
            inst.book.restore(state["book"])

    def state_digest(self) -> str:
        """SHA-256 over every instrument's halt flag and book digest, in name order."""
        parts = [
            (name, inst.halted, inst.book.state_digest())
            for name, inst in sorted(self._instruments.items())
        ]
        return hashlib.sha256(orjson.dumps(parts)).hexdigest()
