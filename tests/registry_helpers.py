"""Helpers for registry tests: a small world to act on, and a fingerprint of the whole database."""

from __future__ import annotations

import asyncpg

from exchange import registry
from exchange.accounts import create_account

TABLES = ("accounts", "api_keys", "projects", "issuances", "blocks", "transfers", "retirements",
          "ledger_entries", "postings", "cash_balances", "payments")


async def fingerprint(conn: asyncpg.Connection) -> dict[str, list]:
    """Every row of every registry and ledger table, in a stable order: equal means unchanged."""
    out = {}
    for t in TABLES:
        rows = await conn.fetch(f"SELECT * FROM {t} ORDER BY 1")
        out[t] = [tuple(r) for r in rows]
    return out


async def world(conn: asyncpg.Connection, tonnes: int = 100) -> registry.Issuance:
    """DEV holds `tonnes` t of FOREST-2023; BUY and OPS exist."""
    await create_account(conn, "DEV", "Developer", "project_developer")
    await create_account(conn, "BUY", "Buyer", "enterprise")
    await create_account(conn, "OPS", "Operator", "operator", "operator")
    await registry.add_project(conn, code="FOREST", name="Forest sink", methodology="forest_carbon_sink",
                               developer="DEV")
    return await registry.issue(conn, project="FOREST", vintage=2023, quantity_kg=tonnes * 1000)


async def cover_violations(conn: asyncpg.Connection) -> list:
    """Issuances whose blocks do not add up to what was issued (empty when sound)."""
    return await conn.fetch(
        """SELECT i.id FROM issuances i LEFT JOIN blocks b ON b.issuance_id = i.id GROUP BY i.id
           HAVING coalesce(sum(upper(b.serials) - lower(b.serials)), 0) <> upper(i.serials) - lower(i.serials)
               OR min(lower(b.serials)) IS DISTINCT FROM lower(i.serials)
               OR max(upper(b.serials)) IS DISTINCT FROM upper(i.serials)"""
    )
