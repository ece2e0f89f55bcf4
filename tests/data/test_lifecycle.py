"""Dataset lifecycle: every move between states, allowed or refused, through the service's real operations."""

from __future__ import annotations

from datetime import timedelta
from itertools import product
from pathlib import Path

import pytest

from healthspace.audit.log import AuditLog
from healthspace.core.errors import ConflictError, InvalidTransitionError, ValidationError
from healthspace.data.errors import DatasetUnavailableError
from healthspace.data.service import DataService
from healthspace.data.states import DatasetState as S
from tests.data import fhirgen as g
from tests.data.conftest import STEWARD, T0

# The lifecycle as docs/data.md states it, written out independently of states.py.
SPEC = {
    (S.ACQUIRED, S.CURATED), (S.ACQUIRED, S.ARCHIVED), (S.ACQUIRED, S.DESTROYED),
    (S.CURATED, S.PUBLISHED), (S.CURATED, S.ACQUIRED), (S.CURATED, S.ARCHIVED), (S.CURATED, S.DESTROYED),
    (S.PUBLISHED, S.SUSPENDED), (S.PUBLISHED, S.CURATED),
    (S.SUSPENDED, S.PUBLISHED), (S.SUSPENDED, S.CURATED),
    (S.SUSPENDED, S.ARCHIVED), (S.SUSPENDED, S.DESTROYED),
    (S.ARCHIVED, S.CURATED), (S.ARCHIVED, S.DESTROYED),
}  # fmt: skip
PATH = {
    S.ACQUIRED: [],
    S.CURATED: [S.CURATED],
    S.PUBLISHED: [S.CURATED, S.PUBLISHED],
    S.SUSPENDED: [S.CURATED, S.PUBLISHED, S.SUSPENDED],
    S.ARCHIVED: [S.CURATED, S.ARCHIVED],
    S.DESTROYED: [S.DESTROYED],
}


def _do(svc: DataService, ds: str, current: S, target: S) -> None:
    if target is S.ARCHIVED:
        svc.archive(ds, actor=STEWARD, retain_until=T0 + timedelta(days=365))
    elif target is S.DESTROYED:
        svc.destroy(ds, actor=STEWARD, reason="test")
    elif current is S.ARCHIVED and target is S.CURATED:
        svc.restore(ds, actor=STEWARD)
    else:
        svc.transition(ds, target, actor=STEWARD, reason="test")


def _put(svc: DataService, ds: str, state: S) -> None:
    svc.create_dataset(ds, actor=STEWARD)
    current = S.ACQUIRED
    for step in PATH[state]:
        _do(svc, ds, current, step)
        current = step


@pytest.mark.parametrize(("current", "target"), sorted(SPEC))
def test_allowed_move_succeeds_and_is_persisted(service: DataService, current: S, target: S) -> None:
    _put(service, "ds", current)
    _do(service, "ds", current, target)
    assert service.status("ds").state is target


REFUSED = sorted((a, b) for a, b in product(S, S) if (a, b) not in SPEC)


@pytest.mark.parametrize(("current", "target"), REFUSED)
def test_refused_move_raises_and_changes_nothing(service: DataService, current: S, target: S) -> None:
    _put(service, "ds", current)
    with pytest.raises((InvalidTransitionError, ValidationError)):
        _do(service, "ds", current, target)
    assert service.status("ds").state is current


def test_a_refused_move_is_audited_as_denied(service: DataService, audit: AuditLog) -> None:
    _put(service, "ds", S.ACQUIRED)
    with pytest.raises(InvalidTransitionError):
        service.transition("ds", S.PUBLISHED, actor=STEWARD)
    last = audit.entries(audit.size - 1, audit.size)[0].entry
    assert (last.action, last.outcome.value, last.subject) == (
        "data.dataset.transition",
        "denied",
        "dataset:ds",
    )


def test_state_survives_a_new_service_over_the_same_database(service: DataService) -> None:
    _put(service, "ds", S.PUBLISHED)
    again = DataService(
        service._db, service._audit, service._signer, service._keys, service.root, organisation="x"
    )
    assert again.status("ds").state is S.PUBLISHED


def test_a_move_from_a_stale_read_is_a_conflict(service: DataService) -> None:
    _put(service, "ds", S.ACQUIRED)
    stale = service._row("ds")
    service.transition("ds", S.CURATED, actor=STEWARD)
    with pytest.raises(ConflictError):
        service._move(stale, S.CURATED, STEWARD, "second writer")


def test_published_dataset_accepts_no_new_batch(service: DataService, tmp_path: Path) -> None:
    _put(service, "ds", S.PUBLISHED)
    f = g.write_ndjson(tmp_path / "p.ndjson", [g.patient(1)])
    with pytest.raises(DatasetUnavailableError):
        service.ingest("ds", [f], actor=STEWARD, source_system="his")
