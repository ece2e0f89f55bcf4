"""The airlock's store contract on SQLite and PostgreSQL, including reviewers acting at the same time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from healthspace.connector.dataplane import JobState, OutputReview, Reviewer, ReviewState
from healthspace.connector.dataplane.tables import JobRow
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from healthspace.core.errors import ConflictError, ForbiddenError, ValidationError

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def running_job(db: Database, job_id: str) -> None:
    with db.session() as s:
        s.add(
            JobRow(
                id=job_id,
                agreement_id="agr-1",
                transfer_id="tr-1",
                consumer_id="hk-university",
                scenario_id="s",
                dataset_id="d",
                kind="query",
                state=JobState.RUNNING.value,
                spec="{}",
                result=None,
                reason=None,
                epsilon=0.0,
                created_at=NOW,
                updated_at=NOW,
            )
        )


def held(db: Database, review: OutputReview, job_id: str) -> str:
    running_job(db, job_id)
    with db.session() as s:
        job = s.get(JobRow, job_id)
        assert job is not None
        return review.hold(s, job, '{"payload": {}}', 0.5).id


@pytest.fixture
def setup(make_db: Callable[..., Database]) -> tuple[Database, OutputReview, list[Any]]:
    db = make_db("jobs")
    log: list[Any] = []

    def record(actor: str, action: str, subject: str, outcome: Any, reason: str = "", **kw: Any) -> None:
        log.append((actor, action, subject, outcome))

    return db, OutputReview(db, record, FixedClock(NOW)), log


def job_of(db: Database, job_id: str) -> JobRow:
    with db.session() as s:
        row = s.get(JobRow, job_id)
        assert row is not None
        return row


def test_two_approvals_release_and_the_job_gets_its_result(setup: Any) -> None:
    db, review, _ = setup
    rid = held(db, review, "job-1")
    assert job_of(db, "job-1").state == JobState.HELD.value
    review.approve(rid, Reviewer("k1", "steward"))
    assert job_of(db, "job-1").result is None
    out = review.approve(rid, Reviewer("k2", "reviewer"))
    job = job_of(db, "job-1")
    assert (out.state, [a.reviewer for a in out.approvals]) == (ReviewState.RELEASED, ["k1", "k2"])
    assert (job.state, job.result, job.epsilon) == (JobState.SUCCEEDED.value, '{"payload": {}}', 0.5)


def test_one_reviewer_counts_once(setup: Any) -> None:
    db, review, _ = setup
    rid = held(db, review, "job-2")
    review.approve(rid, Reviewer("k1", "steward"))
    with pytest.raises(ConflictError):
        review.approve(rid, Reviewer("k1", "steward"))
    assert review.held()[0].approvals[0].reviewer == "k1"


def test_the_requesting_participant_cannot_review(setup: Any) -> None:
    db, review, _ = setup
    rid = held(db, review, "job-3")
    with pytest.raises(ForbiddenError):
        review.approve(rid, Reviewer("k9", "steward", "hk-university"))


def test_rejection_is_final_with_its_reason(setup: Any) -> None:
    db, review, _ = setup
    rid = held(db, review, "job-4")
    with pytest.raises(ValidationError):
        review.reject(rid, Reviewer("k1", "steward"), " ")
    review.reject(rid, Reviewer("k1", "steward"), "too fine a table")
    with pytest.raises(ConflictError):
        review.approve(rid, Reviewer("k2", "steward"))
    with pytest.raises(ConflictError):
        review.reject(rid, Reviewer("k2", "steward"), "again")
    job = job_of(db, "job-4")
    assert (job.state, job.reason, job.result) == (
        JobState.REFUSED.value,
        "output review rejected: too fine a table",
        None,
    )


def test_concurrent_reviewers_never_lose_or_add_an_approval(setup: Any) -> None:
    db, review, _ = setup
    rid = held(db, review, "job-5")
    barrier = threading.Barrier(3)
    outcomes: list[str] = []
    lock = threading.Lock()

    def approve(reviewer: str) -> None:
        barrier.wait(timeout=10)
        try:
            state = review.approve(rid, Reviewer(reviewer, "steward")).state.value
        except ConflictError:
            state = "conflict"
        with lock:
            outcomes.append(state)

    threads = [threading.Thread(target=approve, args=(f"k{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    released = review.held(ReviewState.RELEASED)
    assert sorted(outcomes) == ["HELD", "RELEASED", "conflict"]
    assert [len(r.approvals) for r in released if r.id == rid] == [2]
    assert job_of(db, "job-5").state == JobState.SUCCEEDED.value
