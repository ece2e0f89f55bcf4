"""The output review airlock: results are released after two approvals by reviewers, not the requester."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from healthspace.core.errors import ConflictError, ForbiddenError, NotFoundError, ValidationError
from healthspace.core.states import StateMachine

__all__ = ["REVIEW", "Airlock", "HeldResult", "ReviewState"]


class ReviewState(StrEnum):
    HELD = "HELD"
    RELEASED = "RELEASED"
    REJECTED = "REJECTED"


REVIEW: StateMachine[ReviewState] = StateMachine(
    "review", {ReviewState.HELD: {ReviewState.RELEASED, ReviewState.REJECTED}}
)


@dataclass
class HeldResult:
    id: str
    requester: str
    result: dict[str, Any]
    state: ReviewState = ReviewState.HELD
    approvals: list[str] = field(default_factory=list)
    reason: str = ""


class Airlock:
    """Holds results until `required` distinct reviewers, none of them the requester, approve.

    In memory (one lab process); any reviewer may reject with a reason, which is final.
    """

    def __init__(self, required: int = 2) -> None:
        if required < 1:
            raise ValidationError("at least one approval is required")
        self.required = required
        self._held: dict[str, HeldResult] = {}
        self._lock = threading.Lock()

    def hold(self, requester: str, result: dict[str, Any]) -> HeldResult:
        item = HeldResult(f"review-{secrets.token_hex(8)}", requester, result)
        with self._lock:
            self._held[item.id] = item
        return item

    def _get(self, review_id: str) -> HeldResult:
        item = self._held.get(review_id)
        if item is None:
            raise NotFoundError(f"no held result {review_id!r}")
        return item

    def approve(self, review_id: str, reviewer: str) -> HeldResult:
        with self._lock:
            item = self._get(review_id)
            if reviewer == item.requester:
                raise ForbiddenError("the requester cannot review their own result", reason="own-result")
            if item.state is not ReviewState.HELD:
                raise ConflictError(f"result {review_id!r} is {item.state.value}")
            if reviewer in item.approvals:
                raise ConflictError(f"{reviewer} has already approved {review_id!r}")
            item.approvals.append(reviewer)
            if len(item.approvals) >= self.required:
                item.state = REVIEW.transition(item.state, ReviewState.RELEASED)
            return item

    def reject(self, review_id: str, reviewer: str, reason: str) -> HeldResult:
        if not reason.strip():
            raise ValidationError("a rejection needs a reason")
        with self._lock:
            item = self._get(review_id)
            if reviewer == item.requester:
                raise ForbiddenError("the requester cannot review their own result", reason="own-result")
            item.state = REVIEW.transition(item.state, ReviewState.REJECTED)
            item.reason = reason
            return item

    def released(self, review_id: str) -> dict[str, Any]:
        """The result, once released; refused (403) while held or after rejection."""
        with self._lock:
            item = self._get(review_id)
            if item.state is not ReviewState.RELEASED:
                raise ForbiddenError(
                    f"result {review_id!r} is {item.state.value}: "
                    f"{len(item.approvals)} of {self.required} approvals",
                    reason="not-released",
                )
            return item.result
