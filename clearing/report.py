"""The end-of-day settlement report: per account and instrument, and per instrument, as CSV.

Pure functions over settled trades (the ``settled_trades`` rows of one Shanghai trading day):
:func:`summarise` adds them up, :func:`write_csv` writes one CSV with a ``section`` column
(``account`` rows: bought, sold, fees, net cash and net credits of one account in one instrument;
``instrument`` rows: trades, volume, value, VWAP and close). The close is the day's VWAP rounded
half-up to the instrument's tick — the same rule the core uses for the next day's reference price.
Amounts in the file are decimal strings in CNY and tonnes, as everywhere on the outside.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from matching.units import format_cash, format_price, format_tonnes, round_to_tick, vwap_fen


@dataclass(frozen=True, slots=True)
class SettledTrade:
    symbol: str
    trade_id: int
    buyer: str
    seller: str
    price: int
    qty: int
    value: int
    buyer_fee: int
    seller_fee: int


@dataclass(slots=True)
class AccountLine:
    bought: int = 0
    bought_value: int = 0
    sold: int = 0
    sold_value: int = 0
    fees: int = 0
    trades: int = 0

    @property
    def net_cash(self) -> int:
        return self.sold_value - self.bought_value - self.fees

    @property
    def net_credits(self) -> int:
        return self.bought - self.sold


@dataclass(slots=True)
class InstrumentLine:
    trades: int = 0
    volume: int = 0
    value: int = 0
    fees: int = 0
    sum_price_qty: int = 0

    def vwap(self) -> int:
        return vwap_fen(self.sum_price_qty, self.volume)


@dataclass(slots=True)
class DayReport:
    date: str
    accounts: dict[tuple[str, str], AccountLine] = field(default_factory=dict)
    instruments: dict[str, InstrumentLine] = field(default_factory=dict)
    ticks: dict[str, int] = field(default_factory=dict)

    def close(self, symbol: str) -> int:
        return round_to_tick(self.instruments[symbol].vwap(), self.ticks.get(symbol, 1))


def summarise(date: str, trades: Iterable[SettledTrade], ticks: dict[str, int] | None = None) -> DayReport:
    report = DayReport(date, ticks=dict(ticks or {}))
    accounts, instruments = report.accounts, report.instruments
    for t in trades:
        inst = instruments.setdefault(t.symbol, InstrumentLine())
        inst.trades += 1
        inst.volume += t.qty
        inst.value += t.value
        inst.fees += t.buyer_fee + t.seller_fee
        inst.sum_price_qty += t.price * t.qty
        buyer = accounts.setdefault((t.buyer, t.symbol), AccountLine())
        buyer.bought += t.qty
        buyer.bought_value += t.value
        buyer.fees += t.buyer_fee
        buyer.trades += 1
        seller = accounts.setdefault((t.seller, t.symbol), AccountLine())
        seller.sold += t.qty
        seller.sold_value += t.value
        seller.fees += t.seller_fee
        seller.trades += 1
    return report


COLUMNS = ("section", "date", "account", "symbol", "trades", "bought_t", "bought_cny", "sold_t", "sold_cny",
           "fees_cny", "net_cash_cny", "net_credits_t", "volume_t", "value_cny", "vwap", "close")


def write_csv(report: DayReport, out: TextIO) -> int:
    """Write the report; returns the number of data rows."""
    w = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    w.writeheader()
    n = 0
    for (account, symbol), a in sorted(report.accounts.items()):
        w.writerow({
            "section": "account", "date": report.date, "account": account, "symbol": symbol, "trades": a.trades,
            "bought_t": format_tonnes(a.bought), "bought_cny": format_cash(a.bought_value),
            "sold_t": format_tonnes(a.sold), "sold_cny": format_cash(a.sold_value), "fees_cny": format_cash(a.fees),
            "net_cash_cny": format_cash(a.net_cash), "net_credits_t": format_tonnes(a.net_credits),
        })
        n += 1
    for symbol, i in sorted(report.instruments.items()):
        w.writerow({
            "section": "instrument", "date": report.date, "symbol": symbol, "trades": i.trades,
            "fees_cny": format_cash(i.fees), "volume_t": format_tonnes(i.volume), "value_cny": format_cash(i.value),
            "vwap": format_price(i.vwap()), "close": format_price(report.close(symbol)),
        })
        n += 1
    return n
