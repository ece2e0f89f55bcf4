"""Signed ingest provenance: stored, audited, exported as FHIR R4 Provenance, verifiable, tamper-evident."""

from __future__ import annotations

import base64
import copy
import hashlib
from pathlib import Path

import pytest

from healthspace.audit.log import AuditLog
from healthspace.core.errors import ValidationError
from healthspace.data.provenance import verify_document, verify_fhir_provenance
from healthspace.data.service import DataService
from healthspace.identity.keys import SigningKey
from tests.data import fhirgen as g
from tests.data.conftest import N_PATIENTS, STEWARD


def test_each_batch_has_a_signature_that_verifies(service: DataService, loaded: str) -> None:
    (rec,) = service.provenance_records(loaded)
    assert verify_document(rec.canonical, rec.signature, rec.public_key)


def test_a_changed_byte_does_not_verify(service: DataService, loaded: str) -> None:
    (rec,) = service.provenance_records(loaded)
    altered = rec.canonical.replace(b'"his-gz"', b'"his-gZ"')
    assert altered != rec.canonical
    assert not verify_document(altered, rec.signature, rec.public_key)


def test_the_signature_is_by_the_services_key(service: DataService, loaded: str, signer: SigningKey) -> None:
    (rec,) = service.provenance_records(loaded)
    assert (rec.key_id, rec.public_key) == (signer.key_id, signer.public_key_b64)


def test_record_names_source_file_hash_counts_and_steward(
    service: DataService, loaded: str, tmp_path: Path
) -> None:
    (rec,) = service.provenance_records(loaded)
    d = rec.document
    file_hash = hashlib.sha256((tmp_path / "import" / "export.ndjson").read_bytes()).hexdigest()
    assert d["sources"][0]["sha256"] == file_hash
    assert (d["steward"], d["source_system"], d["organisation"]) == (STEWARD, "his-gz", "hospital-gz")
    assert d["counts"]["inserted"]["person"] == N_PATIENTS
    assert d["counts"]["rejected"] == 1


def test_audit_entry_carries_batch_hash_and_signature(
    service: DataService, loaded: str, audit: AuditLog
) -> None:
    (rec,) = service.provenance_records(loaded)
    entries = [e.entry for e in audit.entries(0, audit.size) if e.entry.action == "data.ingest"]
    assert len(entries) == 1
    det = entries[0].details
    assert det["batch_id"] == rec.document["batch_id"]
    assert det["content_sha256"] == rec.document["content_sha256"]
    assert det["record_sha256"] == hashlib.sha256(rec.canonical).hexdigest()
    assert base64.b64decode(det["signature"]) == rec.signature


def test_fhir_provenance_has_target_agent_entity_and_signature(
    service: DataService, loaded: str, tmp_path: Path
) -> None:
    (p,) = service.provenance(loaded)
    file_hash = hashlib.sha256((tmp_path / "import" / "export.ndjson").read_bytes()).hexdigest()
    assert p["resourceType"] == "Provenance"
    assert [t["identifier"]["value"] for t in p["target"]][1] == "gz"
    assert p["recorded"].endswith("Z")
    assert {a["type"]["coding"][0]["code"] for a in p["agent"]} == {"enterer", "custodian", "author"}
    assert all("who" in a for a in p["agent"])
    assert p["entity"][0]["what"]["identifier"]["value"] == file_hash
    assert p["entity"][0]["role"] == "source"
    assert p["signature"][0]["data"]


def test_fhir_provenance_verifies_with_the_public_key(
    service: DataService, loaded: str, signer: SigningKey
) -> None:
    (p,) = service.provenance(loaded)
    assert verify_fhir_provenance(p, signer.public_key_b64)["dataset_id"] == "gz"


def test_fhir_provenance_with_another_file_hash_is_refused(
    service: DataService, loaded: str, signer: SigningKey
) -> None:
    (p,) = service.provenance(loaded)
    forged = copy.deepcopy(p)
    forged["entity"][0]["what"]["identifier"]["value"] = "0" * 64
    with pytest.raises(ValidationError):
        verify_fhir_provenance(forged, signer.public_key_b64)


def test_fhir_provenance_under_another_key_is_refused(service: DataService, loaded: str) -> None:
    (p,) = service.provenance(loaded)
    with pytest.raises(ValidationError):
        verify_fhir_provenance(p, SigningKey.generate().public_key_b64)


def test_re_ingesting_the_same_file_records_no_second_provenance(
    service: DataService, loaded: str, tmp_path: Path
) -> None:
    service.ingest(loaded, [tmp_path / "import" / "export.ndjson"], actor=STEWARD, source_system="his-gz")
    assert len(service.provenance_records(loaded)) == 1


def test_quarantine_resubmission_gets_its_own_provenance(service: DataService, loaded: str) -> None:
    (entry,) = service.quarantine(loaded)
    r = service.resubmit(loaded, entry.quarantine_id, g.observation(2, 0, id="obs-bad"), actor=STEWARD)
    recs = service.provenance_records(loaded, r.batch_id)
    assert recs[0].document["source_system"] == "quarantine-resubmission"
    assert recs[0].verifies()


def test_ingest_without_a_source_system_is_refused(service: DataService, loaded: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        service.ingest(loaded, [tmp_path / "import" / "export.ndjson"], actor=STEWARD, source_system=" ")
