"""Units: decimal strings in and out, exact, and the one rounding rule for cash."""

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from matching.units import (
    UnitError,
    fee_fen,
    format_cash,
    format_decimal,
    format_price,
    format_tonnes,
    parse_cash,
    parse_price,
    parse_tonnes,
    reserve_value_fen,
    trade_value_fen,
)


@pytest.mark.parametrize(("text", "kg"), [("1.200", 1200), ("1.2", 1200), ("0.001", 1), ("3600", 3_600_000),
                                          ("7900.000", 7_900_000), ("0", 0), ("-1.5", -1500)])
def test_parse_tonnes(text, kg):
    assert parse_tonnes(text) == kg


@pytest.mark.parametrize("text", ["1.2345", "1.", ".5", "1e3", "NaN", "inf", "1,2", "", " ", "0x10", "１.２"])
def test_parse_tonnes_refuses(text):
    with pytest.raises(UnitError):
        parse_tonnes(text)


def test_too_many_decimals_has_its_own_code():
    with pytest.raises(UnitError) as e:
        parse_price("13.899")
    assert e.value.code == "too_many_decimals"


@given(st.integers(min_value=0, max_value=10**15))
def test_round_trips(n):
    assert parse_tonnes(format_tonnes(n)) == n
    assert parse_price(format_price(n)) == n
    assert parse_cash(format_price(n)) == n


@given(st.integers(-10**20, 10**20), st.integers(0, 20))
def test_format_decimal_is_the_exact_decimal(n, places):
    """The %-format fast path and the general path agree with Decimal's own rendering."""
    expected = f"{Decimal(n).scaleb(-places):.{places}f}"
    assert format_decimal(n, places) == expected
    if places == 3:
        assert format_tonnes(n) == expected
    if places == 2:
        assert format_price(n) == format_cash(n) == expected


def test_formats():
    assert format_tonnes(1200) == "1.200"
    assert format_tonnes(1) == "0.001"
    assert format_price(1389) == "13.89"
    assert format_price(5) == "0.05"


@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_trade_value_is_half_up_and_reserve_rounds_up(price, qty):
    exact = Decimal(price) * Decimal(qty) / Decimal(1000)
    assert trade_value_fen(price, qty) == int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert reserve_value_fen(price, qty) >= exact > reserve_value_fen(price, qty) - 1


def test_rounding_edges():
    assert trade_value_fen(1389, 1200) == 1667      # 16.668 CNY → 16.67
    assert trade_value_fen(1, 500) == 1             # exactly half a fen rounds up
    assert trade_value_fen(1, 499) == 0
    assert reserve_value_fen(1, 1) == 1
    assert fee_fen(10_000, 5) == 5                  # 5 bp of 100 CNY = 0.05 CNY
    assert fee_fen(1000, 5) == 1                    # 0.5 fen rounds up
    assert fee_fen(999, 5) == 0


@given(st.lists(st.integers(min_value=0, max_value=253_402_300_799_999_999), min_size=1, max_size=20), st.data())
def test_iso_times_equal_datetimes_formatting_repeated_or_not(stamps, data):
    """api.wire.iso (a %-format of a divmod, remembering the last time it formatted) against
    datetime's own ISO formatting, over times asked for again and in any order."""
    from datetime import UTC, datetime, timedelta

    from api.wire import iso

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    asked = stamps + [data.draw(st.sampled_from(stamps)) for _ in range(len(stamps))]
    for ts in asked:
        want = (epoch + timedelta(microseconds=ts)).isoformat(timespec="microseconds").replace("+00:00", "Z")
        assert iso(ts) == want
    assert iso(None) is None
