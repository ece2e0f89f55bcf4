"""Retention timers: archived datasets are destroyed once their retention date passes, not before."""

from __future__ import annotations

from datetime import timedelta

from healthspace.data.manager import RETENTION_ACTOR, RetentionManager
from healthspace.data.service import DataService
from healthspace.data.states import DatasetState
from tests.data.conftest import STEWARD, T0

UNTIL = T0 + timedelta(days=30)


def test_nothing_is_destroyed_before_the_retention_date(service: DataService, loaded: str) -> None:
    service.archive(loaded, actor=STEWARD, retain_until=UNTIL)
    assert RetentionManager(service).run_due(UNTIL - timedelta(microseconds=1)) == []
    assert service.status(loaded).state is DatasetState.ARCHIVED


def test_an_archive_past_its_retention_date_is_destroyed(service: DataService, loaded: str) -> None:
    service.archive(loaded, actor=STEWARD, retain_until=UNTIL)
    (result,) = RetentionManager(service).run_due(UNTIL)
    assert result.destroyed
    assert service.status(loaded).state is DatasetState.DESTROYED
    assert service.certificate(loaded).document["destroyed_by"] == RETENTION_ACTOR


def test_live_datasets_are_never_destroyed_by_retention(service: DataService, loaded: str) -> None:
    assert RetentionManager(service).run_due(T0 + timedelta(days=100_000)) == []
    assert service.status(loaded).state is DatasetState.ACQUIRED
