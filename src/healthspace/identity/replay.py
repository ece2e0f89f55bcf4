"""Replay guards: remember each accepted request token until it expires, so it is accepted only once.

`MemoryReplayGuard` serves one process (tests, benchmarks, a single-worker service); `SqlReplayGuard`
shares the memory between all workers of a service through its control-plane database.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import Connection, CursorResult, Table, delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from healthspace.core.db import Database
from healthspace.identity.tables import SeenTokenRow

__all__ = ["MemoryReplayGuard", "ReplayGuard", "SqlReplayGuard"]

_SEEN = cast(Table, SeenTokenRow.__table__)


class ReplayGuard(Protocol):
    """Contract: `first_use` records (issuer, token_id) and returns True the first time it is presented,
    False on every later presentation until `expires_at`. It MUST be atomic: of any number of concurrent
    calls with the same pair, exactly one returns True. Entries may be forgotten once `expires_at` is
    past (the token is refused as expired by then). A guard that cannot decide MUST raise, never
    return True.
    """

    def first_use(self, issuer: str, token_id: str, expires_at: datetime, now: datetime) -> bool: ...


class MemoryReplayGuard:
    """A replay guard in this process's memory. Expired entries are pruned every `prune_interval`."""

    def __init__(self, prune_interval: timedelta = timedelta(seconds=30)) -> None:
        self._seen: dict[tuple[str, str], datetime] = {}
        self._lock = threading.Lock()
        self._prune_interval = prune_interval
        self._next_prune: datetime | None = None

    def first_use(self, issuer: str, token_id: str, expires_at: datetime, now: datetime) -> bool:
        key = (issuer, token_id)
        with self._lock:
            if self._next_prune is None or now >= self._next_prune:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
                self._next_prune = now + self._prune_interval
            seen_until = self._seen.get(key)
            if seen_until is not None and seen_until > now:
                return False
            self._seen[key] = expires_at
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


class SqlReplayGuard:
    """A replay guard in the `identity_seen_tokens` table (migration branch "identity").

    The primary key does the work: the insert of a pair already present inserts nothing (SQLite and
    PostgreSQL: `ON CONFLICT DO NOTHING RETURNING`; other databases: the integrity error), and the database
    serialises concurrent inserts of one key, so exactly one of them wins. Rows whose expiry has passed
    are deleted at most once per `prune_interval` by whichever request comes along.
    """

    def __init__(self, db: Database, prune_interval: timedelta = timedelta(seconds=60)) -> None:
        self._db = db
        self._prune_interval = prune_interval
        self._prune_lock = threading.Lock()
        self._next_prune: datetime | None = None
        # SQLite and PostgreSQL: `INSERT ... ON CONFLICT DO NOTHING RETURNING`; others: see first_use.
        self._insert_new: Any = None
        if db.dialect in ("sqlite", "postgresql"):
            insert = sqlite.insert if db.dialect == "sqlite" else postgresql.insert
            self._insert_new = insert(_SEEN).on_conflict_do_nothing().returning(_SEEN.c.token_id)

    @property
    def database(self) -> Database:
        """The database whose `identity_seen_tokens` table holds the memory."""
        return self._db

    def first_use(self, issuer: str, token_id: str, expires_at: datetime, now: datetime) -> bool:
        self.prune_if_due(now)
        # A plain connection and a statement built once: this insert runs for every peer request,
        # and an ORM session costs several times the statement. Where that is one statement, it
        # commits by itself (no BEGIN and COMMIT round trips); the fallback needs a transaction.
        writing = self._db.writing_statement if self._insert_new is not None else self._db.writing_core
        with writing() as conn:
            return self.first_use_in(conn, issuer, token_id, expires_at, now)

    def first_use_in(
        self, conn: Connection, issuer: str, token_id: str, expires_at: datetime, now: datetime
    ) -> bool:
        """`first_use` inside the caller's transaction on `conn` (a connection to `database`): the use
        is recorded if and when that transaction commits. Until then a concurrent presentation of the
        pair waits for it on PostgreSQL (the key's lock) and on SQLite (the single writer), and is
        refused if it commits. A caller whose transaction rolls back must record the use again
        (`first_use`) if the token is to stay spent. It does not prune (that takes a transaction of its
        own): call `prune_if_due` before opening the transaction."""
        # SQLite keeps no zone, so every time is stored in UTC to keep comparisons meaningful.
        values = {"issuer": issuer, "token_id": token_id, "expires_at": expires_at.astimezone(UTC)}
        if self._insert_new is not None:
            # A row comes back only if this statement inserted it (rowcount is not reliable here).
            return conn.execute(self._insert_new, values).first() is not None
        try:
            with conn.begin_nested():
                conn.execute(_SEEN.insert().values(**values))
        except IntegrityError:
            return False
        return True

    def prune(self, now: datetime) -> int:
        """Delete entries that expired before `now`; returns how many."""
        with self._db.writing_statement() as conn:
            result = cast(
                CursorResult[Any],
                conn.execute(delete(_SEEN).where(_SEEN.c.expires_at < now.astimezone(UTC))),
            )
            return result.rowcount

    def prune_if_due(self, now: datetime) -> None:
        """`prune` if `prune_interval` has passed since the last time (in its own transaction)."""
        if self._next_prune is not None and now < self._next_prune:
            return
        # One pruning request at a time; the others go straight on with their own check.
        if not self._prune_lock.acquire(blocking=False):
            return
        try:
            self._next_prune = now + self._prune_interval
            self.prune(now)
        finally:
            self._prune_lock.release()
