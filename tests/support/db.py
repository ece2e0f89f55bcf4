"""Database helpers for tests: what the driver saw of transactions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import event

from healthspace.core.db import Database


def in_transaction_after_each(db: Database, run: Callable[[], object]) -> list[bool]:
    """For each statement `run` executes on `db`: whether the driver had a transaction open after it
    (a statement in autocommit leaves none). Checks too that the pooled connection is back out of
    autocommit afterwards."""
    seen: list[bool] = []

    def after(conn: Any, *_: Any) -> None:
        dbapi = conn.connection.dbapi_connection
        if db.dialect == "sqlite":
            seen.append(bool(dbapi.in_transaction))
        else:
            seen.append(dbapi.info.transaction_status.name != "IDLE")

    event.listen(db.engine, "after_cursor_execute", after)
    try:
        run()
    finally:
        event.remove(db.engine, "after_cursor_execute", after)
    with db.session() as s:
        dbapi = s.connection().connection.dbapi_connection
        assert db.engine.dialect.get_isolation_level(dbapi) != "AUTOCOMMIT"
    return seen
