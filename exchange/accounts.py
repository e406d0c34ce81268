"""Participants' accounts and their API keys.

An account has a code (upper-case letters, digits, `-` and `_`), a name, a kind (who it is) and a
role (what it may do: `operator` runs the registry, `member` trades and retires). API keys are
random, shown once, and stored only as a SHA-256 hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

import asyncpg

from exchange.errors import CarbonxError
from exchange.text import unsafe

KINDS = ("operator", "project_developer", "enterprise", "scenic_area", "event_organiser", "individual")
ROLES = ("operator", "member")
_CODE = re.compile(r"^[A-Z0-9][A-Z0-9_-]{0,39}$")
SYSTEM_CUSTODY = "CX-CUSTODY"
SYSTEM_FEES = "CX-FEES"


@dataclass(frozen=True)
class Account:
    id: int
    code: str
    name: str
    kind: str
    role: str


def validate_code(code: str, what: str = "account code") -> str:
    """An account or project code as stored: refuses anything but A-Z, 0-9, '-' and '_'."""
    if not isinstance(code, str) or not _CODE.match(code):
        raise CarbonxError(
            "invalid_code",
            f"{what} {code!r} must be 1–40 upper-case letters, digits, '-' or '_', starting with a letter or digit",
        )
    return code


def default_role(kind: str) -> str:
    """The role an account of `kind` has when none is asked for: operator for the operator."""
    return "operator" if kind == "operator" else "member"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def create_account(
    conn: asyncpg.Connection, code: str, name: str, kind: str, role: str = "member"
) -> Account:
    """Create an account; `account_exists` if the code is taken."""
    validate_code(code)
    if code.startswith("CX-"):
        raise CarbonxError("invalid_code", "account codes starting with CX- are reserved for the exchange")
    if kind not in KINDS:
        raise CarbonxError("invalid_kind", f"kind {kind!r} must be one of: {', '.join(KINDS)}")
    if role not in ROLES:
        raise CarbonxError("invalid_role", f"role {role!r} must be one of: {', '.join(ROLES)}")
    if (kind == "operator") != (role == "operator"):  # an operator that trades, a member that runs the registry
        raise CarbonxError("invalid_role", f"kind {kind!r} with role {role!r}: the operator has kind operator and "
                                           "role operator, every member another kind and role member")
    name = (name or "").strip() or code
    if len(name) > 200:
        raise CarbonxError("invalid_name", "account name must be at most 200 characters")
    if (why := unsafe(name)) is not None:  # REST refuses it too; the command line came here unchecked
        raise CarbonxError("invalid_name", f"account name: {why}")
    row = await conn.fetchrow(
        """INSERT INTO accounts (code, name, kind, role) VALUES ($1, $2, $3, $4)
           ON CONFLICT (code) DO NOTHING RETURNING id""",
        code, name, kind, role,
    )
    if row is None:
        raise CarbonxError("account_exists", f"account {code} already exists")
    return Account(row["id"], code, name, kind, role)


async def get_account(conn: asyncpg.Connection, code: str) -> Account:
    """The account with `code`; `not_found` otherwise."""
    row = await conn.fetchrow("SELECT id, code, name, kind, role FROM accounts WHERE code = $1", code)
    if row is None:
        raise CarbonxError("not_found", f"no account {code!r}")
    return Account(**dict(row))


async def list_accounts(conn: asyncpg.Connection) -> list[Account]:
    rows = await conn.fetch("SELECT id, code, name, kind, role FROM accounts ORDER BY id")
    return [Account(**dict(r)) for r in rows]


DEMO_KEY = "cx_demo_"


async def create_api_key(conn: asyncpg.Connection, account_id: int, *, demo: bool = False) -> str:
    """A new API key for the account; the key is returned once and only its hash is kept. A
    `demo` key (``carbonx serve --demo``) replaces the account's earlier demo keys: they are
    revoked in the same transaction, so restarting the demo never leaves a trail of live keys."""
    key = (DEMO_KEY if demo else "cx_") + secrets.token_urlsafe(32)
    async with conn.transaction():
        if demo:
            await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE account_id = $1 AND revoked_at IS NULL "
                               "AND starts_with(key_prefix, $2)", account_id, DEMO_KEY)
        await conn.execute(
            "INSERT INTO api_keys (account_id, key_hash, key_prefix) VALUES ($1, $2, $3)",
            account_id, hash_key(key), key[:10],
        )
    return key


async def keyed_account(conn: asyncpg.Connection, code: str) -> Account:
    """The account with `code`, refused `forbidden` for the exchange's own (role system, CX-...):
    they hold no keys (ledger.check_payee tells them apart the same way)."""
    a = await get_account(conn, code)
    if a.role == "system":
        raise CarbonxError("forbidden", f"{a.code} is the exchange's own account: it has no API keys")
    return a


async def revoke_api_keys(conn: asyncpg.Connection, account_id: int, *, keep: str | None = None) -> int:
    """Revoke the account's live API keys, all of them or all but `keep`; returns how many. A
    server stops honouring them within api/auth.KEY_TTL, open websockets included."""
    status = await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE account_id = $1 AND revoked_at IS NULL "
        "AND ($2::bytea IS NULL OR key_hash <> $2)", account_id, hash_key(keep) if keep is not None else None)
    return int(status.rsplit(" ", 1)[-1])


async def rotate_api_key(conn: asyncpg.Connection, account_id: int, *, revoke_others: bool) -> tuple[str, int]:
    """Another API key for the account, and, with `revoke_others`, its earlier keys revoked in the
    same transaction (a rotation, or a leaked key replaced): (the new key, how many were revoked)."""
    async with conn.transaction():
        key = await create_api_key(conn, account_id)
        return key, await revoke_api_keys(conn, account_id, keep=key) if revoke_others else 0


async def account_for_key(conn: asyncpg.Connection, key: str) -> Account | None:
    """The account a live API key belongs to, or None."""
    row = await conn.fetchrow(
        """SELECT a.id, a.code, a.name, a.kind, a.role FROM api_keys k JOIN accounts a ON a.id = k.account_id
           WHERE k.key_hash = $1 AND k.revoked_at IS NULL""",
        hash_key(key),
    )
    return Account(**dict(row)) if row else None
