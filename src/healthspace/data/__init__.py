"""Clinical data: FHIR R4 ingestion against a data standard, an encrypted OMOP-style store, quality checks."""

from __future__ import annotations

from healthspace.data.errors import (
    KeyUnavailableError,
    StoreBusyError,
    StoreCorruptError,
    StoreNotFoundError,
    WrongKeyError,
)
from healthspace.data.ingest import IngestReport, ingest_bundle, ingest_ndjson, person_id_for
from healthspace.data.keys import KeyStore, LocalKeyStore
from healthspace.data.profile import MeasurementRule, StandardProfile, default_profile, load_profile
from healthspace.data.quality import DatasetStatistics, QualityReport, dataset_statistics, run_quality
from healthspace.data.store import ClinicalStore

__all__ = [
    "ClinicalStore",
    "DatasetStatistics",
    "IngestReport",
    "KeyStore",
    "KeyUnavailableError",
    "LocalKeyStore",
    "MeasurementRule",
    "QualityReport",
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
]
