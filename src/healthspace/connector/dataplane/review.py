"""The provider's output-review airlock: results an agreement marks `reviewOutput` wait for two reviewers.

A job whose decision carries the `reviewOutput` duty ends HELD: its signed result sits in
`dataplane_reviews` and the consumer sees only the job's state. Two distinct staff reviewers (steward
or reviewer role, never the requesting participant) release it, which makes the job SUCCEEDED with the
result; one rejection, with a reason, is final and makes the job REFUSED. Every step is audited.

Concurrency: approve and reject start with a guarded UPDATE of the review row (`state = HELD`), which
takes the row's write lock on PostgreSQL and the database's on SQLite before anything is read, so two
reviewers acting at once are serialised and neither approval is lost.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, Field
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from healthspace.audit.log import AuditRecorder
from healthspace.audit.models import Outcome
from healthspace.connector.dataplane.states import JOB, REVIEW, JobState, ReviewState
from healthspace.connector.dataplane.tables import JobRow, ReviewApprovalRow, ReviewRow
from healthspace.core.clock import Clock
from healthspace.core.db import Database
from healthspace.core.errors import ConflictError, ForbiddenError, NotFoundError, ValidationError

__all__ = [
    "ApprovalPublic",
    "OutputReview",
    "RejectBody",
    "ReviewPublic",
    "Reviewer",
]


@dataclass(frozen=True, slots=True)
class Reviewer:
    """A member of the provider's staff acting on a held result (from their API key)."""

    id: str
    role: str
    label: str = ""

    @property
    def actor(self) -> str:
        return f"{self.role}:{self.id}"


class ApprovalPublic(BaseModel):
    reviewer: str
    label: str
    approved_at: datetime


class ReviewPublic(BaseModel):
    id: str
    job_id: str
    agreement_id: str
    consumer_id: str
    scenario_id: str
    dataset_id: str
    state: ReviewState
    required: int
    approvals: list[ApprovalPublic]
    reason: str | None
    decided_by: str | None
    epsilon: float
    created_at: datetime
    updated_at: datetime
    result: dict[str, Any] | None = None
    """The signed envelope under review (shown to staff by `show`, never listed)."""


class RejectBody(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


def _public(
    row: ReviewRow, approvals: Sequence[ReviewApprovalRow], with_result: bool = False
) -> ReviewPublic:
    return ReviewPublic(
        id=row.id,
        job_id=row.job_id,
        agreement_id=row.agreement_id,
        consumer_id=row.consumer_id,
        scenario_id=row.scenario_id,
        dataset_id=row.dataset_id,
        state=ReviewState(row.state),
        required=row.required,
        approvals=[
            ApprovalPublic(reviewer=a.reviewer, label=a.label, approved_at=a.approved_at)
            for a in sorted(approvals, key=lambda a: a.approved_at)
        ],
        reason=row.reason,
        decided_by=row.decided_by,
        epsilon=row.epsilon,
        created_at=row.created_at,
        updated_at=row.updated_at,
        result=orjson.loads(row.result) if with_result else None,
    )


class OutputReview:
    """Holds, lists, shows, approves and rejects held results (see the module docstring).

    Contract: `approve` MUST refuse the requesting participant (403), a second approval by the same
    reviewer (409) and any action on a review no longer HELD (409); `reject` MUST refuse an empty
    reason (422); the job moves only through `states.JOB` (HELD → SUCCEEDED | REFUSED).
    """

    def __init__(self, db: Database, record: AuditRecorder, clock: Clock, required: int = 2) -> None:
        if required < 1:
            raise ValidationError("output review needs at least one approval")
        self.db = db
        self.required = required
        self._record = record
        self._clock = clock

    def hold(self, s: Session, job: JobRow, envelope: str, epsilon: float) -> ReviewRow:
        """Hold `job`'s signed result, inside the caller's transaction (the job moves to HELD there)."""
        now = self._clock.now()
        job.state = JOB.transition(JobState(job.state), JobState.HELD).value
        job.epsilon = epsilon
        job.updated_at = now
        row = ReviewRow(
            id=f"review-{secrets.token_hex(10)}",
            job_id=job.id,
            agreement_id=job.agreement_id,
            consumer_id=job.consumer_id,
            scenario_id=job.scenario_id,
            dataset_id=job.dataset_id,
            state=ReviewState.HELD.value,
            required=self.required,
            result=envelope,
            epsilon=epsilon,
            reason=None,
            decided_by=None,
            created_at=now,
            updated_at=now,
        )
        s.add(row)
        return row

    def summary_of_job(self, job_id: str) -> dict[str, Any] | None:
        """What the consumer may see of a job's review: its id, state, approval count and reason."""
        with self.db.session() as s:
            row = s.scalars(select(ReviewRow).where(ReviewRow.job_id == job_id)).one_or_none()
            if row is None:
                return None
            n = s.scalar(
                select(func.count())
                .select_from(ReviewApprovalRow)
                .where(ReviewApprovalRow.review_id == row.id)
            )
            return {
                "id": row.id,
                "state": row.state,
                "approvals": int(n or 0),
                "required": row.required,
                "reason": row.reason,
            }

    def held(
        self, state: ReviewState | None = ReviewState.HELD, limit: int = 100, offset: int = 0
    ) -> list[ReviewPublic]:
        with self.db.session() as s:
            q = select(ReviewRow).order_by(ReviewRow.created_at, ReviewRow.id)
            if state is not None:
                q = q.where(ReviewRow.state == state.value)
            rows = list(s.scalars(q.limit(max(1, min(limit, 500))).offset(max(0, offset))))
            approvals = self._approvals(s, [r.id for r in rows])
            return [_public(r, approvals.get(r.id, [])) for r in rows]

    def show(self, review_id: str, reviewer: Reviewer) -> ReviewPublic:
        """The review with the result itself; reading a held result is audited (it is still secret)."""
        with self.db.session() as s:
            row = self._get(s, review_id)
            out = _public(row, self._approvals(s, [row.id]).get(row.id, []), with_result=True)
        self._audit(reviewer.actor, "dataplane.review.view", out, Outcome.SUCCESS)
        return out

    def approve(self, review_id: str, reviewer: Reviewer) -> ReviewPublic:
        now = self._clock.now()
        try:
            with self.db.session() as s:
                row = self._lock_held(s, review_id, now)
                self._not_requester(row, reviewer)
                s.add(
                    ReviewApprovalRow(
                        review_id=row.id,
                        reviewer=reviewer.id,
                        label=reviewer.label[:200],
                        approved_at=now,
                    )
                )
                s.flush()
                approvals = self._approvals(s, [row.id]).get(row.id, [])
                released = len(approvals) >= row.required
                if released:
                    row.state = REVIEW.transition(ReviewState(row.state), ReviewState.RELEASED).value
                    row.decided_by = reviewer.actor
                    job = s.get(JobRow, row.job_id)
                    if job is None:  # the foreign key makes this impossible short of manual edits
                        raise NotFoundError(f"no job {row.job_id!r}")
                    job.state = JOB.transition(JobState(job.state), JobState.SUCCEEDED).value
                    job.result = row.result
                    job.updated_at = now
                out = _public(row, approvals)
        except IntegrityError:
            self._audit_refusal(review_id, reviewer, "approve", "already approved by this reviewer")
            raise ConflictError(
                f"{reviewer.actor} has already approved {review_id!r}", reason="already-approved"
            ) from None
        except (ConflictError, ForbiddenError) as exc:
            self._audit_refusal(review_id, reviewer, "approve", exc.detail)
            raise
        self._audit(reviewer.actor, "dataplane.review.approve", out, Outcome.SUCCESS)
        if released:
            self._audit(reviewer.actor, "dataplane.review.release", out, Outcome.SUCCESS)
        return out

    def reject(self, review_id: str, reviewer: Reviewer, reason: str) -> ReviewPublic:
        reason = reason.strip()
        if not reason:
            raise ValidationError("a rejection needs a reason", pointer="/reason")
        now = self._clock.now()
        try:
            with self.db.session() as s:
                row = self._lock_held(s, review_id, now)
                self._not_requester(row, reviewer)
                row.state = REVIEW.transition(ReviewState(row.state), ReviewState.REJECTED).value
                row.reason = reason[:2000]
                row.decided_by = reviewer.actor
                job = s.get(JobRow, row.job_id)
                if job is None:
                    raise NotFoundError(f"no job {row.job_id!r}")
                job.state = JOB.transition(JobState(job.state), JobState.REFUSED).value
                job.reason = f"output review rejected: {reason}"[:4000]
                job.updated_at = now
                out = _public(row, self._approvals(s, [row.id]).get(row.id, []))
        except (ConflictError, ForbiddenError) as exc:
            self._audit_refusal(review_id, reviewer, "reject", exc.detail)
            raise
        self._audit(reviewer.actor, "dataplane.review.reject", out, Outcome.SUCCESS, reason)
        return out

    # --- helpers -------------------------------------------------------------------------------------

    def _get(self, s: Session, review_id: str) -> ReviewRow:
        row = s.get(ReviewRow, review_id)
        if row is None:
            raise NotFoundError(f"no held result {review_id!r}")
        return row

    def _lock_held(self, s: Session, review_id: str, now: datetime) -> ReviewRow:
        # A write first (see the module docstring): serialises concurrent reviewers on both databases.
        touched = s.execute(
            update(ReviewRow)
            .where(ReviewRow.id == review_id, ReviewRow.state == ReviewState.HELD.value)
            .values(updated_at=now)
        )
        row = self._get(s, review_id)
        if getattr(touched, "rowcount", 0) != 1:
            raise ConflictError(
                f"result {review_id!r} is {row.state}, no longer held", reason="not-held", state=row.state
            )
        s.refresh(row)
        return row

    @staticmethod
    def _not_requester(row: ReviewRow, reviewer: Reviewer) -> None:
        # Staff keys are the provider's; a key labelled with the requesting participant's id (a
        # participant studying its own data) is still the requester and may not release its result.
        if row.consumer_id in (reviewer.id, reviewer.label):
            raise ForbiddenError("the requester cannot review their own result", reason="own-result")

    @staticmethod
    def _approvals(s: Session, ids: Sequence[str]) -> dict[str, Sequence[ReviewApprovalRow]]:
        out: dict[str, list[ReviewApprovalRow]] = {}
        if ids:
            for a in s.scalars(select(ReviewApprovalRow).where(ReviewApprovalRow.review_id.in_(ids))):
                out.setdefault(a.review_id, []).append(a)
        return dict(out)

    def _audit(self, actor: str, action: str, r: ReviewPublic, outcome: Outcome, reason: str = "") -> None:
        self._record(
            actor,
            action,
            f"review:{r.id}",
            outcome,
            reason[:2000],
            scenario_id=r.scenario_id,
            agreement_id=r.agreement_id,
            details={
                "job_id": r.job_id,
                "state": r.state.value,
                "approvals": [a.reviewer for a in r.approvals],
                "required": r.required,
            },
        )

    def _audit_refusal(self, review_id: str, reviewer: Reviewer, step: str, why: str) -> None:
        self._record(
            reviewer.actor,
            f"dataplane.review.{step}",
            f"review:{review_id}",
            Outcome.DENIED,
            why[:2000],
            details={"review_id": review_id},
        )
