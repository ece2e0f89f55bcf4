"""Clinical data use cases: ingest with signed provenance, the dataset lifecycle, archive, destroy, erase.

`DataService` owns a directory of datasets (`<root>/live/<id>` for stores in use, `<root>/archive/<id>`
for archived ones), their lifecycle state in the control-plane database, and the audit entries of
everything it does. Every lifecycle move goes through `DATASET_LIFECYCLE`; the state row carries a
version so that two concurrent moves cannot both succeed.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from sqlalchemy import select, update

from healthspace.audit.log import AuditLog
from healthspace.audit.models import Outcome
from healthspace.core.clock import Clock, SystemClock
from healthspace.core.db import Database
from healthspace.core.errors import (
    ConflictError,
    ForbiddenError,
    InvalidTransitionError,
    NotFoundError,
    ValidationError,
)
from healthspace.data import quarantine
from healthspace.data.csvmap import CsvMapping, ingest_csv
from healthspace.data.errors import (
    DatasetDestroyedError,
    DatasetUnavailableError,
    KeyUnavailableError,
    StoreCorruptError,
)
from healthspace.data.ingest import IngestReport, ingest_bundle, ingest_ndjson, person_id_for
from healthspace.data.keys import KeyStore
from healthspace.data.profile import StandardProfile
from healthspace.data.provenance import (
    PROVENANCE_FORMAT,
    SignedDocument,
    Signer,
    file_sources,
    sign_document,
    to_fhir_provenance,
)
from healthspace.data.quality import QualityReport, run_quality
from healthspace.data.schema import CDM_TABLES, arrow_schema
from healthspace.data.states import DATASET_LIFECYCLE, READABLE, WRITABLE, DatasetState
from healthspace.data.store import QUARANTINE_SCHEMA, ClinicalStore
from healthspace.data.tables import CertificateRow, DatasetRow, ProvenanceRow

__all__ = [
    "CERTIFICATE_FORMAT",
    "DESTRUCTION_METHOD",
    "DataService",
    "DatasetStatus",
    "ErasureReport",
    "content_checksums",
]

CERTIFICATE_FORMAT = "healthspace-destruction-certificate/1"
DESTRUCTION_METHOD = (
    "crypto-shredding: the key-encryption key that wraps the dataset's data key was destroyed in the key "
    "store (AES-256-GCM envelope; every file is AES-GCM encrypted under keys wrapped by that data key), "
    "then every file of the live store and of its archive was deleted"
)
_MAX_REASON = 500
_ALL_TABLES = (*CDM_TABLES, "quarantine")


@dataclass(frozen=True)
class DatasetStatus:
    dataset_id: str
    state: DatasetState
    key_id: str
    created_at: datetime
    updated_at: datetime
    updated_by: str
    reason: str
    archived_at: datetime | None
    retain_until: datetime | None
    allowed_moves: list[str]

    @classmethod
    def of(cls, row: DatasetRow) -> DatasetStatus:
        state = DatasetState(row.state)
        return cls(
            row.dataset_id,
            state,
            row.key_id,
            row.created_at,
            row.updated_at,
            row.updated_by,
            row.reason,
            row.archived_at,
            row.retain_until,
            sorted(t.value for t in DATASET_LIFECYCLE.targets(state)),
        )


@dataclass(frozen=True)
class ErasureReport:
    """What erasing one patient removed; `subject` is a pseudonym, never the patient's id."""

    dataset_id: str
    subject: str
    operation_id: str
    rows_removed: dict[str, int] = field(default_factory=dict)
    quarantine_removed: int = 0
    files_rewritten: int = 0

    @property
    def total(self) -> int:
        return sum(self.rows_removed.values()) + self.quarantine_removed


def _checksum(con: Any, relation: str) -> dict[str, Any]:
    # Order-independent: the digest of the sorted digests of each row's text form, so a compacted copy
    # (rows in another order, other files) has the same checksum exactly when it has the same rows.
    n, digest = con.execute(
        f"SELECT count(*), md5(coalesce(string_agg(h, ',' ORDER BY h), '')) "  # noqa: S608
        f"FROM (SELECT md5(CAST(r AS VARCHAR)) AS h FROM {relation} r)"
    ).fetchone()
    return {"rows": int(n), "md5": str(digest)}


def content_checksums(store: ClinicalStore) -> dict[str, dict[str, Any]]:
    """Row count and an order-independent digest of the content of every table (and the quarantine).

    Raises `StoreCorruptError` when a listed file is missing or unreadable.
    """
    try:
        con = store.connect()
        return {t: _checksum(con, t) for t in _ALL_TABLES}
    except (OSError, pa.ArrowException, duckdb.Error) as exc:
        raise StoreCorruptError(f"dataset {store.dataset_id!r} has a missing or unreadable file") from exc


def _reason(reason: str) -> str:
    return reason.strip()[:_MAX_REASON]


class DataService:
    """The clinical datasets of one participant.

    Contract: a dataset's files are readable only in `READABLE` states (`DatasetUnavailableError`
    otherwise, `DatasetDestroyedError` once destroyed); batches are accepted only in `WRITABLE`
    states; every move not in `DATASET_LIFECYCLE` raises `InvalidTransitionError` and changes nothing;
    every ingest, move, erasure and destruction is in the audit log before the call returns.
    """

    def __init__(
        self,
        db: Database,
        audit: AuditLog,
        signer: Signer,
        keystore: KeyStore,
        root: Path,
        *,
        organisation: str,
        clock: Clock | None = None,
        import_root: Path | None = None,
    ) -> None:
        self._db = db
        self._audit = audit
        self._signer = signer
        self._keys = keystore
        self.root = Path(root)
        self.organisation = organisation
        self._clock: Clock = clock or SystemClock()
        self.import_root = Path(import_root).resolve() if import_root else None

    # --- paths and rows ----------------------------------------------------------------------------

    def live_path(self, dataset_id: str) -> Path:
        return self.root / "live" / dataset_id

    def archive_path(self, dataset_id: str) -> Path:
        return self.root / "archive" / dataset_id

    def _row(self, dataset_id: str) -> DatasetRow:
        with self._db.session() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFoundError(f"no dataset {dataset_id!r}")
            s.expunge(row)
            return row

    def _move(
        self,
        row: DatasetRow,
        target: DatasetState,
        actor: str,
        reason: str,
        **fields: Any,
    ) -> DatasetStatus:
        """Persist a checked move; fails with `ConflictError` when someone moved the dataset meanwhile."""
        now = self._clock.now()
        values = {
            "state": target.value,
            "updated_at": now,
            "updated_by": actor,
            "reason": _reason(reason),
            "version": row.version + 1,
            **fields,
        }
        with self._db.session() as s:
            done = s.execute(
                update(DatasetRow)
                .where(DatasetRow.dataset_id == row.dataset_id, DatasetRow.version == row.version)
                .values(**values)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise ConflictError(f"dataset {row.dataset_id!r} changed meanwhile; try again")
        return self.status(row.dataset_id)

    def _check_move(self, row: DatasetRow, target: DatasetState, actor: str, action: str) -> DatasetState:
        current = DatasetState(row.state)
        try:
            return DATASET_LIFECYCLE.transition(current, target)
        except InvalidTransitionError as exc:
            self._audit.record(actor, action, f"dataset:{row.dataset_id}", Outcome.DENIED, exc.detail)
            raise

    # --- registry ----------------------------------------------------------------------------------

    def create_dataset(self, dataset_id: str, *, actor: str, key_id: str | None = None) -> DatasetStatus:
        """Create an empty encrypted store for a new dataset (state `acquired`)."""
        with self._db.session() as s:
            if s.get(DatasetRow, dataset_id) is not None:
                raise ConflictError(f"dataset {dataset_id!r} already exists")
        store = ClinicalStore.create(self.live_path(dataset_id), dataset_id, self._keys, key_id=key_id)
        store.close()
        return self._register(dataset_id, store.key_id, actor, "data.dataset.create")

    def adopt(self, dataset_id: str, *, actor: str) -> DatasetStatus:
        """Register a store that already exists at `live_path(dataset_id)` (e.g. made by `data init`)."""
        with ClinicalStore.open(self.live_path(dataset_id), self._keys) as store:
            if store.dataset_id != dataset_id:
                raise ValidationError(f"the store at {dataset_id} holds dataset {store.dataset_id!r}")
            key_id = store.key_id
        return self._register(dataset_id, key_id, actor, "data.dataset.adopt")

    def _register(self, dataset_id: str, key_id: str, actor: str, action: str) -> DatasetStatus:
        now = self._clock.now()
        with self._db.session() as s:
            if s.get(DatasetRow, dataset_id) is not None:
                raise ConflictError(f"dataset {dataset_id!r} already exists")
            s.add(
                DatasetRow(
                    dataset_id=dataset_id,
                    state=DatasetState.ACQUIRED.value,
                    key_id=key_id,
                    created_at=now,
                    updated_at=now,
                    updated_by=actor,
                    reason="",
                    version=0,
                )
            )
        self._audit.record(
            actor, action, f"dataset:{dataset_id}", Outcome.SUCCESS, details={"key_id": key_id}
        )
        return self.status(dataset_id)

    def status(self, dataset_id: str) -> DatasetStatus:
        return DatasetStatus.of(self._row(dataset_id))

    def datasets(self) -> list[DatasetStatus]:
        with self._db.session() as s:
            return [
                DatasetStatus.of(r) for r in s.scalars(select(DatasetRow).order_by(DatasetRow.dataset_id))
            ]

    def open_store(self, dataset_id: str, *, for_writing: bool = False) -> ClinicalStore:
        """The live store of a dataset whose state allows reading (or writing); the caller closes it."""
        row = self._row(dataset_id)
        state = DatasetState(row.state)
        if state is DatasetState.DESTROYED:
            raise DatasetDestroyedError(
                f"dataset {dataset_id!r} was destroyed on {row.updated_at.isoformat()}"
            )
        allowed = WRITABLE if for_writing else READABLE
        if state not in allowed:
            raise DatasetUnavailableError(
                f"dataset {dataset_id!r} is {state.value}; this needs one of "
                + ", ".join(sorted(s.value for s in allowed)),
                state=state.value,
            )
        return ClinicalStore.open(self.live_path(dataset_id), self._keys)

    # --- ingest and provenance ---------------------------------------------------------------------

    def resolve_import(self, path: str | Path) -> Path:
        """A server-side import path, which must lie inside `import_root` (no escape by `..` or links)."""
        if self.import_root is None:
            raise ForbiddenError("server-side import is not enabled on this connector (no import directory)")
        p = Path(path)
        full = (p if p.is_absolute() else self.import_root / p).resolve()
        if not full.is_relative_to(self.import_root):
            raise ForbiddenError(f"{p.name} is outside the import directory")
        if not full.is_file():
            raise ValidationError(f"no file {p.name} in the import directory")
        return full

    def ingest(
        self,
        dataset_id: str,
        paths: Sequence[Path],
        *,
        actor: str,
        source_system: str,
        bundle: bool = False,
        standard: StandardProfile | None = None,
        csv_mapping: CsvMapping | None = None,
    ) -> list[IngestReport]:
        """Ingest NDJSON files as one batch (or each Bundle as a batch, or CSV files turned into FHIR by
        `csv_mapping` as one batch) and record signed provenance of the files as received."""
        if not source_system.strip():
            raise ValidationError("the source system is required for provenance")
        files = [Path(p) for p in paths]
        if not files:
            raise ValidationError("no files to ingest")
        for p in files:
            if not p.is_file():
                raise ValidationError(f"no such file: {p.name}")
        reports: list[IngestReport] = []
        with self.open_store(dataset_id, for_writing=True) as store:
            if csv_mapping is not None:
                sources = file_sources(files)
                r = ingest_csv(store, [(f, csv_mapping) for f in files], standard)
                reports.append(r)
                self._provenance(r, sources, actor, source_system)
            elif bundle:
                for f in files:
                    sources = file_sources([f])
                    r = ingest_bundle(store, f.read_bytes(), standard, source=f.name)
                    reports.append(r)
                    self._provenance(r, sources, actor, source_system)
            else:
                sources = file_sources(files)
                r = ingest_ndjson(store, files, standard)
                reports.append(r)
                self._provenance(r, sources, actor, source_system)
        return reports

    def resubmit(
        self,
        dataset_id: str,
        quarantine_id: str,
        resource: Mapping[str, Any] | bytes | None,
        *,
        actor: str,
        standard: StandardProfile | None = None,
    ) -> IngestReport:
        with self.open_store(dataset_id, for_writing=True) as store:
            raw = orjson.dumps(dict(resource)) if isinstance(resource, Mapping) else resource
            r = quarantine.resubmit(store, quarantine_id, raw, standard)
            entry_raw = raw if raw is not None else quarantine.get(store, quarantine_id).raw.encode()
        sources = [
            {
                "name": f"quarantine:{quarantine_id}",
                "bytes": len(entry_raw),
                "sha256": _sha256(entry_raw),
            }
        ]
        self._provenance(r, sources, actor, "quarantine-resubmission")
        return r

    def _provenance(
        self, r: IngestReport, sources: list[dict[str, Any]], actor: str, source_system: str
    ) -> SignedDocument | None:
        if r.already_ingested:
            return None
        recorded = r.finished_at or self._clock.now()
        doc = {
            "format": PROVENANCE_FORMAT,
            "dataset_id": r.dataset_id,
            "batch_id": r.batch_id,
            "organisation": self.organisation,
            "steward": actor,
            "source_system": source_system,
            "started_at": r.started_at.isoformat(),
            "recorded_at": recorded.isoformat(),
            "profile": r.profile,
            "sources": sources,
            "content_sha256": _sha256("".join(s["sha256"] for s in sources).encode()),
            "counts": {
                "read": r.read,
                "accepted": r.accepted,
                "duplicates": r.duplicates,
                "rejected": r.rejected,
                "inserted": dict(sorted(r.inserted.items())),
            },
        }
        signed = sign_document(doc, self._signer)
        with self._db.session() as s:
            s.add(
                ProvenanceRow(
                    batch_id=r.batch_id,
                    dataset_id=r.dataset_id,
                    recorded_at=recorded,
                    record=signed.canonical.decode(),
                    signature=signed.signature_b64,
                    key_id=signed.key_id,
                    public_key=signed.public_key,
                )
            )
        self._audit.record(
            actor,
            "data.ingest",
            f"dataset:{r.dataset_id}",
            Outcome.SUCCESS,
            f"batch {r.batch_id} from {source_system}",
            details={
                "batch_id": r.batch_id,
                "content_sha256": doc["content_sha256"],
                "record_sha256": signed.sha256,
                "signature": signed.signature_b64,
                "key_id": signed.key_id,
                "read": r.read,
                "accepted": r.accepted,
                "rejected": r.rejected,
            },
        )
        return signed

    def provenance_records(self, dataset_id: str, batch_id: str | None = None) -> list[SignedDocument]:
        """The signed provenance of a dataset's batches, oldest first (kept after destruction too)."""
        import base64

        self._row(dataset_id)
        q = select(ProvenanceRow).where(ProvenanceRow.dataset_id == dataset_id)
        if batch_id is not None:
            q = q.where(ProvenanceRow.batch_id == batch_id)
        with self._db.session() as s:
            rows = list(s.scalars(q.order_by(ProvenanceRow.recorded_at, ProvenanceRow.batch_id)))
            out = [
                SignedDocument(
                    orjson.loads(r.record),
                    r.record.encode(),
                    base64.b64decode(r.signature),
                    r.key_id,
                    r.public_key,
                )
                for r in rows
            ]
        if batch_id is not None and not out:
            raise NotFoundError(f"no provenance for batch {batch_id!r} of dataset {dataset_id!r}")
        return out

    def provenance(self, dataset_id: str, batch_id: str | None = None) -> list[dict[str, Any]]:
        """FHIR R4 Provenance resources of the dataset's batches."""
        return [to_fhir_provenance(d) for d in self.provenance_records(dataset_id, batch_id)]

    # --- reading -----------------------------------------------------------------------------------

    def report(self, dataset_id: str) -> dict[str, Any]:
        with self.open_store(dataset_id) as store:
            return {
                "dataset_id": dataset_id,
                "batches": store.batches,
                "open_quarantine": len(quarantine.list_entries(store)),
            }

    def quarantine(
        self, dataset_id: str, *, include_resolved: bool = False
    ) -> list[quarantine.QuarantineEntry]:
        with self.open_store(dataset_id) as store:
            return quarantine.list_entries(store, include_resolved=include_resolved)

    def quality(self, dataset_id: str) -> QualityReport:
        with self.open_store(dataset_id) as store:
            return run_quality(store)

    # --- lifecycle ---------------------------------------------------------------------------------

    def transition(
        self, dataset_id: str, target: DatasetState, *, actor: str, reason: str = ""
    ) -> DatasetStatus:
        """Moves that change no files: curate, publish, suspend, resume, unpublish, reopen.

        Archive, restore and destroy move files and have their own calls.
        """
        row = self._row(dataset_id)
        if target in (DatasetState.ARCHIVED, DatasetState.DESTROYED) or row.state == DatasetState.ARCHIVED:
            raise ValidationError("archive, restore and destroy have their own operations")
        self._check_move(row, target, actor, "data.dataset.transition")
        status = self._move(row, target, actor, reason)
        self._audit.record(
            actor,
            "data.dataset.transition",
            f"dataset:{dataset_id}",
            Outcome.SUCCESS,
            _reason(reason),
            details={"from": row.state, "to": target.value},
        )
        return status

    def archive(
        self, dataset_id: str, *, actor: str, retain_until: datetime, reason: str = ""
    ) -> DatasetStatus:
        """Compact the dataset into the archive (encrypted Parquet, same key), check, drop the live copy."""
        row = self._row(dataset_id)
        self._check_move(row, DatasetState.ARCHIVED, actor, "data.archive")
        now = self._clock.now()
        if retain_until.tzinfo is None:
            raise ValidationError("retain_until must be timezone-aware")
        if retain_until <= now:
            raise ValidationError("retain_until must lie in the future")
        dest = self.archive_path(dataset_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with ClinicalStore.open(self.live_path(dataset_id), self._keys) as live, live.locked():
            before = content_checksums(live)
            meta = {
                "archived_at": now.isoformat(),
                "retain_until": retain_until.isoformat(),
                "checksums": before,
            }
            live.export_compacted(dest, {"archive": meta})
        try:
            with ClinicalStore.open(dest, self._keys) as copy:
                after = content_checksums(copy)
            if after != before:
                raise StoreCorruptError(f"the archive of {dataset_id!r} does not match the live data")
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        status = self._move(
            row, DatasetState.ARCHIVED, actor, reason, archived_at=now, retain_until=retain_until
        )
        shutil.rmtree(self.live_path(dataset_id))
        self._audit.record(
            actor,
            "data.archive",
            f"dataset:{dataset_id}",
            Outcome.SUCCESS,
            _reason(reason),
            details={
                "retain_until": retain_until.isoformat(),
                "rows": {t: c["rows"] for t, c in before.items()},
                "key_id": row.key_id,
            },
        )
        return status

    def restore(self, dataset_id: str, *, actor: str, reason: str = "") -> DatasetStatus:
        """Bring an archived dataset back as a live store (state `curated`) after checking its content."""
        row = self._row(dataset_id)
        self._check_move(row, DatasetState.CURATED, actor, "data.restore")
        src = self.archive_path(dataset_id)
        live = self.live_path(dataset_id)
        with ClinicalStore.open(src, self._keys) as arch:
            recorded = (arch._m.doc.get("archive") or {}).get("checksums")
            now_sums = content_checksums(arch)
            if recorded != now_sums:
                raise StoreCorruptError(
                    f"the archive of {dataset_id!r} does not match its recorded checksums"
                )
            if live.exists():
                shutil.rmtree(live)  # a half-restored copy from an earlier failed attempt
            arch.export_compacted(live, {"archive": None})
        try:
            with ClinicalStore.open(live, self._keys) as restored:
                if content_checksums(restored) != now_sums:
                    raise StoreCorruptError(f"the restored copy of {dataset_id!r} does not match the archive")
        except BaseException:
            shutil.rmtree(live, ignore_errors=True)
            raise
        status = self._move(row, DatasetState.CURATED, actor, reason, archived_at=None, retain_until=None)
        shutil.rmtree(src)
        self._audit.record(
            actor,
            "data.restore",
            f"dataset:{dataset_id}",
            Outcome.SUCCESS,
            _reason(reason),
            details={"rows": {t: c["rows"] for t, c in now_sums.items()}},
        )
        return status

    def destroy(self, dataset_id: str, *, actor: str, reason: str) -> SignedDocument:
        """Crypto-shred the dataset: destroy its key, delete its files, and sign a destruction certificate."""
        if not reason.strip():
            raise ValidationError("a reason is required to destroy a dataset")
        row = self._row(dataset_id)
        self._check_move(row, DatasetState.DESTROYED, actor, "data.destroy")
        with self._db.session() as s:
            sharing = s.scalars(
                select(DatasetRow.dataset_id).where(
                    DatasetRow.key_id == row.key_id,
                    DatasetRow.dataset_id != dataset_id,
                    DatasetRow.state != DatasetState.DESTROYED.value,
                )
            ).all()
        if sharing:
            raise ConflictError(
                f"key {row.key_id!r} also protects {', '.join(sharing)}; destroying it would destroy them too"
            )
        dirs = [d for d in (self.live_path(dataset_id), self.archive_path(dataset_id)) if d.exists()]
        files = [f for d in dirs for f in d.rglob("*") if f.is_file()]
        rows: dict[str, int] | None = None
        try:
            store_dir = dirs[0] if dirs else None
            if store_dir is not None:
                with ClinicalStore.open(store_dir, self._keys) as st:
                    rows = st.row_counts()
        except KeyUnavailableError:
            rows = None
        # Key first: from this moment nothing of the dataset can be decrypted, even if deleting fails.
        self._keys.destroy(row.key_id)
        try:
            self._keys.unwrap(row.key_id, b"\x01" + b"\x00" * 60)
            key_gone = False
        except KeyUnavailableError:
            key_gone = True
        except Exception:  # any other answer means the key store still holds something
            key_gone = False
        if not key_gone:
            raise StoreCorruptError(f"key {row.key_id!r} is still in the key store after destroy")
        for d in dirs:
            shutil.rmtree(d)
        now = self._clock.now()
        cert = sign_document(
            {
                "format": CERTIFICATE_FORMAT,
                "dataset_id": dataset_id,
                "organisation": self.organisation,
                "destroyed_at": now.isoformat(),
                "destroyed_by": actor,
                "reason": _reason(reason),
                "method": DESTRUCTION_METHOD,
                "key_id": row.key_id,
                "key_destroyed": key_gone,
                "previous_state": row.state,
                "files_deleted": len(files),
                "rows": rows,
                "batches": len(self.provenance_records(dataset_id)),
            },
            self._signer,
        )
        with self._db.session() as s:
            s.add(
                CertificateRow(
                    dataset_id=dataset_id,
                    destroyed_at=now,
                    certificate=cert.canonical.decode(),
                    signature=cert.signature_b64,
                    key_id=cert.key_id,
                    public_key=cert.public_key,
                )
            )
        self._move(row, DatasetState.DESTROYED, actor, reason, retain_until=None)
        self._audit.record(
            actor,
            "data.destroy",
            f"dataset:{dataset_id}",
            Outcome.SUCCESS,
            _reason(reason),
            details={
                "certificate": cert.document,
                "certificate_sha256": cert.sha256,
                "signature": cert.signature_b64,
                "signer_key_id": cert.key_id,
            },
        )
        return cert

    def certificate(self, dataset_id: str) -> SignedDocument:
        import base64

        with self._db.session() as s:
            r = s.get(CertificateRow, dataset_id)
            if r is None:
                raise NotFoundError(f"dataset {dataset_id!r} has no destruction certificate")
            return SignedDocument(
                orjson.loads(r.certificate),
                r.certificate.encode(),
                base64.b64decode(r.signature),
                r.key_id,
                r.public_key,
            )

    # --- erasure -----------------------------------------------------------------------------------

    def erase_patient(
        self,
        dataset_id: str,
        *,
        actor: str,
        reason: str,
        patient_id: str | None = None,
        person_id: int | None = None,
    ) -> ErasureReport:
        """Remove every row of one patient from every table (and their quarantined records), live or archived.

        Identify the patient by FHIR id (`patient_id`) or OMOP `person_id`. Affected files are rewritten
        and swapped in by one manifest commit; the old files are then deleted. The audit entry names the
        patient only by a keyed pseudonym.
        """
        if (patient_id is None) == (person_id is None):
            raise ValidationError("give exactly one of patient_id and person_id")
        if not reason.strip():
            raise ValidationError("a reason (legal basis) is required to erase a patient")
        row = self._row(dataset_id)
        state = DatasetState(row.state)
        if state is DatasetState.DESTROYED:
            raise DatasetDestroyedError(f"dataset {dataset_id!r} was destroyed; nothing of it is held")
        path = self.archive_path(dataset_id) if state is DatasetState.ARCHIVED else self.live_path(dataset_id)
        fhir_id: str | None
        with ClinicalStore.open(path, self._keys) as store:
            if patient_id is not None:
                fhir_id = patient_id.removeprefix("Patient/")
                pid = person_id_for(fhir_id)
            else:
                pid = int(person_id or 0)
                found = (
                    store.connect()
                    .execute("SELECT hs_fhir_id FROM person WHERE person_id = ? LIMIT 1", [pid])
                    .fetchone()
                )
                fhir_id = str(found[0]).removeprefix("Patient/") if found else None
            subject = "patient:" + store.content_mac(b"erasure-subject\x00" + str(pid).encode())[:32]
            op_id = f"erase-{self._clock.now().strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
            removed: dict[str, int] = {}
            q_removed = 0
            rewritten = 0
            with store.rewrite(op_id, {"op_id": op_id, "kind": "erase-patient", "subject": subject}) as w:
                for table in CDM_TABLES:
                    for rel in store.segment_files(table):
                        data = store.read_file(rel, arrow_schema(table))
                        mask = pc.equal(data["person_id"], pa.scalar(pid, pa.int64()))
                        hits = pc.sum(pc.cast(mask, pa.int64())).as_py() or 0
                        if hits:
                            w.replace(table, rel, data.filter(pc.invert(pc.fill_null(mask, False))))
                            removed[table] = removed.get(table, 0) + hits
                            rewritten += 1
                if fhir_id is not None:
                    for rel in store.segment_files("quarantine"):
                        data = store.read_file(rel, QUARANTINE_SCHEMA)
                        keep = [
                            not _mentions(rt, rid, raw, fhir_id)
                            for rt, rid, raw in zip(
                                data["resource_type"].to_pylist(),
                                data["resource_id"].to_pylist(),
                                data["raw"].to_pylist(),
                                strict=True,
                            )
                        ]
                        gone = keep.count(False)
                        if gone:
                            w.replace("quarantine", rel, data.filter(pa.array(keep)))
                            q_removed += gone
                            rewritten += 1
                if state is DatasetState.ARCHIVED:
                    w.updates["archive"] = {
                        **(store._m.doc.get("archive") or {}),
                        "checksums": _checksums_after(store, w),
                    }
        report = ErasureReport(dataset_id, subject, op_id, removed, q_removed, rewritten)
        self._audit.record(
            actor,
            "data.erase-patient",
            subject,
            Outcome.SUCCESS,
            _reason(reason),
            details={
                "dataset_id": dataset_id,
                "operation_id": op_id,
                "rows_removed": removed,
                "quarantine_removed": q_removed,
                "files_rewritten": rewritten,
                "state": state.value,
            },
        )
        return report

    # --- retention ---------------------------------------------------------------------------------

    def due_for_destruction(self, now: datetime) -> list[str]:
        """Archived datasets whose retention date has passed."""
        with self._db.session() as s:
            return list(
                s.scalars(
                    select(DatasetRow.dataset_id)
                    .where(
                        DatasetRow.state == DatasetState.ARCHIVED.value,
                        DatasetRow.retain_until.is_not(None),
                        DatasetRow.retain_until <= now,
                    )
                    .order_by(DatasetRow.retain_until)
                )
            )


def _sha256(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()


def _mentions(rtype: str | None, rid: str | None, raw: bytes | None, fhir_id: str) -> bool:
    if rtype == "Patient" and rid == fhir_id:
        return True
    return raw is not None and f'"Patient/{fhir_id}"'.encode() in raw


def _checksums_after(store: ClinicalStore, w: Any) -> dict[str, dict[str, Any]]:
    """Checksums of the content the rewrite will commit (for an archive's recorded checksums)."""
    con = duckdb.connect(":memory:")
    con.execute("SET temp_directory = ''")
    try:
        out = {}
        for t in _ALL_TABLES:
            files = w.files_after(t)
            schema = QUARANTINE_SCHEMA if t == "quarantine" else arrow_schema(t)
            data = (
                pads.dataset(
                    [str(store.path / f) for f in files], schema=schema, format=store._crypto.read_format
                )
                if files
                else schema.empty_table()
            )
            con.register(t, data)
            out[t] = _checksum(con, t)
        return out
    finally:
        con.close()
