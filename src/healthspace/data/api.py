"""Management API of clinical data: ingest, reports, quarantine, quality, lifecycle, erasure, provenance.

Stewards and admins may do everything; regulators may read status, reports, quality, provenance and
destruction certificates (never quarantined records, which hold raw patient data). Mount with
`app.include_router(make_data_router(lambda: service, guard_for_roles))` where
`guard_for_roles(*roles)` returns the API-key dependency for those roles.
"""

# No `from __future__ import annotations` here: FastAPI must see the real Annotated dependencies that
# are defined inside `make_data_router`.

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from healthspace.core.apikeys import Role, StoredKey
from healthspace.core.errors import ValidationError
from healthspace.data.csvmap import CsvMapping
from healthspace.data.ingest import IngestReport
from healthspace.data.profile import StandardProfile
from healthspace.data.provenance import SignedDocument
from healthspace.data.quality import QualityReport
from healthspace.data.quarantine import QuarantineEntry
from healthspace.data.service import DataService, DatasetStatus, ErasureReport
from healthspace.data.states import DatasetState

__all__ = [
    "ArchiveRequest",
    "CertificatePublic",
    "DatasetCreate",
    "DatasetPublic",
    "DestroyRequest",
    "ErasurePublic",
    "ErasureRequest",
    "IngestRequest",
    "MoveRequest",
    "ResubmitRequest",
    "make_data_router",
]

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class DatasetCreate(BaseModel):
    dataset_id: str = Field(pattern=_ID)


class DatasetPublic(BaseModel):
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
    def of(cls, s: DatasetStatus) -> "DatasetPublic":
        return cls(**s.__dict__)


class IngestRequest(BaseModel):
    paths: list[str] = Field(
        min_length=1, max_length=1000, description="Files in the server's import directory."
    )
    source_system: str = Field(min_length=1, max_length=200, description="The system the export came from.")
    bundle: bool = Field(False, description="Files are FHIR Bundles (one batch each), not NDJSON.")
    csv_mapping: CsvMapping | None = Field(
        None, description="Files are CSV, turned into FHIR resources by this mapping (one batch)."
    )
    standard: str | None = Field(
        None,
        max_length=100,
        description="Id of a data standard published by the authority; default: built-in",
    )


class ResubmitRequest(BaseModel):
    resource: dict[str, Any] | None = Field(None, description="The corrected resource; none: as it was.")


class MoveRequest(BaseModel):
    target: DatasetState
    reason: str = Field("", max_length=2000)


class ArchiveRequest(BaseModel):
    retain_until: datetime
    reason: str = Field("", max_length=2000)


class RestoreRequest(BaseModel):
    reason: str = Field("", max_length=2000)


class DestroyRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)
    confirm: str = Field(description="The dataset id again: destruction cannot be undone.")


class ErasureRequest(BaseModel):
    patient_id: str | None = Field(None, min_length=1, max_length=200, description="FHIR Patient id.")
    person_id: int | None = Field(None, ge=0, description="OMOP person_id.")
    reason: str = Field(min_length=1, max_length=2000, description="Legal basis, e.g. GDPR Art. 17 request.")


class ErasurePublic(BaseModel):
    dataset_id: str
    subject: str
    operation_id: str
    rows_removed: dict[str, int]
    quarantine_removed: int
    files_rewritten: int

    @classmethod
    def of(cls, r: ErasureReport) -> "ErasurePublic":
        return cls(**r.__dict__)


class CertificatePublic(BaseModel):
    certificate: dict[str, Any]
    canonical: str = Field(description="The exact UTF-8 JSON that was signed.")
    signature: str = Field(description="Ed25519 signature, base64.")
    key_id: str
    public_key: str

    @classmethod
    def of(cls, d: SignedDocument) -> "CertificatePublic":
        return cls(
            certificate=d.document,
            canonical=d.canonical.decode(),
            signature=d.signature_b64,
            key_id=d.key_id,
            public_key=d.public_key,
        )


def make_data_router(
    get_service: Callable[[], DataService],
    guard_for_roles: Callable[..., Callable[[Request], StoredKey]],
    prefix: str = "/management/data",
    resolve_standard: Callable[[str], StandardProfile] | None = None,
) -> APIRouter:
    """The steward's data API. `resolve_standard` turns a standard id into the published profile (the
    connector fetches it from the authority); without it, naming a standard is refused."""
    router = APIRouter(prefix=prefix, tags=["clinical data"])
    Steward = Annotated[StoredKey, Depends(guard_for_roles(Role.ADMIN, Role.STEWARD))]  # noqa: N806
    Reader = Annotated[  # noqa: N806
        StoredKey, Depends(guard_for_roles(Role.ADMIN, Role.STEWARD, Role.REGULATOR))
    ]

    def actor(key: StoredKey) -> str:
        return f"{key.role.value}:{key.key_id}"

    @router.get("/datasets", response_model=list[DatasetPublic])
    def datasets(_: Reader) -> list[DatasetPublic]:
        return [DatasetPublic.of(s) for s in get_service().datasets()]

    @router.post("/datasets", response_model=DatasetPublic, status_code=201)
    def create(body: DatasetCreate, key: Steward) -> DatasetPublic:
        """Create an empty encrypted store for a new dataset (state acquired)."""
        return DatasetPublic.of(get_service().create_dataset(body.dataset_id, actor=actor(key)))

    @router.get("/datasets/{dataset_id}", response_model=DatasetPublic)
    def status(dataset_id: str, _: Reader) -> DatasetPublic:
        """State, allowed moves and retention date."""
        return DatasetPublic.of(get_service().status(dataset_id))

    @router.post("/datasets/{dataset_id}/ingest", response_model=list[IngestReport])
    def ingest(dataset_id: str, body: IngestRequest, key: Steward) -> list[IngestReport]:
        """Ingest files from the server's import directory; provenance is signed and audited."""
        svc = get_service()
        paths = [svc.resolve_import(p) for p in body.paths]
        standard = None
        if body.standard is not None:
            if resolve_standard is None:
                raise ValidationError("this service cannot fetch published standards; omit 'standard'")
            standard = resolve_standard(body.standard)
        return svc.ingest(
            dataset_id,
            paths,
            actor=actor(key),
            source_system=body.source_system,
            bundle=body.bundle,
            standard=standard,
            csv_mapping=body.csv_mapping,
        )

    @router.get("/datasets/{dataset_id}/report")
    def report(dataset_id: str, _: Reader) -> dict[str, Any]:
        """Validation reports of every batch and the number of open quarantined records."""
        return get_service().report(dataset_id)

    @router.get("/datasets/{dataset_id}/quarantine", response_model=list[QuarantineEntry])
    def quarantined(dataset_id: str, _: Steward, include_resolved: bool = False) -> list[QuarantineEntry]:
        """Refused records with their reasons (raw patient data: stewards and admins only)."""
        return get_service().quarantine(dataset_id, include_resolved=include_resolved)

    @router.post("/datasets/{dataset_id}/quarantine/{quarantine_id}/resubmit", response_model=IngestReport)
    def resubmit(dataset_id: str, quarantine_id: str, body: ResubmitRequest, key: Steward) -> IngestReport:
        return get_service().resubmit(dataset_id, quarantine_id, body.resource, actor=actor(key))

    @router.get("/datasets/{dataset_id}/quality", response_model=QualityReport)
    def quality(dataset_id: str, _: Reader) -> QualityReport:
        return get_service().quality(dataset_id)

    @router.post("/datasets/{dataset_id}/moves", response_model=DatasetPublic)
    def move(dataset_id: str, body: MoveRequest, key: Steward) -> DatasetPublic:
        """Curate, publish, suspend, resume, unpublish or reopen (archive/restore/destroy have their own)."""
        return DatasetPublic.of(
            get_service().transition(dataset_id, body.target, actor=actor(key), reason=body.reason)
        )

    @router.post("/datasets/{dataset_id}/archive", response_model=DatasetPublic)
    def archive(dataset_id: str, body: ArchiveRequest, key: Steward) -> DatasetPublic:
        return DatasetPublic.of(
            get_service().archive(
                dataset_id, actor=actor(key), retain_until=body.retain_until, reason=body.reason
            )
        )

    @router.post("/datasets/{dataset_id}/restore", response_model=DatasetPublic)
    def restore(dataset_id: str, body: RestoreRequest, key: Steward) -> DatasetPublic:
        return DatasetPublic.of(get_service().restore(dataset_id, actor=actor(key), reason=body.reason))

    @router.post("/datasets/{dataset_id}/destroy", response_model=CertificatePublic)
    def destroy(dataset_id: str, body: DestroyRequest, key: Steward) -> CertificatePublic:
        """Crypto-shred the dataset and return the signed destruction certificate."""
        if body.confirm != dataset_id:
            raise ValidationError("confirm must repeat the dataset id")
        return CertificatePublic.of(get_service().destroy(dataset_id, actor=actor(key), reason=body.reason))

    @router.get("/datasets/{dataset_id}/certificate", response_model=CertificatePublic)
    def certificate(dataset_id: str, _: Reader) -> CertificatePublic:
        return CertificatePublic.of(get_service().certificate(dataset_id))

    @router.post("/datasets/{dataset_id}/erasures", response_model=ErasurePublic)
    def erase(dataset_id: str, body: ErasureRequest, key: Steward) -> ErasurePublic:
        """Erase one patient from every table of the dataset (right to erasure, withdrawal with deletion)."""
        return ErasurePublic.of(
            get_service().erase_patient(
                dataset_id,
                actor=actor(key),
                reason=body.reason,
                patient_id=body.patient_id,
                person_id=body.person_id,
            )
        )

    @router.get("/datasets/{dataset_id}/provenance")
    def provenance(dataset_id: str, _: Reader) -> dict[str, Any]:
        """Every batch's FHIR R4 Provenance, as a Bundle of type collection."""
        resources = get_service().provenance(dataset_id)
        return {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": r} for r in resources],
        }

    @router.get("/datasets/{dataset_id}/provenance/{batch_id}")
    def batch_provenance(dataset_id: str, batch_id: str, _: Reader) -> dict[str, Any]:
        return get_service().provenance(dataset_id, batch_id)[0]

    return router
