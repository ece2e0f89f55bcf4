"""`healthspace data`: create a clinical store, ingest FHIR, read validation and quality reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from healthspace.core.errors import HealthspaceError
from healthspace.data import quarantine
from healthspace.data.ingest import IngestReport, ingest_bundle, ingest_ndjson
from healthspace.data.keys import LocalKeyStore
from healthspace.data.profile import StandardProfile, default_profile, load_profile
from healthspace.data.quality import run_quality
from healthspace.data.store import ClinicalStore

__all__ = ["data_app"]

data_app = typer.Typer(
    help="Clinical data: ingest FHIR, validate, quarantine, quality.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)

StorePath = Annotated[
    Path, typer.Option("--store", help="Clinical store directory.", envvar="HEALTHSPACE_CLINICAL_STORE")
]
KeyDir = Annotated[
    Path, typer.Option("--keys", help="Local key store directory (KEKs).", envvar="HEALTHSPACE_KEY_DIR")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ProfileOpt = Annotated[
    Path | None, typer.Option("--profile", help="Standard profile JSON (default: the demo standard).")
]


def _open(store: Path, keys: Path) -> ClinicalStore:
    return ClinicalStore.open(store, LocalKeyStore(keys))


def _profile(path: Path | None) -> StandardProfile:
    return load_profile(path) if path else default_profile()


def _fail(exc: HealthspaceError) -> typer.Exit:
    err.print(f"[red]{exc.title}:[/red] {exc.detail}")
    return typer.Exit(code=1)


def _print_report(r: IngestReport, as_json: bool) -> None:
    if as_json:
        console.print_json(r.model_dump_json())
        return
    if r.already_ingested:
        console.print(f"[yellow]already ingested[/yellow]: {', '.join(r.sources)} (nothing added)")
        return
    console.print(
        f"batch [bold]{r.batch_id}[/bold] against {r.profile}: read {r.read:,}, "
        f"inserted {r.accepted:,}, duplicates {r.duplicates:,}, rejected {r.rejected:,} "
        f"in {r.seconds:.1f}s"
    )
    t = Table("what", "key", "count")
    for k, v in r.inserted.items():
        t.add_row("inserted", k, f"{v:,}")
    for k, v in r.rules.items():
        t.add_row("rule failed", k, f"{v:,}")
    for k, v in r.unmapped.items():
        t.add_row("unmapped type", k, f"{v:,}")
    for k, v in r.not_clinical.items():
        t.add_row("not clinical", k, f"{v:,}")
    for k, v in r.warnings.items():
        t.add_row("warning", k, f"{v:,}")
    console.print(t)


@data_app.command("init")
def init(
    store: StorePath,
    keys: KeyDir,
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset id (slug).")],
) -> None:
    """Create an empty encrypted clinical store with a fresh data key."""
    try:
        s = ClinicalStore.create(store, dataset, LocalKeyStore(keys))
    except HealthspaceError as exc:
        raise _fail(exc) from None
    console.print(f"created clinical store for dataset [bold]{s.dataset_id}[/bold] (key {s.key_id})")


@data_app.command("ingest")
def ingest(
    store: StorePath,
    keys: KeyDir,
    files: Annotated[list[Path], typer.Argument(help="FHIR NDJSON files (one batch), or Bundle JSON files.")],
    bundle: Annotated[
        bool, typer.Option("--bundle", help="Files are FHIR Bundles (one batch each).")
    ] = False,
    profile: ProfileOpt = None,
    as_json: AsJson = False,
) -> None:
    """Ingest FHIR R4 into the store, validating against the standard; refused records go to quarantine."""
    try:
        with _open(store, keys) as s:
            std = _profile(profile)
            if bundle:
                for f in files:
                    _print_report(ingest_bundle(s, f.read_bytes(), std, source=f.name), as_json)
            else:
                _print_report(ingest_ndjson(s, files, std, progress=not as_json), as_json)
    except HealthspaceError as exc:
        raise _fail(exc) from None


@data_app.command("report")
def report(
    store: StorePath,
    keys: KeyDir,
    show_quarantine: Annotated[
        bool, typer.Option("--quarantine", help="List open quarantined records.")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Validation reports of every batch, and the open quarantine."""
    try:
        with _open(store, keys) as s:
            entries = quarantine.list_entries(s)
            if as_json:
                doc = {
                    "dataset_id": s.dataset_id,
                    "batches": s.batches,
                    "open_quarantine": len(entries),
                    "quarantine": [e.model_dump(mode="json") for e in entries] if show_quarantine else None,
                }
                console.print_json(orjson.dumps(doc).decode())
                return
            t = Table("batch", "profile", "read", "inserted", "duplicates", "rejected", "rules failed")
            for b in s.batches:
                t.add_row(
                    b["batch_id"],
                    b["profile"],
                    f"{b['read']:,}",
                    f"{sum(b['inserted'].values()):,}",
                    f"{b['duplicates']:,}",
                    f"{b['rejected']:,}",
                    ", ".join(f"{k}={v}" for k, v in b["rules"].items()),
                )
            console.print(t)
            console.print(f"open quarantine: {len(entries):,} record(s)")
            if show_quarantine:
                q = Table("id", "source", "line", "type", "rules", "reason")
                for e in entries:
                    q.add_row(
                        e.quarantine_id,
                        e.source or "",
                        str(e.line or ""),
                        e.resource_type or "",
                        ", ".join(e.rules),
                        e.reason,
                    )
                console.print(q)
    except HealthspaceError as exc:
        raise _fail(exc) from None


@data_app.command("resubmit")
def resubmit(
    store: StorePath,
    keys: KeyDir,
    quarantine_id: Annotated[str, typer.Argument(help="Quarantined record id.")],
    fixed: Annotated[
        Path | None, typer.Option("--file", help="Corrected resource (JSON); default: re-submit as is.")
    ] = None,
    profile: ProfileOpt = None,
) -> None:
    """Re-submit a quarantined record, corrected or as it was (e.g. after the standard changed)."""
    try:
        with _open(store, keys) as s:
            r = quarantine.resubmit(
                s, quarantine_id, fixed.read_bytes() if fixed else None, _profile(profile)
            )
    except HealthspaceError as exc:
        raise _fail(exc) from None
    console.print(f"accepted in batch {r.batch_id}: inserted {r.accepted}, duplicates {r.duplicates}")


@data_app.command("quality")
def quality(
    store: StorePath,
    keys: KeyDir,
    as_json: AsJson = False,
    all_checks: Annotated[bool, typer.Option("--all", help="List every check, not only failures.")] = False,
) -> None:
    """Run the DQD-style quality checks and print the dataset quality report."""
    try:
        with _open(store, keys) as s:
            r = run_quality(s)
    except HealthspaceError as exc:
        raise _fail(exc) from None
    if as_json:
        console.print_json(r.model_dump_json())
        return
    st = r.statistics
    console.print(
        f"dataset [bold]{r.dataset_id}[/bold]: score {r.score:.1%} ({r.passed} passed, {r.failed} failed, "
        f"{r.not_applicable} not applicable) in {r.seconds:.2f}s; {st.persons:,} persons, "
        f"{st.first_date} to {st.last_date}"
    )
    t = Table("status", "check", "table", "field", "violated", "denominator", "%", "threshold %")
    for c in r.checks if all_checks else r.failures():
        t.add_row(
            c.status,
            c.check,
            c.table,
            c.field or "",
            f"{c.violated:,}",
            f"{c.denominator:,}",
            f"{c.pct:.2f}",
            f"{c.threshold:g}",
        )
    console.print(t)
