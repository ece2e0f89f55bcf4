"""Destruction by crypto-shredding: key gone, files gone, an earlier copy is useless, signed certificate."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from healthspace.audit.log import AuditLog
from healthspace.core.errors import ConflictError, ValidationError
from healthspace.data.errors import DatasetDestroyedError, KeyUnavailableError, StoreNotFoundError
from healthspace.data.provenance import verify_document
from healthspace.data.service import DataService
from healthspace.data.states import DatasetState
from healthspace.data.store import ClinicalStore
from healthspace.identity.keys import SigningKey
from tests.data.conftest import N_PATIENTS, STEWARD, T0


def test_after_destruction_the_dataset_cannot_be_opened(service: DataService, loaded: str) -> None:
    service.destroy(loaded, actor=STEWARD, reason="retention over")
    with pytest.raises(DatasetDestroyedError):
        service.open_store(loaded)


def test_after_destruction_the_files_are_gone(service: DataService, loaded: str) -> None:
    service.destroy(loaded, actor=STEWARD, reason="retention over")
    assert not service.live_path(loaded).exists()
    with pytest.raises(StoreNotFoundError):
        ClinicalStore.open(service.live_path(loaded), service._keys)


def test_a_copy_taken_before_destruction_cannot_be_decrypted(
    service: DataService, loaded: str, tmp_path: Path
) -> None:
    copy = tmp_path / "stolen"
    shutil.copytree(service.live_path(loaded), copy)
    with ClinicalStore.open(copy, service._keys) as s:  # the copy opens while the key exists
        assert s.row_counts()["person"] == N_PATIENTS
    service.destroy(loaded, actor=STEWARD, reason="retention over")
    with pytest.raises(KeyUnavailableError):
        ClinicalStore.open(copy, service._keys)


def test_destroying_an_archived_dataset_removes_the_archive(service: DataService, loaded: str) -> None:
    service.archive(loaded, actor=STEWARD, retain_until=T0 + timedelta(days=1))
    service.destroy(loaded, actor=STEWARD, reason="retention over")
    assert not service.archive_path(loaded).exists()
    assert service.status(loaded).state is DatasetState.DESTROYED


def test_certificate_verifies_and_says_what_when_who_how_and_which_key(
    service: DataService, loaded: str, signer: SigningKey
) -> None:
    cert = service.destroy(loaded, actor=STEWARD, reason="retention over")
    d = cert.document
    assert verify_document(cert.canonical, cert.signature, signer.public_key_b64)
    assert (d["dataset_id"], d["destroyed_by"], d["key_id"]) == (loaded, STEWARD, "hs-data-gz")
    assert d["destroyed_at"] == T0.isoformat()
    assert d["method"].startswith("crypto-shredding")
    assert d["key_destroyed"] is True
    assert d["rows"]["person"] == N_PATIENTS


def test_a_changed_certificate_does_not_verify(service: DataService, loaded: str, signer: SigningKey) -> None:
    cert = service.destroy(loaded, actor=STEWARD, reason="retention over")
    altered = cert.canonical.replace(b"retention over", b"retention ovEr")
    assert not verify_document(altered, cert.signature, signer.public_key_b64)


def test_certificate_is_in_the_audit_log(service: DataService, loaded: str, audit: AuditLog) -> None:
    cert = service.destroy(loaded, actor=STEWARD, reason="retention over")
    last = audit.entries(audit.size - 1, audit.size)[0].entry
    assert (last.action, last.subject) == ("data.destroy", f"dataset:{loaded}")
    assert last.details["certificate"] == cert.document
    assert last.details["signature"] == cert.signature_b64


def test_certificate_can_be_fetched_after_destruction(service: DataService, loaded: str) -> None:
    cert = service.destroy(loaded, actor=STEWARD, reason="retention over")
    assert service.certificate(loaded).canonical == cert.canonical


def test_provenance_outlives_the_data(service: DataService, loaded: str) -> None:
    service.destroy(loaded, actor=STEWARD, reason="retention over")
    assert service.provenance_records(loaded)[0].verifies()


def test_destruction_needs_a_reason(service: DataService, loaded: str) -> None:
    with pytest.raises(ValidationError):
        service.destroy(loaded, actor=STEWARD, reason="  ")
    assert service.status(loaded).state is DatasetState.ACQUIRED


def test_a_key_shared_with_another_dataset_is_not_destroyed(service: DataService) -> None:
    service.create_dataset("a", actor=STEWARD, key_id="shared")
    service.create_dataset("b", actor=STEWARD, key_id="shared")
    with pytest.raises(ConflictError):
        service.destroy("a", actor=STEWARD, reason="test")
    service.open_store("b").close()
