"""`healthspace data`: stores, FHIR ingestion, reports, quality; signed provenance and dataset lifecycle."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from healthspace.audit.log import AuditLog
from healthspace.core.db import Database
from healthspace.core.errors import HealthspaceError
from healthspace.core.settings import Settings
from healthspace.data import quarantine
from healthspace.data.csvmap import ingest_csv, load_mapping
from healthspace.data.ingest import IngestReport, ingest_bundle, ingest_ndjson
from healthspace.data.keys import LocalKeyStore
from healthspace.data.profile import StandardProfile, default_profile, load_profile
from healthspace.data.quality import run_quality
from healthspace.data.service import DataService, DatasetStatus
from healthspace.data.states import DatasetState
from healthspace.data.store import ClinicalStore
from healthspace.identity.keys import SigningKey

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
    csv_mapping: Annotated[
        Path | None,
        typer.Option("--csv-mapping", help="Files are CSV, turned into FHIR by this mapping (one batch)."),
    ] = None,
    profile: ProfileOpt = None,
    as_json: AsJson = False,
) -> None:
    """Ingest FHIR R4 into the store, validating against the standard; refused records go to quarantine."""
    try:
        with _open(store, keys) as s:
            std = _profile(profile)
            if csv_mapping is not None:
                mapping = load_mapping(csv_mapping)
                report = ingest_csv(s, [(f, mapping) for f in files], std, progress=not as_json)
                _print_report(report, as_json)
            elif bundle:
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


# --- registered datasets: signed provenance and lifecycle (need the connector's database and key) ---

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        help="The connector's data directory (database, signing key).",
        envvar="HEALTHSPACE_DATA_DIR",
    ),
]
RootOpt = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="Directory of the datasets (default: <data-dir>/clinical).",
        envvar="HEALTHSPACE_CLINICAL_ROOT",
    ),
]
OrgOpt = Annotated[
    str,
    typer.Option(
        "--organisation", help="Participant id named in provenance.", envvar="HEALTHSPACE_PARTICIPANT_ID"
    ),
]
ActorOpt = Annotated[
    str, typer.Option("--actor", help="Who acts (kept in the audit log).", envvar="HEALTHSPACE_ACTOR")
]
SigningKeyOpt = Annotated[
    Path | None, typer.Option("--signing-key", help="Ed25519 key file (default: <data-dir>/participant.key).")
]
Dataset = Annotated[str, typer.Argument(help="Dataset id.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept in the audit log).")]


@contextlib.contextmanager
def _service(
    data_dir: Path, root: Path | None, keys: Path, organisation: str, signing_key: Path | None
) -> Iterator[DataService]:
    """The data service over the connector's database. Run it while the connector is stopped. (The
    audit log itself takes a second writer since ADR 0003's addendum; the data service's stores were
    not reviewed for sharing with a running connector.)"""
    settings = Settings(data_dir=data_dir)
    key = SigningKey.load(signing_key or data_dir / "participant.key", settings.key_encryption_key())
    db = Database(settings.database_url_for("connector"), branches=["audit", "data"])
    audit = None
    try:
        audit = AuditLog(db, key)
        yield DataService(
            db, audit, key, LocalKeyStore(keys), root or data_dir / "clinical", organisation=organisation
        )
    finally:
        if audit is not None:
            audit.close()
        db.dispose()


def _print_status(s: DatasetStatus, as_json: bool) -> None:
    if as_json:
        console.print_json(orjson.dumps(s.__dict__).decode())
        return
    until = f", retained until {s.retain_until.isoformat()}" if s.retain_until else ""
    console.print(
        f"dataset [bold]{s.dataset_id}[/bold]: {s.state.value}{until} (since {s.updated_at.isoformat()} by "
        f"{s.updated_by}); next: {', '.join(s.allowed_moves) or 'none (final)'}"
    )


@data_app.command("register")
def register(
    dataset: Dataset,
    keys: KeyDir,
    data_dir: DataDir = Path(".healthspace"),
    root: RootOpt = None,
    organisation: OrgOpt = "local",
    actor: ActorOpt = "cli",
    signing_key: SigningKeyOpt = None,
    create: Annotated[bool, typer.Option("--create", help="Create an empty store for it.")] = False,
) -> None:
    """Register a dataset for lifecycle management (its store is <root>/live/DATASET)."""
    try:
        with _service(data_dir, root, keys, organisation, signing_key) as svc:
            s = svc.create_dataset(dataset, actor=actor) if create else svc.adopt(dataset, actor=actor)
    except HealthspaceError as exc:
        raise _fail(exc) from None
    _print_status(s, False)


@data_app.command("load")
def load(
    dataset: Dataset,
    files: Annotated[list[Path], typer.Argument(help="FHIR NDJSON files (one batch), or Bundle JSON files.")],
    keys: KeyDir,
    source_system: Annotated[str, typer.Option("--source-system", help="The system the export came from.")],
    data_dir: DataDir = Path(".healthspace"),
    root: RootOpt = None,
    organisation: OrgOpt = "local",
    actor: ActorOpt = "cli",
    signing_key: SigningKeyOpt = None,
    bundle: Annotated[bool, typer.Option("--bundle", help="Files are FHIR Bundles.")] = False,
    profile: ProfileOpt = None,
    as_json: AsJson = False,
) -> None:
    """Ingest into a registered dataset and record signed provenance (audited)."""
    try:
        with _service(data_dir, root, keys, organisation, signing_key) as svc:
            reports = svc.ingest(
                dataset,
                files,
                actor=actor,
                source_system=source_system,
                bundle=bundle,
                standard=_profile(profile),
            )
    except HealthspaceError as exc:
        raise _fail(exc) from None
    for r in reports:
        _print_report(r, as_json)


@data_app.command("status")
def status(
    keys: KeyDir,
    dataset: Annotated[str | None, typer.Argument(help="Dataset id (default: all).")] = None,
    data_dir: DataDir = Path(".healthspace"),
    root: RootOpt = None,
    organisation: OrgOpt = "local",
    signing_key: SigningKeyOpt = None,
    as_json: AsJson = False,
) -> None:
    """Lifecycle state, allowed moves and retention date of one or every registered dataset."""
    try:
        with _service(data_dir, root, keys, organisation, signing_key) as svc:
            found = [svc.status(dataset)] if dataset else svc.datasets()
    except HealthspaceError as exc:
        raise _fail(exc) from None
    for s in found:
        _print_status(s, as_json)


@data_app.command("move")
def move(
    dataset: Dataset,
    target: Annotated[DatasetState, typer.Argument(help="curated, published, suspended or acquired.")],
    keys: KeyDir,
    reason: ReasonOpt = "",
    data_dir: DataDir = Path(".healthspace"),
    root: RootOpt = None,
    organisation: OrgOpt = "local",
    actor: ActorOpt = "cli",
    signing_key: SigningKeyOpt = None,
) -> None:
    """Move a dataset in its lifecycle (curate, publish, suspend, resume, unpublish, reopen)."""
    try:
        with _service(data_dir, root, keys, organisation, signing_key) as svc:
            s = svc.transition(dataset, target, actor=actor, reason=reason)
    except HealthspaceError as exc:
        raise _fail(exc) from None
    _print_status(s, False)


@data_app.command("archive")
def archive(
    dataset: Dataset,
    keys: KeyDir,
    retain_until: Annotated[
        datetime, typer.Option("--retain-until", help="End of retention (ISO date/time; UTC if no zone).")
    ],
    reason: ReasonOpt = "",
    data_dir: DataDir = Path(".healthspace"),
    root: RootOpt = None,
    organisation: OrgOpt = "local",
    actor: ActorOpt = "cli",
    signing_key: SigningKeyOpt = None,
) -> None:
    """Archive a dataset (compacted, encrypted) until a retention date; it is destroyed when that passes."""
    until = retain_until if retain_until.tzinfo else retain_until.replace(tzinfo=UTC)
    try:
        with _service(data_dir, root, keys, organisation, signing_key) as svc:
            s = svc.archive(dataset, actor=actor, retain_until=until, reason=reason)
    except HealthspaceError as exc:
        raise _fail(exc) from None
    _print_status(s, False)


@data_app.command("restore")
def restore(
    dataset: Dataset,
    keys: KeyDir,
    reason: ReasonOpt = "",
    data_dir: DataDir = Path(".healthspace"),
    root: RootOpt = None,
    organisation: OrgOpt = "local",
    actor: ActorOpt = "cli",
    signing_key: SigningKeyOpt = None,
) -> None:
    """Restore an archived dataset to a live store (state curated), checking its content."""
    try:
        with _service(data_dir, root, keys, organisation, signing_key) as svc:
            s = svc.restore(dataset, actor=actor, reason=reason)
    except HealthspaceError as exc:
        raise _fail(exc) from None
    _print_status(s, False)


@data_app.command("destroy")
def destroy(
    dataset: Dataset,
    keys: KeyDir,
    reason: Annotated[str, typer.Option("--reason", help="Why (in the certificate and the audit log).")],
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: this cannot be undone.")] = False,
    data_dir: DataDir = Path(".healthspace"),
    root: RootOpt = None,
    organisation: OrgOpt = "local",
    actor: ActorOpt = "cli",
    signing_key: SigningKeyOpt = None,
) -> None:
    """Crypto-shred a dataset (key destroyed, files deleted) and print the signed destruction certificate."""
    if not yes:
        err.print("[red]Refused:[/red] destruction cannot be undone; add --yes")
        raise typer.Exit(code=1)
    try:
        with _service(data_dir, root, keys, organisation, signing_key) as svc:
            cert = svc.destroy(dataset, actor=actor, reason=reason)
    except HealthspaceError as exc:
        raise _fail(exc) from None
    doc = {
        "certificate": cert.document,
        "signature": cert.signature_b64,
        "key_id": cert.key_id,
        "public_key": cert.public_key,
    }
    console.print_json(orjson.dumps(doc).decode())


@data_app.command("erase-patient")
def erase_patient(
    dataset: Dataset,
    keys: KeyDir,
    reason: Annotated[str, typer.Option("--reason", help="Legal basis (kept in the audit log).")],
    patient: Annotated[str | None, typer.Option("--patient", help="FHIR Patient id.")] = None,
    person: Annotated[int | None, typer.Option("--person", help="OMOP person_id.")] = None,
    data_dir: DataDir = Path(".healthspace"),
    root: RootOpt = None,
    organisation: OrgOpt = "local",
    actor: ActorOpt = "cli",
    signing_key: SigningKeyOpt = None,
    as_json: AsJson = False,
) -> None:
    """Erase one patient from every table of a dataset (right to erasure, withdrawal with deletion)."""
    try:
        with _service(data_dir, root, keys, organisation, signing_key) as svc:
            r = svc.erase_patient(dataset, actor=actor, reason=reason, patient_id=patient, person_id=person)
    except HealthspaceError as exc:
        raise _fail(exc) from None
    if as_json:
        console.print_json(orjson.dumps({**r.__dict__, "total": r.total}).decode())
        return
    rows = ", ".join(f"{t}={n}" for t, n in r.rows_removed.items()) or "no rows"
    console.print(
        f"erased {r.subject} from {r.dataset_id}: {rows}; quarantine {r.quarantine_removed}; "
        f"{r.files_rewritten} file(s) rewritten"
    )


@data_app.command("provenance")
def provenance(
    dataset: Dataset,
    keys: KeyDir,
    batch: Annotated[str | None, typer.Option("--batch", help="One batch only.")] = None,
    data_dir: DataDir = Path(".healthspace"),
    root: RootOpt = None,
    organisation: OrgOpt = "local",
    signing_key: SigningKeyOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the Bundle here instead of stdout.")
    ] = None,
) -> None:
    """Export the dataset's signed provenance as a FHIR R4 Bundle of Provenance resources."""
    try:
        with _service(data_dir, root, keys, organisation, signing_key) as svc:
            resources = svc.provenance(dataset, batch)
    except HealthspaceError as exc:
        raise _fail(exc) from None
    body = orjson.dumps(
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]},
        option=orjson.OPT_INDENT_2,
    )
    if out is not None:
        out.write_bytes(body)
        console.print(f"wrote {len(resources)} Provenance resource(s) to {out.name}")
    else:
        typer.echo(body.decode())
