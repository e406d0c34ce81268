"""Over-the-counter subscriptions settled delivery versus payment.

At a scheme's launch, buyers subscribe credits from developers at the reference price before the
continuous market opens. Each subscription moves the cash (a balanced ledger entry) and the
serials (a registry movement naming the same reference) in one transaction: both or neither.
Idempotent by reference: a subscription already settled is reported, not settled again.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from exchange import registry
from exchange.accounts import get_account
from exchange.blockplan import AVAILABLE
from exchange.errors import CarbonxError
from matching.units import trade_value_fen


@dataclass(frozen=True)
class Subscription:
    reference: str
    quantity_kg: int
    value_fen: int
    pieces: tuple[registry.Piece, ...]
    replayed: bool


async def subscribe(
    conn: asyncpg.Connection, *, seller: str, buyer: str, symbol: str, quantity_kg: int, price_fen: int,
    reference: str,
) -> Subscription:
    """Deliver `quantity_kg` of `symbol` from `seller` to `buyer` against `price × quantity` in cash."""
    if not isinstance(price_fen, int) or price_fen <= 0:
        raise CarbonxError("invalid_price", f"price must be positive, got {price_fen!r} fen/t")
    if not isinstance(quantity_kg, int) or quantity_kg <= 0:
        raise CarbonxError("invalid_quantity", f"quantity must be positive, got {quantity_kg!r} kg")
    ref = f"subscription:{reference}"
    value = trade_value_fen(price_fen, quantity_kg)
    sell, buy = await get_account(conn, seller), await get_account(conn, buyer)
    ids = await registry.resolve_issuances(conn, symbol=symbol)
    async with conn.transaction():
        entry = await conn.fetchval(
            "INSERT INTO ledger_entries (kind, ref) VALUES ('trade', $1) ON CONFLICT DO NOTHING RETURNING id", ref
        )
        if entry is None:
            return Subscription(reference, quantity_kg, value, (), replayed=True)
        try:
            await conn.execute(
                "INSERT INTO postings (entry_id, account_id, amount_fen) VALUES ($1, $2, $3), ($1, $4, $5)",
                entry, buy.id, -value, sell.id, value,
            )
        except asyncpg.CheckViolationError as e:
            if e.constraint_name == "cash_balances_not_negative":
                raise CarbonxError("insufficient_funds", f"{buyer} cannot pay {value} fen for {reference}") from None
            raise
        [res] = await registry.apply_movements(conn, [registry.ByQuantity(
            ids, sell.id, AVAILABLE, buy.id, AVAILABLE, quantity_kg, "transfer", ref)])
    return Subscription(reference, quantity_kg, value, tuple(res.pieces), replayed=False)
