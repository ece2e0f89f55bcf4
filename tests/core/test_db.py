"""The database layer: migrations by branch, transactions, and both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from healthspace.core.db import Database


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
