"""Pre-trade risk arithmetic: how much cash a buy must reserve, and what a fill costs.

Full collateral (DESIGN.md, "Pre-trade risk"): a buy reserves enough cash for every fill its
remaining quantity could still get, fees included; a sell encumbers the credits it would deliver.
Everything is integer fen and kilograms.

Trade values and fees are rounded half-up *per trade* (the one rule everywhere), so the sum over
several fills can exceed the value of the whole quantity by up to half a fen per fill for the
value (only when the lot is not whole tonnes) and half a fen per fill for the fee. A fill is at
least one lot, so the reservation adds an allowance of one fen per lot for each rounding that can
happen. With that, this invariant holds for every open buy, after every fill:

    reserved >= limit * remaining * (10_000 + fee_bp) / 10_000_000 + allowance * remaining / lot

(proof sketch: a fill of q at price p <= limit costs at most p*q*(1 + bp/1e4)/1000 plus the
per-fill rounding, which the allowance of q/lot >= 1 lots covers; releasing only down to the
reservation of the remainder, itself a ceiling of the right-hand side, keeps the bound). Hence a
buyer's cash never goes below zero, whatever the order of fills.
"""

from __future__ import annotations

from matching.units import KG_PER_TONNE, fee_fen, trade_value_fen

BP = 10_000
MAX_FEE_BP = 1_000  # 10%: far above any real exchange fee; keeps the rounding allowance at 2 fen


def rounding_allowance(lot: int, fee_bp: int) -> int:
    """Fen per lot that covers per-trade rounding of the value and of the fee."""
    return (1 if lot % KG_PER_TONNE else 0) + (1 if fee_bp else 0)


def buy_reservation(limit: int, qty: int, lot: int, fee_bp: int) -> int:
    """Cash a limit buy of `qty` kg at `limit` fen/t must hold: value and fee rounded up, plus the
    rounding allowance."""
    base = -(-(limit * qty * (BP + fee_bp)) // (BP * KG_PER_TONNE))
    return base + rounding_allowance(lot, fee_bp) * (qty // lot)


def market_buy_reservation(cash_cap: int, qty: int, lot: int, fee_bp: int) -> int:
    """Cash a market buy must hold: its cap on trade values, the fee on the cap rounded up, and
    one fen per lot for per-trade fee rounding (the book never lets values exceed the cap)."""
    return cash_cap + -(-(cash_cap * fee_bp) // BP) + (1 if fee_bp else 0) * (qty // lot)


def buyer_cost(fills: list[tuple[int, int]], fee_bp: int) -> int:
    """What a buyer pays for (price, kg) `fills` at a fee of `fee_bp`, in fen: each trade's value
    and fee, rounded as a trade rounds them (:func:`fill_amounts`)."""
    return sum(value + fee for value, fee, _ in (fill_amounts(price, kg, fee_bp, 0) for price, kg in fills))


def fill_amounts(price: int, qty: int, buyer_bp: int, seller_bp: int) -> tuple[int, int, int]:
    """(value, buyer fee, seller fee) of one trade, each rounded half-up to the fen."""
    value = trade_value_fen(price, qty)
    return value, fee_fen(value, buyer_bp), fee_fen(value, seller_bp)
