"""Consent suite fixtures: a registry on each backend, a fixed clock, and a small synthetic hospital."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from healthspace.audit.log import AuditLog
from healthspace.consent.fhir import PatientRefs
from healthspace.consent.service import ConsentService
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from healthspace.core.ids import person_id_for
from healthspace.identity.keys import SigningKey

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)
SYNTH_SITE = "gz"
SYNTH_PATIENTS = 2000
SYNTH_SEED = 11
DIABETES = "diabetes-outcomes-research"
QUALITY = "hospital-quality-improvement"


def pat(n: int) -> str:
    """The FHIR Patient id of the synthetic hospital's patient `n` (what the generator writes)."""
    return f"{SYNTH_SITE}-pat-{n}"


def person(n: int) -> int:
    """The clinical store's person id of patient `n`."""
    return person_id_for(pat(n))


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def db(make_db: Callable[..., Database]) -> Database:
    return make_db("audit", "consent")


@pytest.fixture
def audit(db: Database, key: SigningKey, clock: FixedClock) -> Iterator[AuditLog]:
    log = AuditLog(db, key, clock)
    yield log
    log.close()


@pytest.fixture
def refs() -> PatientRefs:
    return PatientRefs(f"{SYNTH_SITE}-pat-")


@pytest.fixture
def service(
    db: Database, audit: AuditLog, key: SigningKey, clock: FixedClock, refs: PatientRefs
) -> ConsentService:
    return ConsentService(db, audit, key, "hospital-gz", refs, clock=clock)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic hospital (FHIR NDJSON + OMOP Parquet), generated once per run."""
    from healthspace.synth.generate import generate

    out = tmp_path_factory.mktemp("synth") / SYNTH_SITE
    generate(SYNTH_SITE, SYNTH_PATIENTS, SYNTH_SEED, out, progress=False)
    return out
