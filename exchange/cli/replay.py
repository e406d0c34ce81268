"""`carbonx replay` and `carbonx replay-gen`: replay a command stream through an order book, and
write deterministic benchmark streams (format and engines: matching/replay.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from exchange.cli.common import fail, one_line_errors

app = typer.Typer()


@app.command(name="replay")
def replay_cmd(
    stream: Annotated[Path, typer.Argument(
        help="Text command stream (P/M/C/R lines).", exists=True, dir_okay=False, readable=True)],
    engine: Annotated[
        str, typer.Option(help="cython (batch, inside C) | cython-api (per command) | reference")
    ] = "cython",
    fills: Annotated[
        Path | None, typer.Option(help="Write fills here, one 'taker maker price qty' a line.", dir_okay=False)
    ] = None,
    reduce_loses_priority: Annotated[
        bool, typer.Option("--reduce-loses-priority", help="R re-queues the order at the back.")
    ] = False,
) -> None:
    """Replay STREAM and print the matching throughput (parsing excluded) and the fill count."""
    from matching.replay import REPLAY_ENGINES, StreamError, parse_file_chunks, replay

    if engine not in REPLAY_ENGINES:
        raise typer.BadParameter(f"engine must be one of {', '.join(REPLAY_ENGINES)}")
    with one_line_errors(os_code="os_error"):
        out = fills.open("w") if fills is not None else None
        try:
            result = replay(parse_file_chunks(str(stream)), engine, reduce_loses_priority, out)
        except StreamError as exc:  # a refusal of input, as every other command's: exit 1
            fail(str(exc), "invalid_stream")
        finally:
            if out is not None:
                out.close()
    rate = f"{result.rate:.0f} commands/s" if result.commands else "nothing to replay"
    typer.echo(f"{result.commands} commands in {result.seconds:.3f} s: {rate}")
    typer.echo(f"{result.fills} fills")


@app.command(name="replay-gen")
def replay_gen(
    out: Annotated[Path, typer.Argument(help="Where to write the stream.")],
    workload: Annotated[str, typer.Option(help="exchange-core | simple")] = "exchange-core",
    commands: Annotated[int, typer.Option(min=0, help="Number of commands.")] = 3_000_000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same stream.")] = 1,
) -> None:
    """Write a deterministic benchmark stream for `carbonx replay` (or another engine)."""
    from matching.workloads import WORKLOADS, write_stream

    if workload not in WORKLOADS:
        raise typer.BadParameter(f"workload must be one of {', '.join(WORKLOADS)}")
    with one_line_errors(os_code="os_error"):
        write_stream(str(out), workload, commands, seed)
    typer.echo(f"wrote {commands} {workload} commands to {out}")
