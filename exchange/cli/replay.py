"""`carbonx replay`: replay a command stream through an order book (built by the matching issue)."""

from __future__ import annotations

import typer

app = typer.Typer()
