"""Fixtures of the data tests: key store, empty encrypted store, and a data service with audit and signer."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from healthspace.audit.log import AuditLog
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from healthspace.data.keys import LocalKeyStore
from healthspace.data.service import DataService
from healthspace.data.store import ClinicalStore
from healthspace.identity.keys import SigningKey
from tests.data import fhirgen as g


@pytest.fixture
def keystore(tmp_path: Path) -> LocalKeyStore:
    return LocalKeyStore(tmp_path / "keys")


@pytest.fixture
def store(tmp_path: Path, keystore: LocalKeyStore) -> Iterator[ClinicalStore]:
    s = ClinicalStore.create(tmp_path / "store", "test-dataset", keystore)
    yield s
    s.close()


# --- the data service: a control-plane database, an audit log, a signing key, a fixed clock ---------

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
STEWARD = "steward:k1"


@pytest.fixture
def signer() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def fixed_clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def data_db(sqlite_url: str) -> Iterator[Database]:
    db = Database(sqlite_url, branches=["audit", "data"])
    yield db
    db.dispose()


@pytest.fixture
def audit(data_db: Database, signer: SigningKey, fixed_clock: FixedClock) -> Iterator[AuditLog]:
    log = AuditLog(data_db, signer, fixed_clock)
    yield log
    log.close()


@pytest.fixture
def service(
    data_db: Database,
    audit: AuditLog,
    signer: SigningKey,
    keystore: LocalKeyStore,
    tmp_path: Path,
    fixed_clock: FixedClock,
) -> DataService:
    (tmp_path / "import").mkdir()
    return DataService(
        data_db,
        audit,
        signer,
        keystore,
        tmp_path / "datasets",
        organisation="hospital-gz",
        clock=fixed_clock,
        import_root=tmp_path / "import",
    )


N_PATIENTS = 4


@pytest.fixture
def loaded(service: DataService, tmp_path: Path) -> str:
    """Dataset "gz" with N_PATIENTS patients and one quarantined observation of patient 2."""
    service.create_dataset("gz", actor=STEWARD)
    bad = g.observation(2, 0, id="obs-bad", valueQuantity={"value": 99, "unit": "%"})
    f = g.write_ndjson(tmp_path / "import" / "export.ndjson", [*g.population(N_PATIENTS), bad])
    service.ingest("gz", [f], actor=STEWARD, source_system="his-gz")
    return "gz"
