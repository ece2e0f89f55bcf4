"""`healthspace study`: run a federated study from a researcher's connector over its STARTED transfers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from healthspace.client import ConnectorClient
from healthspace.client.http import ApiError
from healthspace.core.errors import HealthspaceError, ValidationError
from healthspace.lab import Site, Study, StudyResult, run_study, site_from_transfer

__all__ = ["load_sites", "study_app"]

study_app = typer.Typer(
    help="Run federated studies over the compute-to-data transfers you hold.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)


@study_app.callback()
def _group() -> None:
    """Federated studies: fan a query spec out to providers' data planes, verify and combine."""


def _dataset_matches(dataset_id: str, wanted: list[str]) -> bool:
    # A local name (the part after the last ':') picks the same kind of dataset at every provider.
    return dataset_id in wanted or dataset_id.rsplit(":", 1)[-1] in wanted


def load_sites(
    space: dict[str, Any],
    participant: str,
    only: list[str] | None = None,
    datasets: list[str] | None = None,
) -> list[Site]:
    """Sites from `participant`'s STARTED consumer transfers, read with its researcher key from space.json.

    `only` keeps these providers; `datasets` keeps transfers under agreements for these datasets (full
    ids, or local names such as `t2d-cohort` matching `urn:healthspace:<provider>:t2d-cohort`), which
    matters when a provider offers several datasets (one for aggregates, one for models).
    """
    found = [p for p in space.get("participants", []) if p.get("id") == participant]
    if not found:
        raise ValidationError(f"{participant!r} is not a participant of this space file")
    me = found[0]
    key = (me.get("api_keys") or {}).get("researcher")
    if not key:
        raise ValidationError(f"the space file holds no researcher key for {participant!r}")
    with ConnectorClient(me["url"], key, timeout=30) as client:
        transfers = client.transfers(limit=1000)
        dataset_of = {a["id"]: a["dataset_id"] for a in client.agreements()} if datasets else {}
    sites: dict[str, Site] = {}
    for t in transfers:
        if t.get("role") != "consumer" or t.get("state") != "STARTED" or not t.get("data_address"):
            continue
        if datasets and not _dataset_matches(dataset_of.get(t.get("agreement_id", ""), ""), datasets):
            continue
        site = site_from_transfer(t)
        if only and site.id not in only:
            continue
        sites[site.id] = site  # the newest transfer per provider wins (the list is newest first or last)
    if not sites:
        which = f" for {', '.join(datasets)}" if datasets else ""
        raise ValidationError(f"{participant!r} has no STARTED compute-to-data transfer{which} to use")
    return list(sites.values())


def _print(result: StudyResult) -> None:
    table = Table(
        "site", "status", "HTTP", "job", "ε spent", "ms", "detail", title=f"study: {result.scenario}"
    )
    for s in result.sites:
        detail = s.detail if not s.reasons else f"{s.detail}: {'; '.join(s.reasons)}"
        table.add_row(
            s.site,
            s.status,
            str(s.http_status or "-"),
            s.job_id or "-",
            f"{s.epsilon_spent:g}",
            f"{s.elapsed_ms:.0f}",
            detail[:200],
        )
    console.print(table)
    combined = Table("analysis", "type", "combined", "exact", title="combined over sites with status ok")
    for aid, a in result.combined.items():
        value = {k: v for k, v in a.items() if k not in ("type", "exact")}
        combined.add_row(aid, str(a.get("type")), json.dumps(value), str(a.get("exact", "-")))
    console.print(combined)
    if result.provenance["held"]:
        console.print(
            f"[yellow]held for output review at {', '.join(result.provenance['held'])}: not combined; "
            "once released, `lab.fetch_released` collects them (job ids in --json)[/yellow]"
        )
    if result.provenance["missing"]:
        console.print(
            f"[yellow]partial: {', '.join(result.provenance['missing'])} did not contribute[/yellow]"
        )


@study_app.command("run")
def run_command(
    spec_file: Annotated[
        Path, typer.Argument(help="Query spec (JSON, version 1).", exists=True, dir_okay=False)
    ],
    scenario: Annotated[
        str, typer.Option("--scenario", help="The registered usage scenario the study serves.")
    ],
    space_file: Annotated[Path, typer.Option("--space", help="space.json written by `healthspace demo`.")],
    participant: Annotated[
        str, typer.Option("--as", help="Your participant id (its researcher key is used).")
    ],
    site: Annotated[
        list[str] | None, typer.Option("--site", help="Only these providers (repeatable).")
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            "--dataset",
            help="Only transfers under agreements for this dataset: an id, or a local name such as "
            "t2d-cohort for every provider's urn:healthspace:<provider>:t2d-cohort (repeatable).",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds each site has to answer.")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Send SPEC to every provider you hold a STARTED transfer with; verify, combine and print."""
    try:
        spec = json.loads(spec_file.read_text())
        space = json.loads(space_file.read_text())
        sites = load_sites(space, participant, site, dataset)
        result = run_study(Study(scenario, spec, sites), timeout_s=timeout)
    except (HealthspaceError, ApiError) as exc:
        err.print(f"[red]error:[/red] {getattr(exc, 'detail', exc)}")
        raise typer.Exit(code=1) from None
    except (OSError, json.JSONDecodeError, httpx.HTTPError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        _print(result)
    if not any(s.ok for s in result.sites):
        raise typer.Exit(code=2)
