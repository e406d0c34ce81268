"""The `carbonx` command line: one Typer app with a sub-command group per area."""

from __future__ import annotations

import typer

from exchange.cli import accounts, cash, clearing, db, demo, registry, replay, serve

app = typer.Typer(
    name="carbonx",
    help=(
        "carbonx — exchange, clearing house and registry for certified carbon-inclusion "
        "reductions (碳普惠核证减排量).\n\n"
        "With no DATABASE_URL, every command starts an embedded PostgreSQL under the data "
        "directory (--data-dir, CARBONX_DATA_DIR, default ~/.local/share/carbonx) and stops it "
        "when done."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(db.app, name="db", help="Create, migrate and inspect the database.")
app.add_typer(registry.app, name="registry", help="Projects, issuances, serials, transfers, retirements.")
app.add_typer(accounts.app, name="accounts", help="Participants' accounts and API keys.")
app.add_typer(cash.app, name="cash", help="Cash deposits, withdrawals and balances (double entry).")
app.command(name="demo")(demo.demo)
app.command(name="serve")(serve.serve)
app.command(name="reconcile")(clearing.reconcile)
app.add_typer(clearing.app, name="clearing", help="Settlement: end-of-day reports, settling a stopped exchange.")
app.registered_commands.extend(replay.app.registered_commands)


def main() -> None:
    """Entry point of the `carbonx` console script."""
    app(prog_name="carbonx")
