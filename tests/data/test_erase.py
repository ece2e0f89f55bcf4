"""Erasing one patient: gone from every table and the quarantine, others untouched, old files deleted."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from healthspace.audit.log import AuditLog
from healthspace.core.errors import ValidationError
from healthspace.data.ingest import person_id_for
from healthspace.data.schema import CDM_TABLES
from healthspace.data.service import DataService
from tests.data import fhirgen as g
from tests.data.conftest import N_PATIENTS, STEWARD, T0

TARGET = 2  # patient 2 also has a quarantined observation (see the `loaded` fixture)


def _rows(service: DataService, ds: str) -> dict[str, list[dict[str, Any]]]:
    with service.open_store(ds) as s:
        return {t: s.dataset(t).to_table().to_pylist() for t in CDM_TABLES}


def _others(rows: dict[str, list[dict[str, Any]]], pid: int) -> dict[str, list[str]]:
    return {t: sorted(repr(r) for r in rs if r["person_id"] != pid) for t, rs in rows.items()}


def test_the_patient_is_gone_from_every_table(service: DataService, loaded: str) -> None:
    pid = person_id_for(f"pat-{TARGET}")
    before = _rows(service, loaded)
    assert all(any(r["person_id"] == pid for r in before[t]) for t in CDM_TABLES if t != "death")
    service.erase_patient(loaded, actor=STEWARD, reason="GDPR art. 17", patient_id=f"pat-{TARGET}")
    after = _rows(service, loaded)
    assert {t: [r for r in rs if r["person_id"] == pid] for t, rs in after.items()} == {
        t: [] for t in CDM_TABLES
    }


def test_every_other_patient_is_untouched(service: DataService, loaded: str) -> None:
    pid = person_id_for(f"pat-{TARGET}")
    before = _others(_rows(service, loaded), pid)
    service.erase_patient(loaded, actor=STEWARD, reason="GDPR art. 17", patient_id=f"pat-{TARGET}")
    assert _others(_rows(service, loaded), pid) == before


def test_report_counts_match_what_the_generator_made(service: DataService, loaded: str) -> None:
    r = service.erase_patient(loaded, actor=STEWARD, reason="withdrawal", patient_id=f"pat-{TARGET}")
    per_patient = {t: n // N_PATIENTS for t, n in g.expected_rows(N_PATIENTS).items() if t != "death"}
    assert r.rows_removed == per_patient  # patient 2 is alive: no death row
    assert r.quarantine_removed == 1


def test_the_patients_quarantined_records_are_gone(service: DataService, loaded: str) -> None:
    service.erase_patient(loaded, actor=STEWARD, reason="withdrawal", patient_id=f"pat-{TARGET}")
    entries = service.quarantine(loaded, include_resolved=True)
    assert [e for e in entries if f"Patient/pat-{TARGET}" in e.raw] == []


def test_erasing_by_person_id_removes_the_same_rows(service: DataService, loaded: str) -> None:
    r = service.erase_patient(loaded, actor=STEWARD, reason="withdrawal", person_id=person_id_for("pat-0"))
    assert r.rows_removed["death"] == 1  # patient 0 is deceased by construction
    assert r.rows_removed["person"] == 1


def test_replaced_files_are_deleted_from_disk(service: DataService, loaded: str) -> None:
    with service.open_store(loaded) as s:
        old = set(s.scan_files())
    service.erase_patient(loaded, actor=STEWARD, reason="withdrawal", patient_id=f"pat-{TARGET}")
    with service.open_store(loaded) as s:
        new = set(s.scan_files())
    on_disk = set(service.live_path(loaded).rglob("*.parquet"))
    assert on_disk == new
    assert not (old - new) & on_disk
    assert old - new  # something was rewritten


def test_audit_names_the_patient_only_by_a_pseudonym(
    service: DataService, loaded: str, audit: AuditLog
) -> None:
    r = service.erase_patient(loaded, actor=STEWARD, reason="withdrawal", patient_id=f"pat-{TARGET}")
    entry = audit.entries(audit.size - 1, audit.size)[0]
    raw = entry.entry.canonical_bytes()
    assert entry.entry.subject == r.subject
    assert f"pat-{TARGET}".encode() not in raw
    assert str(person_id_for(f"pat-{TARGET}")).encode() not in raw


def test_erasure_reaches_an_archive(service: DataService, loaded: str) -> None:
    service.archive(loaded, actor=STEWARD, retain_until=T0 + timedelta(days=30))
    r = service.erase_patient(loaded, actor=STEWARD, reason="withdrawal", patient_id=f"pat-{TARGET}")
    service.restore(loaded, actor=STEWARD)  # the archive's checksums were updated with the erasure
    pid = person_id_for(f"pat-{TARGET}")
    assert r.rows_removed["person"] == 1
    assert all(r["person_id"] != pid for rs in _rows(service, loaded).values() for r in rs)


def test_an_unknown_patient_removes_nothing(service: DataService, loaded: str) -> None:
    before = _rows(service, loaded)
    r = service.erase_patient(loaded, actor=STEWARD, reason="withdrawal", patient_id="nobody")
    assert (r.total, r.files_rewritten) == (0, 0)
    assert _rows(service, loaded) == before


def test_exactly_one_identifier_is_required(service: DataService, loaded: str) -> None:
    with pytest.raises(ValidationError):
        service.erase_patient(loaded, actor=STEWARD, reason="x", patient_id="pat-1", person_id=1)
