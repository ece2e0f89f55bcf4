"""Clinical data: FHIR R4 ingestion, an encrypted OMOP-style store, quality, provenance and lifecycle."""

from __future__ import annotations

from healthspace.data.errors import (
    DatasetDestroyedError,
    DatasetUnavailableError,
    KeyUnavailableError,
    StoreBusyError,
    StoreCorruptError,
    StoreNotFoundError,
    WrongKeyError,
)
from healthspace.data.ingest import IngestReport, ingest_bundle, ingest_ndjson, person_id_for
from healthspace.data.keys import KeyStore, LocalKeyStore
from healthspace.data.manager import RetentionManager
from healthspace.data.profile import MeasurementRule, StandardProfile, default_profile, load_profile
from healthspace.data.provenance import to_fhir_provenance, verify_document, verify_fhir_provenance
from healthspace.data.quality import DatasetStatistics, QualityReport, dataset_statistics, run_quality
from healthspace.data.service import DataService, DatasetStatus, ErasureReport
from healthspace.data.states import DATASET_LIFECYCLE, DatasetState
from healthspace.data.store import ClinicalStore

__all__ = [
    "DATASET_LIFECYCLE",
    "ClinicalStore",
    "DataService",
    "DatasetDestroyedError",
    "DatasetState",
    "DatasetStatistics",
    "DatasetStatus",
    "DatasetUnavailableError",
    "ErasureReport",
    "IngestReport",
    "KeyStore",
    "KeyUnavailableError",
    "LocalKeyStore",
    "MeasurementRule",
    "QualityReport",
    "RetentionManager",
    "StandardProfile",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreNotFoundError",
    "WrongKeyError",
    "dataset_statistics",
    "default_profile",
    "ingest_bundle",
    "ingest_ndjson",
    "load_profile",
    "person_id_for",
    "run_quality",
    "to_fhir_provenance",
    "verify_document",
    "verify_fhir_provenance",
]
