"""The commands that look at what a run made: `inspect` (a few lines or JSON about any
file the project writes) and `report` (a self-contained HTML page about an esm_all.pt).

Kept apart from cli.py's commands that make things; cli.py registers them under its error
guard, so they map errors to one line and an exit code like every other command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from esm2_batch.cli_flags import option

__all__ = ["inspect_command", "report_command"]


def inspect_command(
    file: Annotated[Path, typer.Argument(help="esm_all.pt, a *_ESM.pt, a residue store "
                                         "directory, an export (.npz, .parquet, .h5, .pt) "
                                         "or an .h5ad written with --write_h5ad.")],
    as_json: Annotated[bool, option("--json", help="Print one JSON object instead of the "
                                    "summary lines.")] = False,
) -> None:
    """What a file holds: model, weights, settings, gene counts, lengths, matrices. Reads
    meta and shapes only (no model, no torch for .pt files)."""
    from esm2_batch.outputs.inspect import as_json as to_json
    from esm2_batch.outputs.inspect import inspect_file, summary_lines

    report = inspect_file(file)
    if as_json:
        typer.echo(to_json(report))
        return
    for line in summary_lines(report):
        typer.echo(line)


def report_command(
    file: Annotated[Path, typer.Argument(help="esm_all.pt, or an .h5ad written with "
                                         "--write_h5ad.")],
    out: Annotated[Path, option("--out", help="The HTML page to write.")] = Path(
        "report.html"),
    genes: Annotated[str | None, option(
        "--genes", help="Comma-separated genes whose nearest neighbours to show and to label "
        "on the map (default: known markers present in the file).")] = None,
    hvg_file: Annotated[Path | None, option(
        "--hvg_file", help="Your gene list: say how many of its genes have a vector.")] = None,
) -> None:
    """Write one self-contained HTML page (no network needed to open it) about the file:
    the run, protein lengths, isoforms, nearest genes and a 2-D map of the gene vectors."""
    from esm2_batch.outputs.report import write_report

    wanted = [g.strip() for g in genes.split(",") if g.strip()] if genes else None
    typer.echo(write_report(file, out, genes=wanted, hvg_file=hvg_file).describe())
