"""Storage of the consent registry: an append-only decision history and per-patient receipt chains."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import Table, func, insert, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from healthspace.consent.models import ConsentRecord, DecisionKind, Source, aware, classes_of_mask, mask_of
from healthspace.consent.tables import ConsentDecisionRow, ConsentReceiptRow
from healthspace.core.errors import ConflictError

__all__ = ["ConsentStore", "SqlConsentStore", "StoredReceipt"]

_D = cast(Table, ConsentDecisionRow.__table__)
# `version`'s statements, read before every job's cohort: built once.
_LAST_SEQ = select(func.coalesce(func.max(_D.c.seq), 0))
_ROW_COUNT = select(func.count()).select_from(_D)
_R = cast(Table, ConsentReceiptRow.__table__)
_IN_CHUNK = 900  # stays under SQLite's bound-parameter limit in IN lists


@dataclass(frozen=True, slots=True)
class StoredReceipt:
    """A signed receipt as stored: `document` is its exact JSON text, `digest` SHA-256 hex of that text."""

    receipt_id: str
    person_id: int
    chain_seq: int
    decision_id: str
    document: str
    digest: str
    issued_at: datetime


class ConsentStore(Protocol):
    """The consent registry's storage. Every method runs inside the caller's session (transaction).

    Contract: decisions are only inserted, never updated or deleted; `append` MUST raise
    `ConflictError` when a decision id or FHIR resource id is already stored; `cohort` MUST answer in
    one query and agree with `models.check_consent` for every patient; `add_receipt` MUST raise
    `ConflictError` when the patient's chain already has a receipt at that position.
    """

    def append(self, s: Session, records: Sequence[ConsentRecord]) -> None: ...

    def append_one(self, s: Session, record: ConsentRecord) -> ConsentRecord: ...

    def history(self, s: Session, person_id: int, scenario_id: str | None = None) -> list[ConsentRecord]: ...

    def cohort(self, s: Session, scenario_id: str, at: datetime, classes: Iterable[str]) -> list[int]: ...

    def version(self, s: Session) -> int:
        """A number that changes whenever a decision is committed (read it before the cohort it guards)."""
        ...

    def next_change(self, s: Session, scenario_id: str, at: datetime) -> datetime | None:
        """The first instant after `at` at which a recorded decision of the scenario starts or stops."""
        ...

    def by_fhir_ids(self, s: Session, fhir_ids: Iterable[str]) -> dict[str, ConsentRecord]: ...

    def scan(self, s: Session, person_id: int | None = None, page: int = 5000) -> Iterator[ConsentRecord]: ...

    def add_receipt(self, s: Session, receipt: StoredReceipt) -> None: ...

    def last_receipt(self, s: Session, person_id: int) -> StoredReceipt | None: ...

    def receipt(self, s: Session, receipt_id: str) -> StoredReceipt | None: ...

    def receipts(self, s: Session, person_id: int) -> list[StoredReceipt]: ...


def _row_values(r: ConsentRecord) -> dict[str, object]:
    return {
        "decision_id": r.decision_id,
        "fhir_id": r.fhir_id,
        "person_id": r.person_id,
        "patient_id": r.patient_id,
        "scenario_id": r.scenario_id,
        "decision": r.decision.value,
        "decided_at": r.decided_at,
        "valid_from": r.valid_from,
        "valid_until": r.valid_until,
        "class_mask": r.class_mask,
        "recorded_at": aware(r.recorded_at, "recorded_at") if r.recorded_at else None,
        "source": r.source.value,
        "actor": r.actor,
    }


def _record(row: Any) -> ConsentRecord:
    # Takes an ORM row or a Core row: both expose the columns as attributes.
    return ConsentRecord(
        person_id=row.person_id,
        scenario_id=row.scenario_id,
        decision=DecisionKind(row.decision),
        decided_at=row.decided_at,
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        data_classes=None if row.class_mask is None else classes_of_mask(row.class_mask),
        decision_id=row.decision_id,
        seq=row.seq,
        recorded_at=row.recorded_at,
        source=Source(row.source),
        actor=row.actor,
        fhir_id=row.fhir_id,
        patient_id=row.patient_id,
    )


def _receipt(row: ConsentReceiptRow) -> StoredReceipt:
    return StoredReceipt(
        row.receipt_id, row.person_id, row.chain_seq, row.decision_id, row.document, row.digest, row.issued_at
    )


class SqlConsentStore:
    """`ConsentStore` on the `consent` tables (SQLite or PostgreSQL)."""

    def append(self, s: Session, records: Sequence[ConsentRecord]) -> None:
        if not records:
            return
        for r in records:
            if not r.decision_id or r.recorded_at is None:
                raise ValueError("records are appended with a decision id and a recording time")
        try:
            s.execute(insert(_D), [_row_values(r) for r in records])
            s.flush()
        except IntegrityError:
            raise ConflictError("a decision id or FHIR resource id is already recorded") from None

    def append_one(self, s: Session, record: ConsentRecord) -> ConsentRecord:
        if not record.decision_id or record.recorded_at is None:
            raise ValueError("records are appended with a decision id and a recording time")
        row = ConsentDecisionRow(**_row_values(record))
        s.add(row)
        try:
            s.flush()
        except IntegrityError:
            raise ConflictError("a decision id or FHIR resource id is already recorded") from None
        return _record(row)

    def history(self, s: Session, person_id: int, scenario_id: str | None = None) -> list[ConsentRecord]:
        q = select(ConsentDecisionRow).where(ConsentDecisionRow.person_id == person_id)
        if scenario_id is not None:
            q = q.where(ConsentDecisionRow.scenario_id == scenario_id)
        q = q.order_by(ConsentDecisionRow.decided_at, ConsentDecisionRow.seq)
        return [_record(row) for row in s.scalars(q)]

    def cohort(self, s: Session, scenario_id: str, at: datetime, classes: Iterable[str]) -> list[int]:
        """Person ids whose governing decision at `at` permits every class in `classes` (sorted).

        One statement: rank the records in force at `at` per person by (decided_at, seq), keep the top
        one, and keep it only if it is a permit whose class mask (if any) covers the requested mask.
        """
        aware(at, "at")
        mask = mask_of(classes)
        in_force = (
            select(
                _D.c.person_id,
                _D.c.decision,
                _D.c.class_mask,
                func.row_number()
                .over(partition_by=_D.c.person_id, order_by=(_D.c.decided_at.desc(), _D.c.seq.desc()))
                .label("rank"),
            )
            .where(
                _D.c.scenario_id == scenario_id,
                _D.c.valid_from <= at,
                or_(_D.c.valid_until.is_(None), _D.c.valid_until > at),
            )
            .subquery()
        )
        q = (
            select(in_force.c.person_id)
            .where(
                in_force.c.rank == 1,
                in_force.c.decision == DecisionKind.PERMIT.value,
                or_(in_force.c.class_mask.is_(None), in_force.c.class_mask.bitwise_and(mask) == mask),
            )
            .order_by(in_force.c.person_id)
        )
        return list(s.execute(q).scalars())

    def version(self, s: Session) -> int:
        # Decisions are only ever inserted. On SQLite one transaction writes at a time and takes its seq
        # under the write lock, so seqs become visible in order and the largest one moves on every
        # commit (an index lookup). On PostgreSQL concurrent writers may commit out of seq order, so the
        # largest seq could stay put while a smaller one appears: the row count cannot.
        if s.get_bind().dialect.name == "sqlite":
            return int(s.execute(_LAST_SEQ).scalar_one())
        return int(s.execute(_ROW_COUNT).scalar_one())

    def next_change(self, s: Session, scenario_id: str, at: datetime) -> datetime | None:
        aware(at, "at")
        starts = select(func.min(_D.c.valid_from)).where(
            _D.c.scenario_id == scenario_id, _D.c.valid_from > at
        )
        ends = select(func.min(_D.c.valid_until)).where(
            _D.c.scenario_id == scenario_id, _D.c.valid_until > at
        )
        found = [v for v in (s.execute(starts).scalar_one(), s.execute(ends).scalar_one()) if v is not None]
        return min(aware(v, "valid time") for v in found) if found else None

    def by_fhir_ids(self, s: Session, fhir_ids: Iterable[str]) -> dict[str, ConsentRecord]:
        ids = list(dict.fromkeys(fhir_ids))
        out: dict[str, ConsentRecord] = {}
        for i in range(0, len(ids), _IN_CHUNK):
            q = select(ConsentDecisionRow).where(ConsentDecisionRow.fhir_id.in_(ids[i : i + _IN_CHUNK]))
            for row in s.scalars(q):
                if row.fhir_id is not None:
                    out[row.fhir_id] = _record(row)
        return out

    def scan(self, s: Session, person_id: int | None = None, page: int = 5000) -> Iterator[ConsentRecord]:
        """Every record in recording order (optionally of one patient), read page by page."""
        after = 0
        while True:
            # Core rows, not ORM objects: a full export must not grow the session's identity map.
            q = select(_D).where(_D.c.seq > after)
            if person_id is not None:
                q = q.where(_D.c.person_id == person_id)
            rows = s.execute(q.order_by(_D.c.seq).limit(page)).all()
            if not rows:
                return
            for row in rows:
                yield _record(row)
            after = rows[-1].seq

    def add_receipt(self, s: Session, receipt: StoredReceipt) -> None:
        s.add(
            ConsentReceiptRow(
                receipt_id=receipt.receipt_id,
                person_id=receipt.person_id,
                chain_seq=receipt.chain_seq,
                decision_id=receipt.decision_id,
                document=receipt.document,
                digest=receipt.digest,
                issued_at=receipt.issued_at,
            )
        )
        try:
            s.flush()
        except IntegrityError:
            raise ConflictError("the patient's receipt chain changed meanwhile; retry") from None

    def last_receipt(self, s: Session, person_id: int) -> StoredReceipt | None:
        q = (
            select(ConsentReceiptRow)
            .where(ConsentReceiptRow.person_id == person_id)
            .order_by(ConsentReceiptRow.chain_seq.desc())
            .limit(1)
        )
        row = s.scalars(q).first()
        return None if row is None else _receipt(row)

    def receipt(self, s: Session, receipt_id: str) -> StoredReceipt | None:
        row = s.get(ConsentReceiptRow, receipt_id)
        return None if row is None else _receipt(row)

    def receipts(self, s: Session, person_id: int) -> list[StoredReceipt]:
        q = (
            select(ConsentReceiptRow)
            .where(ConsentReceiptRow.person_id == person_id)
            .order_by(ConsentReceiptRow.chain_seq)
        )
        return [_receipt(row) for row in s.scalars(q)]
