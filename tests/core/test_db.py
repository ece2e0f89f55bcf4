"""The database layer: migrations by branch, transactions, and both backends."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from healthspace.connector.app import BRANCHES as CONNECTOR_BRANCHES
from healthspace.core.db import Database, needs_ping


def test_migrating_with_no_branches_creates_no_tables(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert inspect(db.engine).get_table_names() == []
    finally:
        db.dispose()


def test_session_rolls_back_when_the_block_raises(db_url: str) -> None:
    db = Database(db_url)
    try:
        with db.session() as s:
            s.execute(text("CREATE TABLE t (x INTEGER)"))

        def insert_then_fail() -> None:
            with db.session() as s:
                s.execute(text("INSERT INTO t VALUES (1)"))
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            insert_then_fail()
        with db.session() as s:
            assert s.execute(text("SELECT count(*) FROM t")).scalar_one() == 0
    finally:
        db.dispose()


def _autocommit_on(db: Database, dbapi: object) -> bool:
    if db.dialect == "sqlite":
        return getattr(dbapi, "isolation_level", "") is None
    return bool(getattr(dbapi, "autocommit", False))


def test_autocommit_statements_stand_alone_and_the_connection_goes_back_as_it_was(db_url: str) -> None:
    db = Database(db_url)
    try:
        with db.session() as s:
            s.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))

        def insert_two_the_second_failing() -> None:
            with db.writing_statement() as conn:
                assert _autocommit_on(db, conn.connection.dbapi_connection)
                conn.execute(text("INSERT INTO t VALUES (1)"))
                conn.execute(text("INSERT INTO t VALUES (1)"))  # a clash: the first stays committed

        with pytest.raises(DBAPIError):
            insert_two_the_second_failing()
        with db.session() as s:  # the same pooled connection, back in transaction mode
            assert not _autocommit_on(db, s.connection().connection.dbapi_connection)
            assert s.execute(text("SELECT count(*) FROM t")).scalar_one() == 1
    finally:
        db.dispose()


@pytest.mark.parametrize("durable", [True, False])
def test_a_non_durable_statement_stands_alone_and_only_skips_the_wait_for_the_wal_flush(
    db_url: str, durable: bool
) -> None:
    db = Database(db_url)
    try:
        with db.session() as s:
            s.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))

        def insert_two_the_second_failing() -> None:
            with db.writing_statement(durable=durable) as conn:
                assert _autocommit_on(db, conn.connection.dbapi_connection)
                if db.dialect == "postgresql":
                    wait = conn.execute(text("SHOW synchronous_commit")).scalar_one()
                    assert wait == ("on" if durable else "off")
                conn.execute(text("INSERT INTO t VALUES (1)"))
                conn.execute(text("INSERT INTO t VALUES (1)"))  # a clash: the first stays committed

        with pytest.raises(DBAPIError):
            insert_two_the_second_failing()
        with db.session() as s:  # durable or not, what committed is there for everyone
            assert s.execute(text("SELECT count(*) FROM t")).scalar_one() == 1
            if db.dialect == "postgresql":  # and the pool's own connections still wait for the flush
                assert s.execute(text("SHOW synchronous_commit")).scalar_one() == "on"
    finally:
        db.dispose()


@pytest.mark.postgres
def test_non_durable_connections_keep_the_options_the_url_gives(postgres_url: str) -> None:
    url = make_url(postgres_url).update_query_dict({"options": "-c statement_timeout=12345"})
    db = Database(url.render_as_string(hide_password=False))
    try:
        with db.writing_statement(durable=False) as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "12345ms"
            assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == "off"
    finally:
        db.dispose()


def test_an_autocommit_read_leaves_sqlite_s_prepared_statements_alone(tmp_path: object) -> None:
    # SQLAlchemy's isolation-level switch resets with `PRAGMA read_uncommitted`, which expires every
    # statement the connection has prepared: each is parsed again at its next use (measured: ≈ 4.6 %
    # of a DSP negotiation's instructions). `autocommit()` switches the driver and sends nothing.
    db = Database(f"sqlite:///{tmp_path}/t.db")
    sent: list[str] = []
    try:
        with db.autocommit() as conn:
            conn.connection.dbapi_connection.set_trace_callback(sent.append)  # type: ignore[union-attr]
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
        with db.session() as s:
            s.execute(text("SELECT 2"))
            s.connection().connection.dbapi_connection.set_trace_callback(None)  # type: ignore[union-attr]
    finally:
        db.dispose()
    assert sent[0] == "SELECT 1"
    assert not [q for q in sent if q.upper().startswith("PRAGMA")]


# --- disconnect safety on PostgreSQL: a pooled connection idle for a while is pinged before use ------


def test_a_connection_is_pinged_when_its_idle_time_is_unknown_or_reaches_the_window() -> None:
    assert needs_ping(None, 100.0, 0.5)
    assert needs_ping(99.5, 100.0, 0.5)
    assert needs_ping(10.0, 100.0, 0.5)
    assert not needs_ping(99.9, 100.0, 0.5)


def _kill_pooled_backend(db: Database, admin_url: str) -> None:
    """Use the pool's one connection, then end its server process from outside (a server restart)."""
    import psycopg

    with db.session() as s:
        backend = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend,))


@pytest.mark.postgres
def test_a_dead_connection_idle_past_the_window_is_replaced_before_use(
    postgres_url: str, postgres_admin_url: str
) -> None:
    db = Database(postgres_url, ping_after_idle_s=0.0)  # every checkout counts as idle
    try:
        _kill_pooled_backend(db, postgres_admin_url)
        with db.session() as s:  # the ping fails, the pool reconnects: the caller sees nothing
            assert s.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        db.dispose()


@pytest.mark.postgres
def test_a_dead_connection_used_within_the_window_fails_one_transaction_then_the_pool_recovers(
    postgres_url: str, postgres_admin_url: str
) -> None:
    """The price of skipping the ping for a connection just used: if the server went away in between,
    that connection's next transaction fails (as a disconnect); the pool is invalidated and the next
    transaction reconnects."""
    db = Database(postgres_url, ping_after_idle_s=3600.0)
    try:
        _kill_pooled_backend(db, postgres_admin_url)
        with pytest.raises(DBAPIError) as failed, db.session() as s:
            s.execute(text("SELECT 1"))
        assert failed.value.connection_invalidated
        with db.session() as s:
            assert s.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        db.dispose()


def _migrate_in_child(url: str, start: Any, done: Any) -> None:
    start.wait(30)
    try:
        Database(url, branches=CONNECTOR_BRANCHES).dispose()
        done.put("ok")
    except Exception as exc:  # reported to the test, which shows it
        done.put(f"{type(exc).__name__}: {exc}")


def test_processes_starting_together_on_a_new_database_migrate_it_once(db_url: str) -> None:
    """Workers of one connector start at the same moment on one database: each brings the schema to
    its head, none fails on another's half-made migration, and every table is there once."""
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_migrate_in_child, args=(db_url, start, done)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        outcomes = [done.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
    assert outcomes == ["ok"] * 4
    db = Database(db_url)
    try:
        with db.session() as s:
            heads = sorted(s.scalars(text("SELECT version_num FROM alembic_version")))
        assert len(heads) == len(CONNECTOR_BRANCHES)
    finally:
        db.dispose()
