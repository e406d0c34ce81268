"""`carbonx clearing report|settle` and `carbonx reconcile`."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Annotated

import asyncpg
import orjson
import typer

from clearing.report import SettledTrade, summarise, write_csv
from exchange import projector
from exchange.cli.common import DataDir, fail, run_db
from exchange.errors import CarbonxError
from exchange.reconcile import reconcile as run_reconcile
from matching.core import DAY_US, Listing
from matching.units import format_cash, format_price, format_tonnes

app = typer.Typer(no_args_is_help=True)

_CST_US = 8 * 3_600_000_000


def _day_bounds(date: str) -> tuple[int, int]:
    try:
        day = dt.date.fromisoformat(date)
    except ValueError:
        fail(f"--date must be YYYY-MM-DD, got {date!r}", "invalid_date")
    start = (day - dt.date(1970, 1, 1)).days * DAY_US - _CST_US  # Shanghai midnight in UTC µs
    return start, start + DAY_US


async def _ticks(conn: asyncpg.Connection) -> dict[str, int]:
    """Each instrument's tick, from the journal's listing commands."""
    rows = await conn.fetch("SELECT command FROM journal WHERE position('\"op\":\"list\"' in convert_from(command, "
                            "'UTF8')) > 0")
    ticks = {}
    for r in rows:
        cmd = orjson.loads(r["command"])
        try:
            ticks[cmd["symbol"]] = Listing.from_wire(cmd.get("rules") or {}).rules.tick
        except (KeyError, TypeError, ValueError):
            continue
    return ticks


@app.command()
def report(
    date: Annotated[str, typer.Option(help="Trading day in Asia/Shanghai, YYYY-MM-DD.")],
    out: Annotated[Path | None, typer.Option(help="CSV file to write (default settlement-DATE.csv here).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Write the day's settlement report as CSV and print a summary."""
    start, end = _day_bounds(date)
    path = out or Path(f"settlement-{date}.csv")

    async def body(conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            """SELECT t.symbol, t.trade_id, b.code AS buyer, s.code AS seller, t.price_fen, t.qty_kg, t.value_fen,
                      t.buyer_fee_fen, t.seller_fee_fen
               FROM settled_trades t JOIN accounts b ON b.id = t.buyer_id JOIN accounts s ON s.id = t.seller_id
               WHERE t.ts >= $1 AND t.ts < $2 ORDER BY t.symbol, t.trade_id""", start, end)
        trades = [SettledTrade(*r) for r in rows]
        day = summarise(date, trades, await _ticks(conn))
        try:
            with path.open("w", encoding="utf-8", newline="") as f:
                n = write_csv(day, f)
        except OSError as e:  # the file's problem, not the database's
            raise CarbonxError("cannot_write", f"cannot write the report to {str(path)!r}: {e.strerror or e}") from None
        typer.echo(f"settlement report for {date} (Asia/Shanghai): {len(trades):,} trades → {path} ({n} rows)")
        for symbol, i in sorted(day.instruments.items()):
            typer.echo(f"  {symbol}: {format_tonnes(i.volume)} t in {i.trades:,} trades, value "
                       f"{format_cash(i.value)} CNY, fees {format_cash(i.fees)} CNY, VWAP {format_price(i.vwap())}, "
                       f"close {format_price(day.close(symbol))}")
        pending = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM journal") - await projector.position(conn)
        if pending:
            typer.echo(f"note: {pending:,} journal entries are not settled yet; the report covers settled trades")

    run_db(data_dir, body)


@app.command()
def settle(
    data_dir: DataDir = None,
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="Journal entries per transaction.")] = projector.BATCH,
) -> None:
    """Apply journaled but unsettled entries to the registry and ledger (the service does this
    itself; this is for a stopped exchange)."""

    async def body(conn: asyncpg.Connection) -> None:
        start = await projector.position(conn)
        end = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM journal")
        done = 0
        while n := await projector.project(conn, batch):
            done += n
            if end - start >= 50_000:
                sys.stderr.write(f"\rsettling: {done:,}/{end - start:,}")
        if end - start >= 50_000:
            sys.stderr.write("\n")
        typer.echo(f"settled {done:,} journal entries; position {await projector.position(conn):,}")

    # A running service settles by itself, and holds its projector back around registry changes.
    run_db(data_dir, body, service_off=True)


def reconcile(data_dir: DataDir = None) -> None:
    """Prove the ledger, the settlement of every trade, the registry and the reservations sound."""

    async def body(conn: asyncpg.Connection) -> bool:
        result = await run_reconcile(conn)
        for c in result.checks:
            typer.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        return result.ok

    if not run_db(data_dir, body):
        raise typer.Exit(1)
