"""The differencing guard: refuses releases whose person set differs from a recent one by a few persons."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, cast

import numpy as np
from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from healthspace.compute.disclosure import DisclosureError
from healthspace.compute.tables import CohortHistoryRow
from healthspace.core.clock import utcnow
from healthspace.core.db import Database

__all__ = [
    "CohortHistory",
    "DifferencingGuard",
    "MemoryCohortHistory",
    "Recent",
    "SqlCohortHistory",
    "decode_ids",
    "digest_ids",
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


def digest_ids(ids: np.ndarray) -> bytes:
    """SHA-256 of sorted unique ids as little-endian int64: the same set, the same 32 bytes.

    Lets the history tell a repeated release from its digest alone, without reading, decoding and
    comparing the stored ids (~190 KB for 24,000 persons) on every job."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").data).digest()


@dataclass(frozen=True)
class Recent:
    """What the history holds near one set within the window: `repeated` when the set itself was
    released (then nothing else is read: repeating a release reveals nothing), else `others`, the sets
    of close size to compare with."""

    repeated: bool
    others: list[np.ndarray]


class CohortHistory(Protocol):
    """Where the provider remembers the person sets behind released figures, per dataset."""

    def near(self, dataset_id: str, ids: np.ndarray, digest: bytes, slack: int, since: datetime) -> Recent:
        """Whether `ids` (whose `digest_ids` is `digest`) was recorded since `since`; if not, the sets
        recorded since then whose size is within `slack` of its size."""
        ...

    def record(
        self,
        dataset_id: str,
        consumer_id: str,
        sets: list[np.ndarray],
        at: datetime,
        digests: list[bytes] | None = None,
    ) -> None:
        """Remember `sets` (with their `digest_ids`, computed when not given) as released at `at`."""
        ...


@dataclass
class MemoryCohortHistory:
    """In-process history (tests, benchmarks, single-process demos); forgotten on restart."""

    rows: list[tuple[str, datetime, np.ndarray]] = field(default_factory=list)

    def near(self, dataset_id: str, ids: np.ndarray, digest: bytes, slack: int, since: datetime) -> Recent:
        close = [
            old
            for ds, at, old in self.rows
            if ds == dataset_id and at >= since and abs(len(old) - len(ids)) < slack
        ]
        if any(len(old) == len(ids) and np.array_equal(old, ids) for old in close):
            return Recent(True, [])
        return Recent(False, close)

    def record(
        self,
        dataset_id: str,
        consumer_id: str,
        sets: list[np.ndarray],
        at: datetime,
        digests: list[bytes] | None = None,
    ) -> None:
        for s in sets:
            # A repeated release refreshes its earlier record instead of piling up copies to compare.
            self.rows = [r for r in self.rows if not (r[0] == dataset_id and np.array_equal(r[2], s))]
            self.rows.append((dataset_id, at, s))


# The per-job statements, built once (building and cache-keying a statement costs ~0.1 ms a time).
_NEAR = select(_HISTORY.c.seq, _HISTORY.c.digest).where(
    _HISTORY.c.dataset_id == bindparam("b_dataset"),
    _HISTORY.c.size > bindparam("b_low"),
    _HISTORY.c.size < bindparam("b_high"),
    _HISTORY.c.recorded_at >= bindparam("b_since"),
)
_IDS_OF = select(_HISTORY.c.ids).where(_HISTORY.c.seq.in_(bindparam("b_seqs", expanding=True)))
_MOVE = (
    update(_HISTORY)
    .where(
        _HISTORY.c.dataset_id == bindparam("b_dataset"),
        _HISTORY.c.size == bindparam("b_size"),
        _HISTORY.c.digest == bindparam("b_digest"),
        _HISTORY.c.consumer_id == bindparam("b_consumer"),
    )
    .values(recorded_at=bindparam("b_at"))
)


class SqlCohortHistory:
    """History in the control-plane database (branch "compute"); survives restarts.

    A repeated release (the usual case: a dashboard, a study re-run) is recognised by its digest, read
    from an index with the sizes and times; stored ids are read and decoded only for sets of close size
    that are not the same set (and for rows stored before digests, which have none).
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def near(self, dataset_id: str, ids: np.ndarray, digest: bytes, slack: int, since: datetime) -> Recent:
        size = len(ids)
        params = {"b_dataset": dataset_id, "b_low": size - slack, "b_high": size + slack, "b_since": since}
        # A plain connection, not an ORM session: this read runs on every job.
        with self.db.engine.connect() as c:
            rows = c.execute(_NEAR, params).all()
            if any(d == digest for _, d in rows):
                return Recent(True, [])
            blobs = c.execute(_IDS_OF, {"b_seqs": [seq for seq, _ in rows]}).scalars().all() if rows else []
        return Recent(False, [decode_ids(b) for b in blobs])

    def record(
        self,
        dataset_id: str,
        consumer_id: str,
        sets: list[np.ndarray],
        at: datetime,
        digests: list[bytes] | None = None,
    ) -> None:
        """Remember `sets` as released at `at`; an identical set released before to the same consumer
        is moved to `at` instead of stored again, so repeating a query (a dashboard, a benchmark) keeps
        one row to compare with, whose time is the latest release (the window then runs from there, as
        with a copy per release). Core statements in one transaction: this runs on every job."""
        with self.db.session() as s:
            self.record_in(s, dataset_id, consumer_id, sets, at, digests)

    def record_in(
        self,
        s: Session | Connection,
        dataset_id: str,
        consumer_id: str,
        sets: list[np.ndarray],
        at: datetime,
        digests: list[bytes] | None = None,
    ) -> None:
        """`record` inside a caller's transaction (the data plane's, which also stores the result): an
        ORM session or a plain connection.

        Statements on the Core table: on the ORM class, SQLAlchemy would evaluate each UPDATE's
        criteria against the session's objects first (synchronize_session), on every job. The same set
        is found by its digest (no ids encoded or compared in SQL unless the set is new)."""
        if digests is None:
            digests = [digest_ids(ids) for ids in sets]
        if len(digests) != len(sets):
            raise ValueError("one digest per set")
        new: list[dict[str, object]] = []
        for ids, digest in zip(sets, digests, strict=True):
            moved = s.execute(
                _MOVE,
                {
                    "b_dataset": dataset_id,
                    "b_size": len(ids),
                    "b_digest": digest,
                    "b_consumer": consumer_id,
                    "b_at": at,
                },
            )
            if not getattr(moved, "rowcount", 0):
                new.append(
                    {
                        "dataset_id": dataset_id,
                        "consumer_id": consumer_id,
                        "size": len(ids),
                        "ids": encode_ids(ids),
                        "digest": digest,
                        "recorded_at": at,
                    }
                )
        if new:
            s.execute(insert(_HISTORY), new)

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
    # Digests of the sets checked since the last `record`, by array identity (the array is held, so its
    # id is not reused): a job's sets are hashed once for the check and the record.
    _digests: dict[int, tuple[np.ndarray, bytes]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _digest(self, ids: np.ndarray) -> bytes:
        hit = self._digests.get(id(ids))
        if hit is not None and hit[0] is ids:
            return hit[1]
        d = digest_ids(ids)
        self._digests[id(ids)] = (ids, d)
        return d

    def check(self, dataset_id: str, sets: list[np.ndarray], now: datetime | None = None) -> None:
        self._digests.clear()
        since = (now or utcnow()) - self.window
        for ids in sets:
            recent = self.history.near(dataset_id, ids, self._digest(ids), self.min_difference, since)
            if recent.repeated:
                # Released before as it is: repeating it reveals nothing, whatever it differs from.
                continue
            # An identical set the history could not tell by digest (a row stored before digests) is
            # told by one comparison, not a sort of both sets.
            differences = [
                0
                if len(old) == len(ids) and np.array_equal(old, ids)
                else int(np.setxor1d(ids, old, assume_unique=True).size)
                for old in recent.others
            ]
            if 0 in differences:
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
            # Compared as arrays (a few per job), not by encoding: the history encodes each new set once.
            if len(s) and not any(len(u) == len(s) and np.array_equal(u, s) for u in unique):
                unique.append(s)
        digests = [self._digest(s) for s in unique]
        self._digests.clear()
        self.history.record(dataset_id, consumer_id, unique, now or utcnow(), digests)
