"""The control-plane database: engine, sessions and migrations (SQLite by default, PostgreSQL by URL).

Each bounded context owns a branch of Alembic migrations (branch label = context name, e.g. "audit"),
and each service migrates only the branches it uses, so the authority's database holds no connector
tables and a new context never edits another's history.
"""

from __future__ import annotations

import fcntl
import hashlib
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    DateTime,
    Dialect,
    Engine,
    MetaData,
    TypeDecorator,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

__all__ = ["PING_AFTER_IDLE_S", "Base", "Database", "UtcDateTime", "migrate", "needs_ping", "set_autocommit"]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every table in every context (one metadata, named constraints)."""

    metadata = MetaData(naming_convention=NAMING)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and read back timezone-aware on every backend.

    SQLite keeps no zone, so values are converted to UTC before binding; comparisons in SQL then order
    correctly because every stored value has the same zone and format.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError("only timezone-aware datetimes are stored")
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise ValueError("expected a datetime from the database")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside the single writer; NORMAL sync in WAL survives process crashes and
    # loses at most the last transactions on power loss (the durable audit path asks for FULL itself).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


PING_AFTER_IDLE_S = 0.5
"""A pooled PostgreSQL connection idle longer than this is pinged before use (see `_ping_when_idle`)."""


def needs_ping(last_used: float | None, now: float, idle_s: float) -> bool:
    """Whether a pooled connection last used at `last_used` (monotonic seconds; None: unknown) must be
    pinged before it is handed out at `now`."""
    return last_used is None or now - last_used >= idle_s


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Disconnect safety at checkout, paid only by connections that have been idle.

    A pool pre-ping is one round trip per checkout, and a DSP negotiation checks out some twenty
    connections; one that went back to the pool a moment ago is as likely to be alive as one just
    pinged (connection pools such as HikariCP skip validation within 500 ms of use for the same
    reason). So a connection idle for `idle_s` or more is pinged, and on failure the pool is
    invalidated and a fresh connection taken, as with `pool_pre_ping`. A server that goes away within
    `idle_s` of a connection's last use fails that connection's next transaction (its error is a
    disconnect: SQLAlchemy then invalidates the pool, and the transactions after it reconnect).
    """

    def used(_dbapi: Any, record: Any, *_: Any) -> None:
        record.info["hs_used_at"] = time.monotonic()

    def checkout(dbapi: Any, record: Any, _proxy: Any) -> None:
        if not needs_ping(record.info.get("hs_used_at"), time.monotonic(), idle_s):
            return
        try:
            engine.dialect.do_ping(dbapi)
        except Exception as exc:  # whatever the driver raises: this connection cannot be trusted
            raise InvalidatePoolError(f"ping failed: {type(exc).__name__}") from exc

    event.listen(engine, "connect", used)
    event.listen(engine, "checkin", used)
    event.listen(engine, "checkout", checkout)


def set_autocommit(dbapi: Any, on: bool, *, sqlite: bool) -> None:
    """Switch a driver connection in or out of autocommit on the client, without a statement
    (sqlite3: no implicit BEGIN; psycopg: no BEGIN sent). Only between transactions."""
    if sqlite:
        dbapi.isolation_level = None if on else ""  # "": the sqlite3 module's default (deferred BEGIN)
    else:
        dbapi.autocommit = on


def create(url: str, ping_after_idle_s: float = PING_AFTER_IDLE_S) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(_postgres_url(u), pool_size=10, max_overflow=20)
    _ping_when_idle(engine, ping_after_idle_s)
    return engine


def _postgres_url(u: URL) -> str:
    if u.get_backend_name() == "postgresql" and u.get_driver_name() in ("", "psycopg2"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def _create_relaxed(url: str, ping_after_idle_s: float) -> Engine:
    """PostgreSQL connections in autocommit whose commits do not wait for their WAL record to reach
    disk (`synchronous_commit = off`, set when each connects: no statement per use). See
    `Database.writing_statement(durable=False)`."""
    u = make_url(url)
    # Options the URL already carries (psycopg's `options` connection parameter) are kept.
    options = " ".join(filter(None, [str(u.query.get("options", "")), "-c synchronous_commit=off"]))
    engine = create_engine(
        _postgres_url(u),
        pool_size=4,
        max_overflow=8,
        isolation_level="AUTOCOMMIT",
        connect_args={"options": options},
    )
    _ping_when_idle(engine, ping_after_idle_s)
    return engine


_migrate_lock = threading.Lock()


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("healthspace.core") / "migrations"))
    cfg.attributes["engine"] = engine
    return cfg


# Key of the PostgreSQL advisory lock that migrations hold (the first 8 bytes of
# sha256(b"healthspace.migrate"), signed): any fixed number unlikely to be another program's.
_MIGRATE_LOCK_KEY = int.from_bytes(hashlib.sha256(b"healthspace.migrate").digest()[:8], "big", signed=True)


@contextmanager
def _migrating_alone(engine: Engine) -> Iterator[None]:
    """Hold the database's migration lock: the workers of one connector start together on one
    database, and two that both find a table missing would both create it. PostgreSQL: a session
    advisory lock (released by the server if the process dies). SQLite: an exclusive `flock` on a
    file beside the database (released by the kernel likewise)."""
    with _migrate_lock:
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATE_LOCK_KEY})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATE_LOCK_KEY})
                    conn.commit()
            return
        path = engine.url.database
        if engine.dialect.name != "sqlite" or not path or path == ":memory:":
            yield  # nothing another process could share
            return
        with open(f"{path}.migrate-lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def migrate(engine: Engine, branches: Iterable[str]) -> None:
    """Bring the named migration branches (context names) to their heads. Idempotent, and safe for
    several processes starting at once (`_migrating_alone`)."""
    cfg = alembic_config(engine)
    with _migrating_alone(engine):
        for branch in branches:
            command.upgrade(cfg, f"{branch}@head")


class Database:
    """An engine plus a session factory. `session()` is one transaction: commit on success, else rollback."""

    def __init__(
        self, url: str, branches: Iterable[str] = (), *, ping_after_idle_s: float = PING_AFTER_IDLE_S
    ) -> None:
        self.url = url
        self.engine = create(url, ping_after_idle_s)
        self._ping_after_idle_s = ping_after_idle_s
        self._relaxed: Engine | None = None  # `writing_statement(durable=False)`, made on first use
        self._relaxed_lock = threading.Lock()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer per file and makes the others retry with sleeps of 1, 2, 5, 10 ... ms.
        # Writers of this process that share the file (DSP state, audit log, replay guard) queue on
        # this lock instead and get the file the moment it is free. Re-entrant, so a writer that
        # nests another keeps working as before. PostgreSQL has row locks: nothing to queue on.
        self.write_lock: AbstractContextManager[object] = (
            threading.RLock() if self.engine.dialect.name == "sqlite" else nullcontext()
        )
        branches = list(branches)
        if branches:
            migrate(self.engine, branches)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        s = self._sessions()
        try:
            with s.begin():
                yield s
        finally:
            s.close()

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """A write transaction, queued behind this process's other writers on SQLite (`write_lock`)."""
        with self.write_lock, self.session() as s:
            yield s

    @contextmanager
    def writing_core(self) -> Iterator[Connection]:
        """`writing()` for SQL expression statements on a plain connection, without an ORM session:
        the same queueing and the same commit-or-rollback, at a fraction of a session's cost per
        transaction (for hot single-statement writes: outbox leases, replay-guard inserts)."""
        with self.write_lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A pooled connection in autocommit: each statement is a transaction of its own. For reads
        and writes of ONE statement, which is atomic by itself: on PostgreSQL that spares the BEGIN
        and COMMIT (or ROLLBACK) round trips around it. Several statements that must stand or fall
        together take `writing_core()`; writes here take `writing_statement()` (the write lock).

        The driver's own switch, set and reset around the use (psycopg and sqlite3 switch on the
        client, without a statement), not SQLAlchemy's isolation level: on SQLite that one resets
        with `PRAGMA read_uncommitted`, which expires every statement the connection has prepared
        (each is parsed again at its next use)."""
        with self.engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            sqlite = self.dialect == "sqlite"
            set_autocommit(dbapi, True, sqlite=sqlite)
            try:
                yield conn
            finally:
                try:
                    set_autocommit(dbapi, False, sqlite=sqlite)
                except Exception:  # a broken connection: discarded, never pooled in autocommit
                    conn.invalidate()

    @contextmanager
    def writing_statement(self, *, durable: bool = True) -> Iterator[Connection]:
        """`autocommit()` for writes that each stand alone (one statement, or several that need not
        stand or fall together), queued like `writing()`.

        `durable=False` is for bookkeeping that the caller recovers from if a crash of PostgreSQL
        itself loses it (a message marked sent is sent again, a lease runs out): on PostgreSQL the
        statements commit without waiting for the WAL flush (`synchronous_commit = off`, on a small
        pool of connections of their own). What a later durable commit of any connection follows is
        flushed with it, since the WAL is written in order; an application crash loses nothing. On
        SQLite nothing changes (its DSP writes already use `synchronous=NORMAL`)."""
        if durable or self.dialect == "sqlite":
            with self.write_lock, self.autocommit() as conn:
                yield conn
            return
        if self._relaxed is None:
            with self._relaxed_lock:
                if self._relaxed is None:
                    self._relaxed = _create_relaxed(self.url, self._ping_after_idle_s)
        with self._relaxed.connect() as conn:
            yield conn

    def dispose(self) -> None:
        if self._relaxed is not None:
            self._relaxed.dispose()
        self.engine.dispose()
