"""The SQL store on SQLite and PostgreSQL: append-only history, the one-query cohort, receipt chains."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from healthspace.consent.models import ConsentRecord, DecisionKind, Source, check_consent
from healthspace.consent.store import SqlConsentStore, StoredReceipt
from healthspace.core.db import Database
from healthspace.core.errors import ConflictError

S = "diabetes-outcomes-research"
T = datetime(2025, 1, 1, tzinfo=UTC)
CLASSES = ["demographics", "laboratory", "medications"]


def _record(person: int, kind: DecisionKind, decided: datetime, **kw: object) -> ConsentRecord:
    return ConsentRecord(
        person_id=person,
        scenario_id=str(kw.pop("scenario", S)),
        decision=kind,
        decided_at=decided,
        valid_from=kw.pop("start", decided),  # type: ignore[arg-type]
        decision_id=uuid.uuid4().hex,
        recorded_at=T,
        source=Source.IMPORT,
        actor="test",
        **kw,  # type: ignore[arg-type]
    )


def _random_history(rng: random.Random, person: int) -> list[ConsentRecord]:
    out = []
    for _ in range(rng.randint(0, 4)):
        decided = T + timedelta(days=rng.randint(0, 60), seconds=rng.randint(0, 3) * 3600)
        kind = rng.choice([DecisionKind.PERMIT, DecisionKind.DENY])
        start = decided + timedelta(days=rng.choice([0, 0, 5]))
        end = start + timedelta(days=rng.randint(1, 90)) if rng.random() < 0.4 else None
        classes = None
        if kind is DecisionKind.PERMIT and rng.random() < 0.5:
            classes = frozenset(rng.sample(CLASSES, rng.randint(1, 3)))
        scenario = S if rng.random() < 0.85 else "drug-safety-surveillance"
        out.append(
            _record(
                person, kind, decided, start=start, valid_until=end, data_classes=classes, scenario=scenario
            )
        )
    return out


def test_cohort_agrees_with_the_pure_decision_for_every_patient(db: Database) -> None:
    rng = random.Random(20260201)
    store = SqlConsentStore()
    histories = {p: _random_history(rng, p) for p in range(300)}
    with db.session() as s:
        # Insert in shuffled order: the cohort must not depend on recording order beyond ties.
        rows = [r for h in histories.values() for r in h]
        rng.shuffle(rows)
        store.append(s, rows)
    with db.session() as s:
        stored = {p: store.history(s, p) for p in histories}
        for day in (0, 10, 30, 61, 100):
            at = T + timedelta(days=day, hours=1)
            for classes in (["laboratory"], ["demographics", "medications"]):
                expected = [p for p, h in stored.items() if check_consent(h, S, at, classes).allowed]
                assert store.cohort(s, S, at, classes) == expected
    assert sum(len(h) for h in stored.values()) == len(rows)


def test_times_come_back_aware_in_utc(db: Database) -> None:
    store = SqlConsentStore()
    decided = datetime(2025, 3, 1, 17, 30, 15, 123456, tzinfo=UTC)
    with db.session() as s:
        store.append(s, [_record(7, DecisionKind.PERMIT, decided, valid_until=decided + timedelta(days=1))])
    with db.session() as s:
        (got,) = store.history(s, 7)
    assert got.decided_at == decided
    assert got.decided_at.tzinfo is not None
    assert got.valid_until == decided + timedelta(days=1)


def test_a_second_record_with_the_same_fhir_id_is_a_conflict(db: Database) -> None:
    store = SqlConsentStore()
    with db.session() as s:
        store.append(s, [_record(1, DecisionKind.PERMIT, T, fhir_id="c-1")])
    with pytest.raises(ConflictError), db.session() as s:
        store.append(s, [_record(2, DecisionKind.DENY, T, fhir_id="c-1")])
    with db.session() as s:
        assert store.history(s, 2) == []


def test_history_is_ordered_by_decision_time(db: Database) -> None:
    store = SqlConsentStore()
    with db.session() as s:
        store.append_one(s, _record(3, DecisionKind.DENY, T + timedelta(days=2)))
        store.append_one(s, _record(3, DecisionKind.PERMIT, T))
    with db.session() as s:
        assert [r.decision for r in store.history(s, 3)] == [DecisionKind.PERMIT, DecisionKind.DENY]


def test_a_forked_receipt_chain_is_refused(db: Database) -> None:
    store = SqlConsentStore()

    def receipt(rid: str) -> StoredReceipt:
        return StoredReceipt(rid, 5, 0, uuid.uuid4().hex, "{}", "0" * 64, T)

    with db.session() as s:
        store.add_receipt(s, receipt("r1"))
    with pytest.raises(ConflictError), db.session() as s:
        store.add_receipt(s, receipt("r2"))
    with db.session() as s:
        assert [r.receipt_id for r in store.receipts(s, 5)] == ["r1"]
