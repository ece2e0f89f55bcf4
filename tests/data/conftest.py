"""Fixtures of the data tests: a key store and an empty encrypted clinical store in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore


@pytest.fixture
def keystore(tmp_path: Path) -> LocalKeyStore:
    return LocalKeyStore(tmp_path / "keys")


@pytest.fixture
def store(tmp_path: Path, keystore: LocalKeyStore) -> Iterator[ClinicalStore]:
    s = ClinicalStore.create(tmp_path / "store", "test-dataset", keystore)
    yield s
    s.close()
