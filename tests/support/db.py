"""Database helpers for tests: what the driver saw of transactions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event

from healthspace.core.db import Database


def _each_statement(db: Database, run: Callable[[], object], note: Callable[[Any], object]) -> list[Any]:
    """`note(connection)` for each statement `run` executes on `db`'s database through any of its
    engines (`db` keeps a second pool for statements that need not wait for the WAL flush). Engines
    of other databases are ignored: threads other tests left running may execute statements meanwhile."""
    seen: list[Any] = []
    database = db.engine.url.database

    def after(conn: Any, *_: Any) -> None:
        if conn.engine.url.database == database:
            seen.append(note(conn))

    event.listen(Engine, "after_cursor_execute", after)
    try:
        run()
    finally:
        event.remove(Engine, "after_cursor_execute", after)
    return seen


def in_transaction_after_each(db: Database, run: Callable[[], object]) -> list[bool]:
    """For each statement `run` executes on `db`: whether the driver had a transaction open after it
    (a statement in autocommit leaves none). Checks too that the pooled connection is back out of
    autocommit afterwards."""

    def open_transaction(conn: Any) -> bool:
        dbapi = conn.connection.dbapi_connection
        if db.dialect == "sqlite":
            return bool(dbapi.in_transaction)
        return bool(dbapi.info.transaction_status.name != "IDLE")

    seen = _each_statement(db, run, open_transaction)
    with db.session() as s:
        dbapi = s.connection().connection.dbapi_connection
        assert db.engine.dialect.get_isolation_level(dbapi) != "AUTOCOMMIT"
    return seen


def waits_for_wal_flush_after_each(db: Database, run: Callable[[], object]) -> list[bool]:
    """For each statement `run` executes on `db`: whether its commit waits for the WAL flush (False
    only for `Database.writing_statement(durable=False)` on PostgreSQL)."""
    return _each_statement(db, run, lambda conn: conn.engine is db.engine)
