"""The quarantine: list what was refused, fix it, re-submit it; nothing changes when it is still wrong."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from healthspace.core.errors import ConflictError, NotFoundError, ValidationError
from healthspace.data import quarantine
from healthspace.data.ingest import ingest_ndjson
from healthspace.data.store import ClinicalStore
from tests.data import fhirgen as g


@pytest.fixture
def with_rejects(store: ClinicalStore, tmp_path: Path) -> ClinicalStore:
    bad_obs = g.observation(1, 0, valueQuantity={"value": 75, "unit": "%", "code": "%"})
    bad_pat = g.patient(2, gender="F")
    ingest_ndjson(store, [g.write_ndjson(tmp_path / "in.ndjson", [g.patient(1), bad_pat, bad_obs])])
    return store


def test_list_shows_each_rejected_record_with_reason(with_rejects: ClinicalStore) -> None:
    entries = quarantine.list_entries(with_rejects)
    assert [(e.resource_type, e.resource_id, e.line, e.rules) for e in entries] == [
        ("Patient", "pat-2", 2, ["valueset.not_member"]),
        ("Observation", "obs-1-0", 3, ["measurement.range"]),
    ]


def test_list_filters_by_rule(with_rejects: ClinicalStore) -> None:
    assert [e.resource_id for e in quarantine.list_entries(with_rejects, rule="measurement.range")] == [
        "obs-1-0"
    ]


def test_fixed_record_is_stored_and_its_entry_resolved(with_rejects: ClinicalStore) -> None:
    entry = quarantine.list_entries(with_rejects, rule="measurement.range")[0]
    fixed = orjson.loads(entry.raw)
    fixed["valueQuantity"]["value"] = 7.5
    r = quarantine.resubmit(with_rejects, entry.quarantine_id, fixed)
    value = with_rejects.connect().execute("SELECT value_as_number FROM measurement").fetchall()
    assert (r.inserted, value) == ({"measurement": 1}, [(7.5,)])
    assert [e.resource_id for e in quarantine.list_entries(with_rejects)] == ["pat-2"]
    assert quarantine.get(with_rejects, entry.quarantine_id).resolved_by == r.batch_id


def test_record_still_wrong_is_refused_and_nothing_changes(with_rejects: ClinicalStore) -> None:
    entry = quarantine.list_entries(with_rejects, rule="valueset.not_member")[0]
    before, batches = with_rejects.row_counts(), len(with_rejects.batches)
    with pytest.raises(ValidationError, match="is not in the value set"):
        quarantine.resubmit(with_rejects, entry.quarantine_id, orjson.loads(entry.raw))
    assert (with_rejects.row_counts(), len(with_rejects.batches)) == (before, batches)
    assert len(quarantine.list_entries(with_rejects)) == 2


def test_resolved_record_cannot_be_resubmitted(with_rejects: ClinicalStore) -> None:
    entry = quarantine.list_entries(with_rejects, rule="valueset.not_member")[0]
    quarantine.resubmit(with_rejects, entry.quarantine_id, g.patient(2))
    with pytest.raises(ConflictError):
        quarantine.resubmit(with_rejects, entry.quarantine_id, g.patient(2))


def test_resolved_entries_are_kept_for_the_record(with_rejects: ClinicalStore) -> None:
    entry = quarantine.list_entries(with_rejects, rule="valueset.not_member")[0]
    quarantine.resubmit(with_rejects, entry.quarantine_id, g.patient(2))
    assert len(quarantine.list_entries(with_rejects, include_resolved=True)) == 2


def test_unknown_quarantine_id_is_not_found(with_rejects: ClinicalStore) -> None:
    with pytest.raises(NotFoundError):
        quarantine.resubmit(with_rejects, "no-such-id", g.patient(2))
