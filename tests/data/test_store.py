"""The encrypted store and its keys: envelope encryption, wrong or missing keys, tampering, no clear text."""

from __future__ import annotations

import stat
from pathlib import Path

import orjson
import pytest

from healthspace.core.errors import ConflictError, ValidationError
from healthspace.data.errors import KeyUnavailableError, StoreCorruptError, StoreNotFoundError, WrongKeyError
from healthspace.data.ingest import ingest_ndjson
from healthspace.data.keys import KeyStore, LocalKeyStore
from healthspace.data.store import ClinicalStore
from tests.data import fhirgen as g


def test_local_key_store_is_a_key_store(keystore: LocalKeyStore) -> None:
    assert isinstance(keystore, KeyStore)


def test_wrap_then_unwrap_returns_the_key(keystore: LocalKeyStore) -> None:
    assert keystore.unwrap("k1", keystore.wrap("k1", b"\x01" * 32)) == b"\x01" * 32


def test_kek_file_is_readable_by_its_owner_only(keystore: LocalKeyStore, tmp_path: Path) -> None:
    keystore.wrap("k1", b"x")
    assert stat.S_IMODE((tmp_path / "keys" / "k1.kek").stat().st_mode) == 0o600


def test_unwrap_with_unknown_key_id_is_unavailable(keystore: LocalKeyStore) -> None:
    wrapped = keystore.wrap("k1", b"secret")
    with pytest.raises(KeyUnavailableError):
        keystore.unwrap("k2", wrapped)


def test_unwrap_under_another_kek_is_the_wrong_key(keystore: LocalKeyStore, tmp_path: Path) -> None:
    wrapped = LocalKeyStore(tmp_path / "other").wrap("k1", b"secret")
    keystore.wrap("k1", b"anything")
    with pytest.raises(WrongKeyError):
        keystore.unwrap("k1", wrapped)


def test_key_ids_cannot_walk_out_of_the_directory(keystore: LocalKeyStore) -> None:
    with pytest.raises(ValidationError):
        keystore.wrap("../escape", b"x")


def test_destroyed_key_cannot_unwrap(keystore: LocalKeyStore) -> None:
    wrapped = keystore.wrap("k1", b"secret")
    keystore.destroy("k1")
    keystore.destroy("k1")  # idempotent
    with pytest.raises(KeyUnavailableError):
        keystore.unwrap("k1", wrapped)


@pytest.fixture
def filled(store: ClinicalStore, tmp_path: Path) -> ClinicalStore:
    bad = g.observation(
        1, 0, valueQuantity={"value": 99.5, "unit": "%"}
    )  # quarantined: PHI in quarantine too
    ingest_ndjson(store, [g.write_ndjson(tmp_path / "p.ndjson", [*g.population(10), bad])])
    return store


def test_files_on_disk_hold_no_patient_data_in_clear(filled: ClinicalStore) -> None:
    blobs = b"".join(f.read_bytes() for f in filled.path.rglob("*") if f.is_file())
    assert filled.row_counts()["person"] == 10
    for needle in (b"HK-MRN-000003", b"pat-3", b"E11.9", b"A10BA02", b"Patient/"):
        assert needle not in blobs


def test_reopening_with_the_right_key_reads_the_data(filled: ClinicalStore, keystore: LocalKeyStore) -> None:
    with ClinicalStore.open(filled.path, keystore) as again:
        assert again.row_counts() == filled.row_counts()


def test_opening_without_the_kek_fails_as_unavailable(filled: ClinicalStore, tmp_path: Path) -> None:
    with pytest.raises(KeyUnavailableError):
        ClinicalStore.open(filled.path, LocalKeyStore(tmp_path / "empty"))


def test_opening_with_another_kek_of_the_same_id_fails_as_wrong_key(
    filled: ClinicalStore, tmp_path: Path
) -> None:
    other = LocalKeyStore(tmp_path / "other")
    other.wrap(filled.key_id, b"x")  # creates a different KEK under the same id
    with pytest.raises(WrongKeyError):
        ClinicalStore.open(filled.path, other)


def test_destroying_the_kek_makes_the_dataset_unreadable(
    filled: ClinicalStore, keystore: LocalKeyStore
) -> None:
    keystore.destroy(filled.key_id)
    with pytest.raises(KeyUnavailableError):
        ClinicalStore.open(filled.path, keystore)


def test_altered_manifest_is_detected(filled: ClinicalStore, keystore: LocalKeyStore) -> None:
    mpath = filled.path / "manifest.json"
    doc = orjson.loads(mpath.read_bytes())
    doc["tables"]["person"] = []
    mpath.write_bytes(orjson.dumps(doc))
    with pytest.raises(StoreCorruptError):
        ClinicalStore.open(filled.path, keystore)


def test_segment_from_another_dataset_does_not_decrypt(
    filled: ClinicalStore, keystore: LocalKeyStore, tmp_path: Path
) -> None:
    other = ClinicalStore.create(tmp_path / "other", "other-dataset", keystore)
    ingest_ndjson(other, [g.write_ndjson(tmp_path / "o.ndjson", [g.patient(1)])])
    (theirs,) = [f for f in other.scan_files() if "person" in f.name]
    (ours,) = [f for f in filled.scan_files() if "person" in f.name]
    ours.write_bytes(theirs.read_bytes())
    with ClinicalStore.open(filled.path, keystore) as s, pytest.raises(Exception, match=r"(?i)key|decrypt"):
        s.row_counts()


def test_opening_a_missing_store_is_not_found(tmp_path: Path, keystore: LocalKeyStore) -> None:
    with pytest.raises(StoreNotFoundError):
        ClinicalStore.open(tmp_path / "nothing", keystore)


def test_creating_over_an_existing_store_conflicts(store: ClinicalStore, keystore: LocalKeyStore) -> None:
    with pytest.raises(ConflictError):
        ClinicalStore.create(store.path, "again", keystore)


def test_invalid_dataset_id_is_refused(tmp_path: Path, keystore: LocalKeyStore) -> None:
    with pytest.raises(ValidationError):
        ClinicalStore.create(tmp_path / "s", "../x", keystore)
