"""The `carbonx` console script: the command line of exchange/cli plus the network `serve`.

`carbonx serve` runs the exchange, clearing, the REST API and the websocket feed in one process
(api/server.py), prints where to reach them, and stops cleanly on SIGTERM or Ctrl-C. ``--demo``
first plays the launch scenario, lists its vintages, and keeps a small simulated market moving.
(`python -m exchange serve` is the same service without the network, for operators' tools.)
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Annotated

import typer

from api.auth import Limits
from api.server import Exchange
from exchange import accounts as acc
from exchange.cli import app
from exchange.cli.common import DataDir, fail, one_line_errors
from exchange.cli.serve import _Progress, serve_until_stopped
from exchange.config import load_settings
from exchange.database import prepare_database
from exchange.errors import CarbonxError
from exchange.service import refuse_while_serving
from matching.units import format_tonnes


async def _demo_setup(dsn: str) -> list[tuple[str, str]]:
    """Play the launch scenario (idempotent) and make API keys to try the API with (each start
    revokes the keys the previous one printed)."""
    import asyncpg

    from exchange.demo.scenario import load_scenario, run_scenario

    conn = await asyncpg.connect(dsn)
    try:
        # Refused beside a running exchange (before the scenario writes a thing, or the demo keys
        # it printed are revoked), and keeps one from starting until the scenario is in.
        await refuse_while_serving(conn, hold=True)
        res = await run_scenario(conn, say=lambda line: typer.echo(f"  demo: {line}", err=True))
        typer.echo(f"  demo: {'retired' if res.first_run else 'already retired'} "
                   f"{format_tonnes(res.retired_kg)} t for the launch event: certificate {res.certificate_code}",
                   err=True)
        sc = load_scenario()
        keys = []
        for code in (sc["operator"]["code"], sc["event"]["organiser"]):
            a = await acc.get_account(conn, code)
            keys.append((f"{code} ({a.role})", await acc.create_api_key(conn, a.id, demo=True)))
        return keys
    finally:
        await conn.close()


async def _serve(data_dir, host: str, http_port: int, ws_port: int, demo: bool, stdio: bool, snapshot_every: int,
                 flush_ms: float, book: str | None, rate: float, public_url: str) -> None:
    settings = load_settings(data_dir)
    dsn = await prepare_database(settings)
    keys = await _demo_setup(dsn) if demo else []
    progress = _Progress()
    limits = Limits(key_rate=rate, key_burst=2 * rate)
    ex = Exchange(dsn, host=host, http_port=http_port, ws_port=ws_port, limits=limits, public_url=public_url,
                  service_options={"engine": book, "snapshot_every": snapshot_every,
                                   "flush_interval": flush_ms / 1000, "progress": progress})
    began = time.perf_counter()
    await ex.start()
    progress.close()
    service = ex.service
    market = None
    if demo:
        from exchange.demo.market import DemoMarket, open_demo_market
        market = DemoMarket(service, await open_demo_market(service))
        await market.start()
    where = "DATABASE_URL" if settings.database_url else f"embedded PostgreSQL under {settings.pgdata}"
    say = lambda line: typer.echo(line, err=True)  # noqa: E731
    say(f"carbonx exchange: {where}")
    say(f"recovered {service.recovered:,} journal entries after the snapshot in {time.perf_counter() - began:.2f} s; "
        f"{len(service.core.listings)} instruments, {len(service.core.orders):,} open orders")
    say(f"state {service.core.state_digest()} at seq {service.core.seq}")
    say(f"REST      {ex.http_url}/v1   (OpenAPI: {ex.http_url}/openapi.json)")
    say(f"feed      {ex.ws_url}/v1/ws")
    say(f"binance   {ex.ws_url}/ws   and   {ex.http_url}/api/v3/depth?symbol=…")
    for who, key in keys:
        say(f"API key for {who}: {key}")
    say(f"web       {ex.http_url}/")
    if public_url:
        say(f"public    {public_url}   (certificates' verification links)")
    if keys:
        # The fragment never reaches the server; the page takes the organiser's key from it.
        say(f"open      {ex.http_url}/#key={keys[-1][1]}   (the web page, as the launch event's organiser)")
    stdin_failed = await serve_until_stopped(service, stdio, ready=lambda: say("ready"))
    if market is not None:
        await market.stop()
    failure = service.failure
    await ex.stop()
    if failure is not None:
        raise CarbonxError("unavailable", f"the exchange stopped: {failure}")
    if stdin_failed is not None:
        raise CarbonxError("stdin_failed", f"{stdin_failed}; the exchange stopped cleanly at seq {service.core.seq}")
    say(f"stopped cleanly at seq {service.core.seq}")


def serve(
    data_dir: DataDir = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(min=0, max=65535, help="REST port (0: any free port).")] = 8700,
    ws_port: Annotated[int, typer.Option(min=0, max=65535, help="Websocket feed port (0: any free port).")] = 8701,
    demo: Annotated[bool, typer.Option("--demo", help="Seed the launch scenario and simulate a market.")] = False,
    stdio: Annotated[bool, typer.Option("--stdio", help="Also take JSON-line commands on stdin.")] = False,
    snapshot_every: Annotated[int, typer.Option(min=1, help="Snapshot the core every N journal entries.")] = 250_000,
    flush_ms: Annotated[float, typer.Option(min=0.0, max=100.0, help="Group-commit wait in milliseconds.")] = 0.3,
    book: Annotated[str | None, typer.Option(help="Order book implementation: cython or reference.")] = None,
    rate_limit: Annotated[float, typer.Option(min=1.0, help="Requests per second per API key.")] = 50_000.0,
    public_url: Annotated[str, typer.Option(
        envvar="CARBONX_PUBLIC_URL", show_default=False,
        help="Where people reach the REST API (https://registry.example.cn): certificates' verification links "
             "and QR codes. Default: the address each request came to.")] = "",
) -> None:
    """Run the exchange, clearing, REST API and websocket feed until SIGTERM or Ctrl-C."""
    if book not in (None, "cython", "reference"):
        fail(f"unknown book {book!r}; expected cython or reference", "invalid_option")
    if public_url and (why := _bad_public_url(public_url)):
        fail(f"--public-url {public_url!r}: {why}", "invalid_option")
    with one_line_errors(os_code="os_error"):
        asyncio.run(_serve(data_dir, host, http_port, ws_port, demo, stdio, snapshot_every, flush_ms, book,
                           rate_limit, public_url.rstrip("/")))


def _bad_public_url(url: str) -> str | None:
    """Why `url` cannot be the base of a certificate's link, or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:
        return str(e)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "give an absolute http:// or https:// URL with a host name"
    if parts.query or parts.fragment or parts.username or parts.password:
        return "no query, fragment or credentials: certificates append /verify/CODE to it"
    return None


app.registered_commands[:] = [c for c in app.registered_commands if c.name != "serve"]
app.command(name="serve")(serve)


def main() -> None:
    """Entry point of the `carbonx` console script."""
    app(prog_name="carbonx")
