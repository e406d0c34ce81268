"""Black-box helpers for the network API: the whole exchange on loopback ports in a thread of its
own (api/server.py, real PostgreSQL), and a small world built through the REST API as an operator
would build it.

Tests talk to it only as clients do: HTTP with httpx, websockets with the websockets library.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from api.server import Exchange
from exchange import accounts as acc
from exchange.database import drop_database, ensure_database, with_database

SYMBOL = "FOREST-2023"


class ServerThread:
    """api.server.Exchange running in its own event loop on a background thread."""

    def __init__(self, dsn: str, **options: Any) -> None:
        self.dsn = dsn
        self.ops_key: str | None = None  # the operator's, when a fixture made one
        self.options = {"http_port": 0, "ws_port": 0, **options}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="carbonx-test-server")
        self.exchange: Exchange | None = None

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self.thread.start()
        self.exchange = Exchange(self.dsn, **self.options)
        self.call(self.exchange.start())
        return self

    def stop(self) -> None:
        if self.exchange is not None:
            self.call(self.exchange.stop())
            self.exchange = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def http(self) -> str:
        return self.exchange.http_url

    @property
    def ws(self) -> str:
        return self.exchange.ws_url

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def own_server(pg_server: str, template_db: str, run: Callable[[Any], Any], label: str,
               **options: Any) -> Iterator[ServerThread]:
    """A database of its own (from the migrated template) served by the whole exchange, for a
    module's tests to share: a server and world per test would cost a second or more each. The
    server carries its operator key and database URL (`ops_key`, `dsn`); the database is dropped
    after."""
    # The process id alone may repeat (a killed run's database left on a shared DATABASE_URL
    # server, in a container that reuses small ids): a leftover must never be served as fresh.
    name = f"cx_{label}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    if not run(ensure_database(pg_server, name, template=template_db)):
        raise RuntimeError(f"database {name} exists already")
    dsn = with_database(pg_server, name)
    try:
        key = run(operator_key(dsn))
        with ServerThread(dsn, **options) as server:
            server.ops_key, server.dsn = key, dsn
            yield server
    finally:
        run(drop_database(pg_server, name))


def said_until_ready(stream: Any, what: str, timeout: float = 90) -> str:
    """The lines a starting `carbonx serve` wrote to `stream` up to its `ready` (asserted)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.strip() == "ready":
            break
    said = "\n".join(lines)
    assert lines and lines[-1] == "ready", f"{what} did not start:\n{said}"
    return said


def db_rows(run: Callable[[Any], Any], dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """`sql`'s rows, read on a connection of its own (what a test checks behind the API's back)."""
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()
    return run(fetch())


async def operator_key(dsn: str, code: str = "OPS") -> str:
    """The operator account and its key, made directly in the database (bootstrap)."""
    conn = await asyncpg.connect(dsn)
    try:
        try:
            a = await acc.create_account(conn, code, "Registry operator", "operator", "operator")
        except Exception:
            a = await acc.get_account(conn, code)
        return await acc.create_api_key(conn, a.id)
    finally:
        await conn.close()


def client(base: str, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=30)


def ok(r: httpx.Response, status: int | tuple[int, ...] = (200, 201)) -> Any:
    wanted = (status,) if isinstance(status, int) else status
    assert r.status_code in wanted, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


@dataclass
class World:
    """Keys of the accounts the tests use: OPS (operator), DEV (seller), BUY and BUY2 (buyers)."""

    base: str
    keys: dict[str, str] = field(default_factory=dict)

    def as_(self, code: str) -> httpx.Client:
        return client(self.base, self.keys[code])


def build_world(base: str, ops_key: str, symbol: str = SYMBOL, issue_tonnes: str = "1000.000",
                cash: str = "1000000.00", listing: dict | None = None, buyers: tuple[str, ...] = ("BUY", "BUY2")
                ) -> World:
    """Accounts, a project, an issuance, a listing and funded buyers, all through the REST API."""
    w = World(base, {"OPS": ops_key})
    project, vintage = symbol.rsplit("-", 1)
    with client(base, ops_key) as ops:
        for code, kind in (("DEV", "project_developer"), *((b, "enterprise") for b in buyers)):
            w.keys[code] = ok(ops.post("/v1/accounts", json={"code": code, "kind": kind}), 201)["api_key"]
        ok(ops.post("/v1/registry/projects", json={"code": project, "name": "City forest park carbon sink",
                                                   "methodology": "forest_carbon_sink", "developer": "DEV"}), 201)
        ok(ops.post("/v1/registry/issuances", json={"project": project, "vintage": int(vintage),
                                                    "quantity": issue_tonnes}), 201)
        ok(ops.post("/v1/instruments", json={"symbol": symbol, "reference_price": "35.00", "always_open": True,
                                             "maker_fee_bp": 5, "taker_fee_bp": 10, **(listing or {})}), 201)
        for b in (*buyers, "DEV"):
            ok(ops.post(f"/v1/accounts/{b}/deposits", json={"amount": cash, "reference": f"seed-{b}"}), 201)
    return w


def cancel_left_orders(world: World, codes: tuple[str, ...] = ("DEV", "BUY", "BUY2"), symbol: str = SYMBOL) -> None:
    """Cancel the orders the accounts `codes` left resting in `symbol` (a shared server's fixture
    tidying after each test)."""
    for code in codes:
        with world.as_(code) as h:
            ok(h.delete("/v1/orders", params={"symbol": symbol}))
