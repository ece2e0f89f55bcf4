"""The control-plane database: engine, sessions and migrations (SQLite by default, PostgreSQL by URL).

Each bounded context owns a branch of Alembic migrations (branch label = context name, e.g. "audit"),
and each service migrates only the branches it uses, so the authority's database holds no connector
tables and a new context never edits another's history.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, DateTime, Dialect, Engine, MetaData, TypeDecorator, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

__all__ = ["Base", "Database", "UtcDateTime", "migrate"]

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


def create(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if u.get_backend_name() == "postgresql" and u.get_driver_name() in ("", "psycopg2"):
        url = u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


_migrate_lock = threading.Lock()


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("healthspace.core") / "migrations"))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine, branches: Iterable[str]) -> None:
    """Bring the named migration branches (context names) to their heads. Idempotent."""
    cfg = alembic_config(engine)
    with _migrate_lock:
        for branch in branches:
            command.upgrade(cfg, f"{branch}@head")


class Database:
    """An engine plus a session factory. `session()` is one transaction: commit on success, else rollback."""

    def __init__(self, url: str, branches: Iterable[str] = ()) -> None:
        self.url = url
        self.engine = create(url)
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

    def dispose(self) -> None:
        self.engine.dispose()
