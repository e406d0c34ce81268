"""The cash ledger: double-entry postings in fen, deposits and withdrawals by payment reference.

Every entry's postings sum to zero and balances follow from postings; the database enforces both
(see migration 0002). A deposit credits the member and debits CX-CUSTODY, the exchange's account
at the settlement bank; a withdrawal does the reverse. A payment reference is unique: sending the
same payment again returns the original, while a different payment under a used reference is
refused as `duplicate_reference`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg

from exchange.accounts import SYSTEM_CUSTODY, get_account
from exchange.errors import CarbonxError
from matching.units import format_cash

_REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}$")


@dataclass(frozen=True)
class Payment:
    id: int
    account: str
    direction: str
    amount_fen: int
    reference: str
    replayed: bool  # True when this reference had been recorded already (nothing changed now)


def check_payee(code: str, role: str, direction: str) -> None:
    """Refuse a payment the account cannot take: none to or from a system account (its cash is
    the exchange's own), and no deposit into an operator's account, which cannot trade, so that
    the cash could only be withdrawn again (a mistyped account code, most likely)."""
    if role == "system":
        raise CarbonxError("forbidden", f"{code} is a system account")
    if direction == "deposit" and role != "member":
        raise CarbonxError("invalid_request", f"cash can only be deposited into a member account; "
                                              f"{code} is an {role} account")


async def _payment(conn: asyncpg.Connection, account: str, direction: str, amount_fen: int,
                   reference: str, reserved_fen: int = 0) -> Payment:
    if not isinstance(amount_fen, int) or amount_fen <= 0:
        raise CarbonxError("invalid_amount", f"amount must be a positive number of fen, got {amount_fen!r}")
    if not isinstance(reference, str) or not _REFERENCE.match(reference):
        raise CarbonxError("invalid_reference",
                           "payment reference must be 1–100 characters of letters, digits and . _ : / -")
    acct = await get_account(conn, account)
    if acct.role == "system":
        check_payee(acct.code, acct.role, direction)
    async with conn.transaction():
        existing = await conn.fetchrow(
            "SELECT id, account_id, direction, amount_fen FROM payments WHERE reference = $1", reference
        )
        if existing is None:
            # A repeat of a payment made before the rule (a deposit into an operator's account)
            # is still answered with that payment, as every repeat is.
            check_payee(acct.code, acct.role, direction)
            custody = await get_account(conn, SYSTEM_CUSTODY)
            entry = await conn.fetchval(
                "INSERT INTO ledger_entries (kind, ref) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING id",
                direction, reference,
            )
            if entry is not None:
                sign = 1 if direction == "deposit" else -1
                held = await conn.fetchval(
                    "SELECT coalesce((SELECT balance_fen FROM cash_balances WHERE account_id = $1), 0)", acct.id
                )
                if sign < 0 and held - amount_fen < reserved_fen:
                    raise CarbonxError(
                        "insufficient_funds",
                        f"{account} holds {format_cash(held)} CNY, of which its open buy orders reserve "
                        f"{format_cash(reserved_fen)}; a withdrawal of {format_cash(amount_fen)} CNY is refused (at "
                        f"most {format_cash(max(0, held - reserved_fen))})",
                    )
                try:
                    await conn.execute(
                        "INSERT INTO postings (entry_id, account_id, amount_fen) VALUES ($1, $2, $3), ($1, $4, $5)",
                        entry, acct.id, sign * amount_fen, custody.id, -sign * amount_fen,
                    )
                except asyncpg.CheckViolationError as e:
                    if e.constraint_name == "cash_balances_not_negative":
                        raise CarbonxError(
                            "insufficient_funds",
                            f"{account} holds {format_cash(held)} CNY; a withdrawal of {format_cash(amount_fen)} CNY "
                            "is refused",
                        ) from None
                    raise
                pid = await conn.fetchval(
                    """INSERT INTO payments (account_id, direction, amount_fen, reference, entry_id)
                       VALUES ($1, $2, $3, $4, $5) RETURNING id""",
                    acct.id, direction, amount_fen, reference, entry,
                )
                return Payment(pid, account, direction, amount_fen, reference, replayed=False)
            # A concurrent payment took the reference between our look-up and insert.
            existing = await conn.fetchrow(
                "SELECT id, account_id, direction, amount_fen FROM payments WHERE reference = $1", reference
            )
    if (existing["account_id"], existing["direction"], existing["amount_fen"]) != (acct.id, direction, amount_fen):
        raise CarbonxError(
            "duplicate_reference",
            f"payment reference {reference!r} was already used for a different payment; nothing was changed",
        )
    return Payment(existing["id"], account, direction, amount_fen, reference, replayed=True)


async def deposit(conn: asyncpg.Connection, *, account: str, amount_fen: int, reference: str) -> Payment:
    """Credit a member with cash received at the settlement bank (idempotent by reference)."""
    return await _payment(conn, account, "deposit", amount_fen, reference)


async def withdraw(conn: asyncpg.Connection, *, account: str, amount_fen: int, reference: str,
                   reserved_fen: int = 0) -> Payment:
    """Pay a member's cash out (idempotent by reference); `insufficient_funds` past the balance
    less `reserved_fen` (what the member's open buy orders have reserved)."""
    return await _payment(conn, account, "withdrawal", amount_fen, reference, reserved_fen)


async def balance(conn: asyncpg.Connection, account: str) -> int:
    """An account's cash balance in fen."""
    acct = await get_account(conn, account)
    return await conn.fetchval(
        "SELECT coalesce((SELECT balance_fen FROM cash_balances WHERE account_id = $1), 0)", acct.id
    )


async def ledger_total(conn: asyncpg.Connection) -> int:
    """The sum of every posting ever made: zero, always."""
    return await conn.fetchval("SELECT coalesce(sum(amount_fen), 0)::bigint FROM postings")


async def balances_match_postings(conn: asyncpg.Connection) -> list[tuple[str, int, int]]:
    """Accounts whose stored balance differs from the sum of their postings (empty when sound)."""
    rows = await conn.fetch(
        """SELECT a.code, coalesce(b.balance_fen, 0) AS stored, coalesce(p.total, 0)::bigint AS derived
           FROM accounts a
           LEFT JOIN cash_balances b ON b.account_id = a.id
           LEFT JOIN (SELECT account_id, sum(amount_fen) AS total FROM postings GROUP BY account_id) p
                  ON p.account_id = a.id
           WHERE coalesce(b.balance_fen, 0) <> coalesce(p.total, 0)"""
    )
    return [(r["code"], r["stored"], r["derived"]) for r in rows]
