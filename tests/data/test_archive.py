"""Archive and restore: compacted encrypted copy with a retention date, content checked both ways."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from healthspace.core.errors import ValidationError
from healthspace.data.errors import DatasetUnavailableError, StoreCorruptError
from healthspace.data.schema import CDM_TABLES
from healthspace.data.service import DataService
from healthspace.data.states import DatasetState
from healthspace.data.store import ClinicalStore
from tests.data import fhirgen as g
from tests.data.conftest import N_PATIENTS, STEWARD, T0

UNTIL = T0 + timedelta(days=3650)


def _contents(service: DataService, ds: str) -> dict[str, list[Any]]:
    """Every row of every table, sorted: a second computation, independent of the service's checksums."""
    with service.open_store(ds) as s:
        return {
            t: sorted(map(repr, s.dataset(t).to_table().to_pylist())) for t in [*CDM_TABLES, "quarantine"]
        }


def test_archive_then_restore_keeps_every_row(service: DataService, loaded: str) -> None:
    before = _contents(service, loaded)
    service.archive(loaded, actor=STEWARD, retain_until=UNTIL)
    service.restore(loaded, actor=STEWARD)
    after = _contents(service, loaded)
    assert after == before
    assert len(after["person"]) == N_PATIENTS
    assert {t: len(v) for t, v in after.items() if t != "quarantine"} == g.expected_rows(N_PATIENTS)


def test_archived_dataset_records_its_retention_date(service: DataService, loaded: str) -> None:
    s = service.archive(loaded, actor=STEWARD, retain_until=UNTIL)
    assert (s.state, s.retain_until, s.archived_at) == (DatasetState.ARCHIVED, UNTIL, T0)


def test_archive_is_one_encrypted_file_per_table_and_no_clear_text(service: DataService, loaded: str) -> None:
    service.archive(loaded, actor=STEWARD, retain_until=UNTIL)
    files = sorted(p for p in service.archive_path(loaded).rglob("*.parquet"))
    blob = b"".join(p.read_bytes() for p in service.archive_path(loaded).rglob("*") if p.is_file())
    assert len(files) == len(CDM_TABLES) + 1  # every table has rows, plus the quarantine
    assert b"pat-1" not in blob
    assert b"HK-MRN" not in blob
    assert b"E11.9" not in blob


def test_archived_dataset_cannot_be_read_and_its_live_copy_is_gone(service: DataService, loaded: str) -> None:
    service.archive(loaded, actor=STEWARD, retain_until=UNTIL)
    assert not service.live_path(loaded).exists()
    with pytest.raises(DatasetUnavailableError):
        service.open_store(loaded)


def test_restored_dataset_is_curated_without_retention(service: DataService, loaded: str) -> None:
    service.archive(loaded, actor=STEWARD, retain_until=UNTIL)
    s = service.restore(loaded, actor=STEWARD)
    assert (s.state, s.retain_until) == (DatasetState.CURATED, None)
    assert not service.archive_path(loaded).exists()


def test_retention_date_in_the_past_is_refused(service: DataService, loaded: str) -> None:
    with pytest.raises(ValidationError):
        service.archive(loaded, actor=STEWARD, retain_until=T0 - timedelta(seconds=1))
    assert service.status(loaded).state is DatasetState.ACQUIRED


def test_archive_whose_manifest_was_altered_is_not_restored(service: DataService, loaded: str) -> None:
    service.archive(loaded, actor=STEWARD, retain_until=UNTIL)
    m = service.archive_path(loaded) / "manifest.json"
    doc = orjson.loads(m.read_bytes())
    doc["archive"]["retain_until"] = (UNTIL + timedelta(days=1)).isoformat()
    m.write_bytes(orjson.dumps(doc))
    with pytest.raises(StoreCorruptError):
        service.restore(loaded, actor=STEWARD)
    assert service.status(loaded).state is DatasetState.ARCHIVED


def test_archive_missing_a_file_is_not_restored(service: DataService, loaded: str) -> None:
    service.archive(loaded, actor=STEWARD, retain_until=UNTIL)
    next(service.archive_path(loaded).rglob("measurement-*.parquet")).unlink()
    with pytest.raises(StoreCorruptError):
        service.restore(loaded, actor=STEWARD)
    assert service.status(loaded).state is DatasetState.ARCHIVED
    assert not service.live_path(loaded).exists()


def test_archive_opens_as_an_ordinary_store_with_the_same_key(service: DataService, loaded: str) -> None:
    service.archive(loaded, actor=STEWARD, retain_until=UNTIL)
    with ClinicalStore.open(Path(service.archive_path(loaded)), service._keys) as s:
        assert s.row_counts() == g.expected_rows(N_PATIENTS)
