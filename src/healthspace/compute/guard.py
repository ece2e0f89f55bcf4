"""The differencing guard: refuses releases whose person set differs from a recent one by a few persons."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, cast

import numpy as np
from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.orm import Session

from healthspace.compute.disclosure import DisclosureError
from healthspace.compute.tables import CohortHistoryRow
from healthspace.core.clock import utcnow
from healthspace.core.db import Database

__all__ = [
    "CohortHistory",
    "DifferencingGuard",
    "MemoryCohortHistory",
    "SqlCohortHistory",
    "decode_ids",
    "encode_ids",
]


_HISTORY = cast(Table, CohortHistoryRow.__table__)
# Gaps below this compress well (most of each 8-byte delta is zeros); wider ones are random bits.
_DENSE_GAP = 1 << 32


def encode_ids(ids: np.ndarray) -> bytes:
    """Sorted unique int64 ids, delta-encoded, in a zlib stream (deterministic: same ids, same bytes).

    Dense ids (small gaps) are compressed. Hashed ids (the store's person ids: random 63-bit values,
    so gaps of ~2^63/n) gain ~15 % from compression at a cost of milliseconds per 20,000 ids, which
    every job pays; they are stored (zlib level 0, the same format for `decode_ids`).
    """
    deltas = np.diff(ids.astype(np.int64), prepend=np.int64(0))
    dense = len(deltas) < 2 or int(np.abs(deltas[1:]).max()) < _DENSE_GAP
    return zlib.compress(deltas.tobytes(), 1 if dense else 0)


def decode_ids(blob: bytes) -> np.ndarray:
    return np.cumsum(np.frombuffer(zlib.decompress(blob), dtype=np.int64))


class CohortHistory(Protocol):
    """Where the provider remembers the person sets behind released figures, per dataset."""

    def near(self, dataset_id: str, size: int, slack: int, since: datetime) -> list[np.ndarray]:
        """Sets recorded since `since` whose size is within `slack` of `size`."""
        ...

    def record(self, dataset_id: str, consumer_id: str, sets: list[np.ndarray], at: datetime) -> None: ...


@dataclass
class MemoryCohortHistory:
    """In-process history (tests, benchmarks, single-process demos); forgotten on restart."""

    rows: list[tuple[str, datetime, np.ndarray]] = field(default_factory=list)

    def near(self, dataset_id: str, size: int, slack: int, since: datetime) -> list[np.ndarray]:
        return [
            ids
            for ds, at, ids in self.rows
            if ds == dataset_id and at >= since and abs(len(ids) - size) < slack
        ]

    def record(self, dataset_id: str, consumer_id: str, sets: list[np.ndarray], at: datetime) -> None:
        for s in sets:
            # A repeated release refreshes its earlier record instead of piling up copies to compare.
            self.rows = [r for r in self.rows if not (r[0] == dataset_id and np.array_equal(r[2], s))]
            self.rows.append((dataset_id, at, s))


class SqlCohortHistory:
    """History in the control-plane database (branch "compute"); survives restarts."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def near(self, dataset_id: str, size: int, slack: int, since: datetime) -> list[np.ndarray]:
        t = _HISTORY
        # A plain connection, not an ORM session: this read runs on every job.
        with self.db.engine.connect() as c:
            blobs = (
                c.execute(
                    select(t.c.ids).where(
                        t.c.dataset_id == dataset_id,
                        t.c.size > size - slack,
                        t.c.size < size + slack,
                        t.c.recorded_at >= since,
                    )
                )
                .scalars()
                .all()
            )
        return [decode_ids(b) for b in blobs]

    def record(self, dataset_id: str, consumer_id: str, sets: list[np.ndarray], at: datetime) -> None:
        """Remember `sets` as released at `at`; an identical set released before to the same consumer
        is moved to `at` instead of stored again, so repeating a query (a dashboard, a benchmark) keeps
        one row to compare with, whose time is the latest release (the window then runs from there, as
        with a copy per release). Core statements in one transaction: this runs on every job."""
        with self.db.session() as s:
            self.record_in(s, dataset_id, consumer_id, sets, at)

    def record_in(
        self, s: Session, dataset_id: str, consumer_id: str, sets: list[np.ndarray], at: datetime
    ) -> None:
        """`record` inside a caller's transaction (the data plane's, which also stores the result).

        Statements on the Core table: on the ORM class, SQLAlchemy would evaluate each UPDATE's
        criteria against the session's objects first (synchronize_session), on every job."""
        t = _HISTORY
        new: list[dict[str, object]] = []
        for ids in sets:
            blob = encode_ids(ids)  # deterministic: the same ids give the same bytes
            moved = s.execute(
                update(t)
                .where(
                    t.c.dataset_id == dataset_id,
                    t.c.consumer_id == consumer_id,
                    t.c.size == len(ids),
                    t.c.ids == blob,
                )
                .values(recorded_at=at)
            )
            if not getattr(moved, "rowcount", 0):
                new.append(
                    {
                        "dataset_id": dataset_id,
                        "consumer_id": consumer_id,
                        "size": len(ids),
                        "ids": blob,
                        "recorded_at": at,
                    }
                )
        if new:
            s.execute(insert(t), new)

    def forget_before(self, cutoff: datetime) -> int:
        with self.db.session() as s:
            res = s.execute(delete(CohortHistoryRow).where(CohortHistoryRow.recorded_at < cutoff))
            return int(res.rowcount)  # type: ignore[attr-defined]


@dataclass
class DifferencingGuard:
    """The minimum-difference rule across jobs.

    Every person set behind a released figure (the cohort, each table cell and margin, the persons
    with a measurement) is compared with the sets released from the same dataset within `window`, to
    any consumer (so colluding consumers gain nothing). A set differing from one of them by
    0 < |A Δ B| < min_difference persons is refused: subtracting the two figures would single
    those persons out. Sets are compared only when their sizes are close (|A Δ B| ≥ ||A| - |B||), so
    the check is cheap.
    """

    history: CohortHistory
    min_difference: int
    window: timedelta = timedelta(days=365)

    def check(self, dataset_id: str, sets: list[np.ndarray], now: datetime | None = None) -> None:
        since = (now or utcnow()) - self.window
        for ids in sets:
            near = self.history.near(dataset_id, len(ids), self.min_difference, since)
            # An identical set (a repeated query) is told by one comparison, not a sort of both sets.
            differences = [
                0
                if len(old) == len(ids) and np.array_equal(old, ids)
                else int(np.setxor1d(ids, old, assume_unique=True).size)
                for old in near
            ]
            if 0 in differences:
                # Released before as it is: repeating it reveals nothing, whatever it differs from.
                continue
            for d in differences:
                if d < self.min_difference:
                    raise DisclosureError(
                        f"refused: a requested group differs from a recently released one by {d} "
                        f"person(s), fewer than the minimum difference of {self.min_difference}",
                        rule="min-difference",
                    )

    def record(
        self, dataset_id: str, consumer_id: str, sets: list[np.ndarray], now: datetime | None = None
    ) -> None:
        unique: list[np.ndarray] = []
        for s in sets:
            # Compared as arrays (a few per job), not by encoding: the history encodes each set once.
            if len(s) and not any(len(u) == len(s) and np.array_equal(u, s) for u in unique):
                unique.append(s)
        self.history.record(dataset_id, consumer_id, unique, now or utcnow())
