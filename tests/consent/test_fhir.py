"""FHIR R4 Consent import and export: the synthetic NDJSON, idempotency, bad resources, round trip."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

from healthspace.consent.fhir import SCENARIO_CODE_SYSTEM, PatientRefs, from_fhir, to_fhir
from healthspace.consent.models import ConsentRecord, DecisionKind, Source
from healthspace.consent.service import ConsentService
from healthspace.core.db import Database
from healthspace.core.errors import ValidationError
from tests.consent.conftest import DIABETES, SYNTH_PATIENTS, pat, person

AT = datetime(2025, 6, 1, tzinfo=UTC)
SCENARIOS = (
    "diabetes-outcomes-research",
    "hospital-quality-improvement",
    "drug-safety-surveillance",
    "imaging-triage-ai-training",
)


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Database]:
    """These suites test FHIR and the engine join, not the store: SQLite alone keeps them fast."""
    database = Database(sqlite_url, branches=["audit", "consent"])
    yield database
    database.dispose()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def _consenting_by_pandas(synth_dir: Path, scenario: str, at: datetime) -> list[int]:
    """The independent truth: the generator's consent table, read with pandas (its person n is the FHIR
    Patient `gz-pat-n`, whose person id in the registry is the clinical store's hash of that id)."""
    c = pd.read_parquet(synth_dir / "omop" / "consent.parquet")
    ts = pd.Timestamp(at)
    ok = (
        (c.scenario_id == scenario)
        & (c.decision == "permit")
        & (c.decided_at <= ts)
        & (c.withdrawn_at.isna() | (c.withdrawn_at > ts))
    )
    return sorted(person(int(p)) for p in c.loc[ok, "person_id"])


def _consent(**provision: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "permit",
        "period": {"start": "2025-01-01T00:00:00Z"},
        "purpose": [{"system": SCENARIO_CODE_SYSTEM, "code": DIABETES}],
    }
    base.update(provision)
    return {
        "resourceType": "Consent",
        "id": "c-1",
        "status": "active",
        "patient": {"reference": "Patient/gz-pat-5"},
        "dateTime": "2025-01-01T00:00:00Z",
        "provision": base,
    }


def test_synthetic_ndjson_imports_every_resource(service: ConsentService, synth_dir: Path) -> None:
    report = service.import_ndjson(
        _lines(synth_dir / "fhir" / "Consent.ndjson"), actor="steward:k", batch=3000
    )
    assert (report.imported, report.rejected, report.conflicts) == (SYNTH_PATIENTS * 4, 0, 0)


def test_imported_cohorts_match_the_generator_table(service: ConsentService, synth_dir: Path) -> None:
    service.import_ndjson(_lines(synth_dir / "fhir" / "Consent.ndjson"), actor="steward:k")
    for scenario in SCENARIOS:
        for at in (AT, datetime(2025, 12, 31, tzinfo=UTC)):
            got = service.cohort(scenario, ["laboratory"], actor="t", at=at).person_ids.to_pylist()
            assert got == _consenting_by_pandas(synth_dir, scenario, at), (scenario, at)


def test_importing_twice_changes_nothing(service: ConsentService, synth_dir: Path) -> None:
    lines = _lines(synth_dir / "fhir" / "Consent.ndjson")
    service.import_ndjson(lines, actor="steward:k")
    again = service.import_ndjson(lines, actor="steward:k")
    assert (again.imported, again.unchanged, again.conflicts) == (0, len(lines), 0)


def test_a_changed_resource_with_a_known_id_is_a_conflict_and_not_applied(service: ConsentService) -> None:
    service.import_ndjson([orjson.dumps(_consent())], actor="s")
    changed = _consent(type="deny")
    report = service.import_ndjson([orjson.dumps(changed)], actor="s")
    assert (report.imported, report.conflicts) == (0, 1)
    assert [r.decision for r in service.history(pat(5), actor="t")] == [DecisionKind.PERMIT]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r: r.update(resourceType="Patient"), "resourceType"),
        (lambda r: r.update(status="draft"), "status"),
        (lambda r: r.update(patient={"reference": "Patient/sz-pat-5"}), "patient id"),
        (lambda r: r["provision"].update(type="maybe"), "provision.type"),
        (lambda r: r["provision"].update(purpose=[{"system": "x", "code": DIABETES}]), "usage scenario"),
        (lambda r: r["provision"].update(provision=[{"type": "deny"}]), "nested"),
        (lambda r: r.update(dateTime="2025-01-01"), "dateTime"),
        (lambda r: r.update(status="inactive"), "inactive permit"),
        (
            lambda r: r["provision"].update(
                **{"class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Foo"}]}
            ),
            "data class",
        ),
        (
            lambda r: r["provision"].update(
                period={"start": "2025-02-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"}
            ),
            "end after",
        ),
    ],
)
def test_a_malformed_resource_is_reported_with_its_reason(
    service: ConsentService, mutate: Any, reason: str
) -> None:
    bad = _consent()
    mutate(bad)
    report = service.import_ndjson([orjson.dumps(_consent() | {"id": "ok-1"}), orjson.dumps(bad)], actor="s")
    assert (report.imported, report.rejected) == (1, 1)
    assert report.rejections[0].line == 2
    assert reason in report.rejections[0].reason


def test_a_line_that_is_not_json_is_reported(service: ConsentService) -> None:
    report = service.import_ndjson([b"{not json"], actor="s")
    assert (report.rejected, report.rejections[0].reason) == (1, "not JSON")


def test_data_classes_are_read_from_provision_class() -> None:
    classes = [
        {"system": "http://hl7.org/fhir/resource-types", "code": c} for c in ("Observation", "Patient")
    ]
    rec = from_fhir(_consent(**{"class": classes}), PatientRefs("gz-pat-"))
    assert rec.data_classes == {"laboratory", "demographics"}


def test_export_then_import_gives_the_same_decisions(
    service: ConsentService, synth_dir: Path, tmp_path: Path, audit: Any, key: Any, clock: Any
) -> None:
    service.import_ndjson(_lines(synth_dir / "fhir" / "Consent.ndjson")[:400], actor="s")
    service.grant(
        pat(3), DIABETES, actor="s", source=Source.STAFF, data_classes=["laboratory", "demographics"]
    )
    service.withdraw(pat(4), DIABETES, actor="s", source=Source.STAFF)
    exported = b"".join(service.export_ndjson(actor="s")).splitlines()
    fresh_db = Database(f"sqlite:///{(tmp_path / 'fresh.db').as_posix()}", branches=["consent"])
    fresh = ConsentService(fresh_db, audit, key, "hospital-gz", service.refs, clock=clock)
    report = fresh.import_ndjson(exported, actor="s")
    assert (report.imported, report.rejected) == (len(exported), 0)
    for n in range(1, 120):
        a, b = service.history(pat(n), actor="t"), fresh.history(pat(n), actor="t")
        assert len(a) == len(b)
        assert all(x.same_decision(y) and x.patient_id == y.patient_id for x, y in zip(a, b, strict=True)), n
    again = b"".join(fresh.export_ndjson(actor="s")).splitlines()
    assert [orjson.loads(x)["patient"] for x in again] == [orjson.loads(x)["patient"] for x in exported]
    fresh_db.dispose()


def test_export_marks_ended_periods_inactive() -> None:
    rec = from_fhir(
        _consent(period={"start": "2025-01-01T00:00:00Z", "end": "2025-03-01T00:00:00Z"}),
        PatientRefs("gz-pat-"),
    )
    refs = PatientRefs("gz-pat-")
    assert to_fhir(rec, refs, datetime(2025, 2, 1, tzinfo=UTC))["status"] == "active"
    assert to_fhir(rec, refs, datetime(2025, 3, 1, tzinfo=UTC))["status"] == "inactive"


def test_patient_refs_refuse_other_sites() -> None:
    with pytest.raises(ValidationError):
        PatientRefs("gz-pat-").from_reference("Patient/hk-pat-1")


def test_an_imported_decision_carries_the_clinical_stores_person_id() -> None:
    rec = from_fhir(_consent(), PatientRefs("gz-pat-"))
    # A second computation of the store's key: MD5 of "Patient/<id>", first 8 bytes little-endian, >> 1.
    digest = hashlib.md5(b"Patient/gz-pat-5", usedforsecurity=False).digest()
    assert (rec.patient_id, rec.person_id) == ("gz-pat-5", int.from_bytes(digest[:8], "little") >> 1)


def test_a_record_whose_person_id_is_not_its_patients_is_refused() -> None:
    with pytest.raises(ValidationError, match="person_id"):
        ConsentRecord(
            person_id=5,
            patient_id="gz-pat-5",
            scenario_id=DIABETES,
            decision=DecisionKind.PERMIT,
            decided_at=AT,
            valid_from=AT,
        )
