"""Retention timers: destroy archived datasets past their retention date, on demand or in a thread."""

from __future__ import annotations

import logging
import threading
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
    """Runs `run_due` every `interval_s` seconds in a daemon thread (`start`/`stop`) or on demand."""

    def __init__(self, service: DataService, clock: Clock | None = None, interval_s: float = 60.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._service = service
        self._clock: Clock = clock or SystemClock()
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("retention manager already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="data-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_due()
            except Exception:  # the loop must outlive a database hiccup; the next round retries
                log.exception("retention round failed")
            self._stop.wait(self._interval)
