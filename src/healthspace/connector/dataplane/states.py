"""The data-plane job lifecycle: an enum and its allowed transitions."""

from __future__ import annotations

from enum import StrEnum

from healthspace.core.states import StateMachine

__all__ = ["JOB", "JobState"]


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"  # a GLM session stays RUNNING while the coordinator iterates
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    REFUSED = "REFUSED"  # policy, consent or disclosure control said no; the reason is recorded


JOB: StateMachine[JobState] = StateMachine(
    "job",
    {
        JobState.QUEUED: {JobState.RUNNING, JobState.REFUSED, JobState.CANCELLED},
        JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.REFUSED, JobState.CANCELLED},
    },
)
