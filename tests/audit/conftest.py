"""Fixtures of the audit suites: a signer, a fixed clock, an open log on each backend, sample entries."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from healthspace.audit.log import AuditLog
from healthspace.audit.models import AuditEntry, Outcome, b64encode
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database


class KeySigner:
    """The smallest Signer: an Ed25519 private key and an id."""

    def __init__(self, key_id: str = "test-key-1") -> None:
        self._key = Ed25519PrivateKey.generate()
        self.key_id = key_id
        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key_b64 = b64encode(raw)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


T0 = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)


def make_entry(i: int) -> AuditEntry:
    return AuditEntry(
        time=T0 + timedelta(seconds=i),
        actor=f"participant:hospital-gz/steward-{i % 3}",
        action="dsp.negotiation.agree" if i % 2 else "policy.evaluate",
        subject=f"agreement:urn:uuid:{i:032x}",
        outcome=Outcome.ALLOWED if i % 2 else Outcome.DENIED,
        reason=f"decision {i}",
        scenario_id="diabetes-outcomes-research",
        agreement_id=None if i % 4 else f"urn:uuid:{i:032x}",
        details={"n": i},
    )


@pytest.fixture
def signer() -> KeySigner:
    return KeySigner()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url, branches=["audit"])
    yield database
    database.dispose()


@pytest.fixture
def log(db: Database, signer: KeySigner, clock: FixedClock) -> Iterator[AuditLog]:
    audit = AuditLog(db, signer, clock)
    yield audit
    audit.close()
