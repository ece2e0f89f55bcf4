"""Fixtures shared by every suite: where the conformance data lives, and databases to test stores on."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from healthspace.core.db import Database

ROOT = Path(__file__).resolve().parents[1]
# The conformance material is read in place, beside the project (see ../shared/conformance/README.md).
CONFORMANCE = ROOT.parent / "shared" / "conformance"


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.fail(f"conformance data not found at {CONFORMANCE}; it must sit at ../shared/conformance")
    return CONFORMANCE


# --- databases ---------------------------------------------------------------------------------------
# Store suites run on SQLite and on PostgreSQL. Each PostgreSQL test gets a database of its own, created
# and dropped around it. Where CI=true a missing PostgreSQL fails the run instead of skipping it.

POSTGRES_ADMIN_URL = os.environ.get(
    "HEALTHSPACE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _postgres_unavailable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return None
    except Exception as exc:
        return f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}"


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    problem = _postgres_unavailable()
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return POSTGRES_ADMIN_URL


@contextmanager
def temporary_postgres_database(admin_url: str) -> Iterator[str]:
    """Create a fresh, empty PostgreSQL database; yield its SQLAlchemy URL; drop it afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"hs_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    with temporary_postgres_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{(tmp_path / 'control.db').as_posix()}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each store test runs twice: on a SQLite file and on its own PostgreSQL database."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def make_db(db_url: str) -> Iterator[Callable[..., Database]]:
    """Open `Database(db_url, branches)`; every database opened is disposed after the test."""
    opened: list[Database] = []

    def _open(*branches: str) -> Database:
        db = Database(db_url, branches=branches)
        opened.append(db)
        return db

    yield _open
    for db in opened:
        db.dispose()
