"""Retention timers: destroy archived datasets past their retention date.

A connector runs `run_due` as a housekeeping duty (`core.leases.Duty`): every minute, in the one of its
processes that holds the duty's lease."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from healthspace.core.clock import Clock, SystemClock
from healthspace.core.errors import HealthspaceError
from healthspace.data.service import DataService

__all__ = ["RETENTION_ACTOR", "RetentionManager", "RetentionResult"]

log = logging.getLogger(__name__)
RETENTION_ACTOR = "system:retention"


@dataclass(frozen=True)
class RetentionResult:
    dataset_id: str
    destroyed: bool
    detail: str


class RetentionManager:
    def __init__(self, service: DataService, clock: Clock | None = None) -> None:
        self._service = service
        self._clock: Clock = clock or SystemClock()

    def run_due(self, now: datetime | None = None) -> list[RetentionResult]:
        """Destroy every archived dataset whose `retain_until` <= `now`; a failure does not stop the rest."""
        at = now or self._clock.now()
        results = []
        for dataset_id in self._service.due_for_destruction(at):
            try:
                status = self._service.status(dataset_id)
                until = status.retain_until.isoformat() if status.retain_until else "?"
                self._service.destroy(
                    dataset_id, actor=RETENTION_ACTOR, reason=f"retention period ended on {until}"
                )
                results.append(RetentionResult(dataset_id, True, f"retention ended {until}"))
            except HealthspaceError as exc:
                # Left for the next round (e.g. a steward restored it meanwhile); the service audited it.
                log.warning("retention: %s not destroyed: %s", dataset_id, exc.detail)
                results.append(RetentionResult(dataset_id, False, exc.detail))
        return results
