"""`carbonx registry`: projects, issuances, serials, transfers, retirements and operator actions."""

from __future__ import annotations

from typing import Annotated

import asyncpg
import typer

from exchange import registry as reg
from exchange.cli.common import DataDir, echo_rows, run_db, show_tonnes, tonnes
from exchange.serials import format_serial

app = typer.Typer(no_args_is_help=True)
project_app = typer.Typer(no_args_is_help=True)
app.add_typer(project_app, name="project", help="Register and list projects.")

Symbol = Annotated[str | None, typer.Option(help="Project vintage, e.g. LQS-FS-2023 (oldest issuance first).")]
IssuanceId = Annotated[int | None, typer.Option("--issuance", help="One issuance id instead of a symbol.")]
Reason = Annotated[str, typer.Option(help="Why: recorded in the serials' history.")]


def _print_pieces(pieces: list[reg.Piece], issuances: dict[int, reg.Issuance]) -> None:
    for p in pieces:
        iss = issuances[p.issuance_id]
        typer.echo(f"  {format_serial(iss.scheme, iss.project_code, iss.vintage, p.lo, p.hi)}  ({show_tonnes(p.size)})")


async def _issuances_of(conn: asyncpg.Connection, pieces: list[reg.Piece]) -> dict[int, reg.Issuance]:
    return {i: await reg.get_issuance(conn, i) for i in {p.issuance_id for p in pieces}}


@project_app.command("add")
def project_add(
    code: Annotated[str, typer.Argument(help="Project code, e.g. LQS-FS.")],
    name: Annotated[str, typer.Option(help="Project name.")],
    methodology: Annotated[str, typer.Option(help=f"One of: {', '.join(reg.METHODOLOGIES)}.")],
    developer: Annotated[str, typer.Option(help="The developer's account code.")],
    region: Annotated[str, typer.Option(help="Region, e.g. Chengdu.")] = "",
    scheme: Annotated[str, typer.Option(help="The scheme whose serials it carries.")] = "CDHF",
    data_dir: DataDir = None,
) -> None:
    """Register a project."""

    async def body(conn: asyncpg.Connection) -> None:
        p = await reg.add_project(conn, code=code, name=name, methodology=methodology, developer=developer,
                                  region=region, scheme=scheme)
        typer.echo(f"registered project {p.code}: {p.name} ({p.methodology})")

    run_db(data_dir, body)


@project_app.command("list")
def project_list(data_dir: DataDir = None) -> None:
    """List projects."""

    async def body(conn: asyncpg.Connection) -> None:
        echo_rows([p.__dict__ for p in await reg.list_projects(conn)], ["code", "methodology", "status", "name"])

    run_db(data_dir, body)


@app.command()
def issue(
    project: Annotated[str, typer.Argument(help="Project code.")],
    vintage: Annotated[int, typer.Argument(help="Vintage year.")],
    quantity: Annotated[str, typer.Argument(help="Tonnes, at most 3 decimals, e.g. 6000.000")],
    to: Annotated[str | None, typer.Option(help="Holder (default: the project's developer).")] = None,
    reference: Annotated[str, typer.Option(help="Verification reference.")] = "",
    data_dir: DataDir = None,
) -> None:
    """Issue verified reductions of a project vintage: new serials, held by the developer."""
    kg = tonnes(quantity)

    async def body(conn: asyncpg.Connection) -> None:
        i = await reg.issue(conn, project=project, vintage=vintage, quantity_kg=kg, to_account=to,
                            reference=reference)
        again = " (issued before with this reference: nothing new)" if i.repeated else ""
        typer.echo(f"issuance {i.id}: {show_tonnes(i.quantity)} as {i.serial}{again}")

    run_db(data_dir, body, member_assets=True)


@app.command()
def show(
    target: Annotated[str, typer.Argument(help="A project code, a symbol (PROJECT-VINTAGE) or an issuance id.")],
    data_dir: DataDir = None,
) -> None:
    """Show a project's issuances, or one issuance's blocks and who holds them."""

    async def body(conn: asyncpg.Connection) -> None:
        if target.isascii() and target.isdigit():
            issuances = [await reg.get_issuance(conn, int(target))]
        else:
            try:
                ids = await reg.resolve_issuances(conn, symbol=target)
            except reg.CarbonxError:
                proj = await reg.get_project(conn, target.upper())
                typer.echo(f"{proj.code}: {proj.name} ({proj.methodology}, {proj.status})")
                ids = tuple(i.id for i in await reg.list_issuances(conn, proj.id))
            issuances = [await reg.get_issuance(conn, i) for i in ids]
        for i in issuances:
            typer.echo(f"issuance {i.id}: vintage {i.vintage}, {show_tonnes(i.quantity)}, {i.serial}")
            rows = await reg.issuance_blocks(conn, i.id)
            echo_rows([
                {"serials": format_serial(i.scheme, i.project_code, i.vintage, r["lo"], r["hi"]),
                 "tonnes": show_tonnes(r["hi"] - r["lo"]), "holder": r["owner"], "state": r["state"],
                 "certificate": r["certificate_code"] or ""} for r in rows
            ], ["serials", "tonnes", "holder", "state", "certificate"])

    run_db(data_dir, body)


@app.command()
def serial(
    serial: Annotated[str, typer.Argument(help="A serial range or one unit, e.g. CDHF-LQS-FS-2023-0000000042.")],
    data_dir: DataDir = None,
) -> None:
    """Print the whole history of a unit (or range): issuance, every move, and where it is now."""

    async def body(conn: asyncpg.Connection) -> None:
        iss, rng, history, now = await reg.serial_history(conn, serial)
        typer.echo(f"{rng.text()}  ({show_tonnes(rng.size)}, issuance {iss.id})")
        typer.echo("history:")
        echo_rows([
            {"when": h["created_at"].strftime("%Y-%m-%d %H:%M:%S"), "cause": h["cause"], "ref": h["cause_ref"],
             "from": f"{h['from_account']}/{h['from_state']}" if h["from_account"] else "-",
             "to": f"{h['to_account']}/{h['to_state']}",
             "serials": format_serial(iss.scheme, iss.project_code, iss.vintage, h["lo"], h["hi"])}
            for h in history
        ], ["when", "cause", "ref", "from", "to", "serials"])
        typer.echo("now:")
        echo_rows([
            {"serials": format_serial(iss.scheme, iss.project_code, iss.vintage, r["lo"], r["hi"]),
             "holder": r["owner"], "state": r["state"]} for r in now
        ], ["serials", "holder", "state"])

    run_db(data_dir, body)


@app.command()
def transfer(
    from_account: Annotated[str, typer.Argument(help="Seller / sender account.")],
    to_account: Annotated[str, typer.Argument(help="Receiving account.")],
    quantity: Annotated[str, typer.Argument(help="Tonnes, at most 3 decimals.")],
    reference: Annotated[str, typer.Option(help="What the transfer is for (recorded as its cause).")],
    symbol: Symbol = None,
    issuance: IssuanceId = None,
    data_dir: DataDir = None,
) -> None:
    """Move available credits between accounts, lowest serials first."""
    kg = tonnes(quantity)

    async def body(conn: asyncpg.Connection) -> None:
        res = await reg.transfer(conn, from_account=from_account, to_account=to_account, quantity_kg=kg,
                                 symbol=symbol, issuance_id=issuance, cause_ref=reference)
        typer.echo(f"moved {show_tonnes(res.quantity)} from {from_account} to {to_account}:")
        _print_pieces(res.pieces, await _issuances_of(conn, res.pieces))

    run_db(data_dir, body, member_assets=True)


@app.command()
def retire(
    account: Annotated[str, typer.Argument(help="The account whose credits are retired.")],
    quantity: Annotated[str, typer.Argument(help="Tonnes, at most 3 decimals.")],
    beneficiary: Annotated[str, typer.Option(help="Who the reductions are claimed for.")],
    purpose: Annotated[str, typer.Option(help="What for, e.g. an event's name and date.")],
    symbol: Symbol = None,
    issuance: IssuanceId = None,
    data_dir: DataDir = None,
) -> None:
    """Retire credits for a beneficiary; prints the certificate code and the retired serials."""
    kg = tonnes(quantity)

    async def body(conn: asyncpg.Connection) -> None:
        r = await reg.retire(conn, account=account, quantity_kg=kg, beneficiary=beneficiary, purpose=purpose,
                             symbol=symbol, issuance_id=issuance)
        typer.echo(f"retired {show_tonnes(r.quantity_kg)} for {r.beneficiary} ({r.purpose})")
        typer.echo(f"certificate: {r.certificate_code}")
        for s in r.serials:
            typer.echo(f"  {s}")

    run_db(data_dir, body, member_assets=True)


def _operator_action(action, verb: str, serial: str, reason: str, data_dir) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        res = await action(conn, serial=serial, reason=reason)
        typer.echo(f"{verb} {show_tonnes(res.quantity)}:")
        _print_pieces(res.pieces, await _issuances_of(conn, res.pieces))

    run_db(data_dir, body, member_assets=True)


@app.command()
def freeze(serial: str, reason: Reason, data_dir: DataDir = None) -> None:
    """Operator: freeze available credits in a serial range."""
    _operator_action(reg.freeze, "froze", serial, reason, data_dir)


@app.command()
def unfreeze(serial: str, reason: Reason, data_dir: DataDir = None) -> None:
    """Operator: release frozen credits in a serial range."""
    _operator_action(reg.unfreeze, "unfroze", serial, reason, data_dir)


@app.command()
def cancel(serial: str, reason: Reason, data_dir: DataDir = None) -> None:
    """Operator: cancel available or frozen credits in a serial range, for good."""
    _operator_action(reg.cancel, "cancelled", serial, reason, data_dir)


@app.command()
def holdings(account: str, data_dir: DataDir = None) -> None:
    """An account's credits per project vintage and state."""

    async def body(conn: asyncpg.Connection) -> None:
        echo_rows([r | {"tonnes": show_tonnes(r["kg"])} for r in await reg.holdings(conn, account)],
                  ["project", "vintage", "state", "tonnes"])

    run_db(data_dir, body)
