"""The data-plane job lifecycle: an enum and its allowed transitions."""

from __future__ import annotations

from enum import StrEnum

from healthspace.core.states import StateMachine

__all__ = ["JOB", "REVIEW", "JobState", "ReviewState"]


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"  # a GLM session stays RUNNING while the coordinator iterates
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    REFUSED = "REFUSED"  # policy, consent or disclosure control said no; the reason is recorded
    HELD = "HELD"  # computed and signed, waiting in the output-review airlock for human release


JOB: StateMachine[JobState] = StateMachine(
    "job",
    {
        JobState.QUEUED: {JobState.RUNNING, JobState.REFUSED, JobState.CANCELLED},
        JobState.RUNNING: {
            JobState.SUCCEEDED,
            JobState.HELD,
            JobState.FAILED,
            JobState.REFUSED,
            JobState.CANCELLED,
        },
        # Released by two reviewers, or rejected by one (final, with the reason); not cancellable: the
        # result exists and the hospital, not the consumer, decides whether it leaves.
        JobState.HELD: {JobState.SUCCEEDED, JobState.REFUSED},
    },
)


class ReviewState(StrEnum):
    HELD = "HELD"
    RELEASED = "RELEASED"
    REJECTED = "REJECTED"


REVIEW: StateMachine[ReviewState] = StateMachine(
    "output review", {ReviewState.HELD: {ReviewState.RELEASED, ReviewState.REJECTED}}
)
