"""The `healthspace synth` command: write a synthetic hospital population to a directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from healthspace.core.errors import HealthspaceError
from healthspace.synth.sites import SITES

__all__ = ["synth_command"]


def synth_command(
    site: Annotated[
        str,
        typer.Option("--site", help=f"Site profile: one of {', '.join(sorted(SITES))}.", show_default=False),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Output directory (fhir/, omop/, manifest.json).", show_default=False),
    ],
    patients: Annotated[int, typer.Option("--patients", help="Number of patients to generate.")] = 1000,
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed; the same seed gives identical files.")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty output directory.")] = False,
) -> None:
    """Generate a synthetic hospital: FHIR R4 Bulk NDJSON, OMOP-style Parquet and a manifest."""
    from healthspace.synth.generate import generate

    console = Console(stderr=True)
    try:
        summary = generate(site, patients, seed, out, progress=not quiet, overwrite=force, console=console)
    except HealthspaceError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(code=2) from None
    if not quiet:
        Console(highlight=False).print(
            f"wrote {summary.patients:,} patients of site [bold]{summary.site}[/bold] (seed {summary.seed}): "
            f"{summary.total_rows:,} OMOP rows, {sum(summary.fhir_resources.values()):,} FHIR resources "
            f"in {summary.seconds:.1f} s to {summary.out}"
        )
