"""Synthetic hospitals for the compute tests, generated once per session, and their ground truth in pandas."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd
import psycopg
import pyarrow.parquet as pq
import pytest

from healthspace.compute import DuckDBEngine, PostgresEngine, attach_parquet, load_postgres
from healthspace.compute.engine import OMOP_TABLES
from healthspace.consent.filter import ConsentFilter
from healthspace.synth.generate import generate

SCENARIO = "diabetes-outcomes-research"
AS_OF = datetime(2026, 1, 1, tzinfo=UTC)
SITES = {"gz": 8_000, "sz": 8_000, "hk": 8_000}


@pytest.fixture(scope="session")
def synth_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compute-synth")
    return {site: generate(site, n, 5, root / site, progress=False).out for site, n in SITES.items()}


def omop(site_dir: Path, table: str) -> pd.DataFrame:
    return pq.read_table(site_dir / "omop" / f"{table}.parquet").to_pandas()


def consenting_ids(site_dir: Path, scenario: str = SCENARIO, at: datetime = AS_OF) -> list[int]:
    """Permit decided by `at` and not withdrawn by then: the rule stated in docs/synth.md."""
    c = omop(site_dir, "consent")
    c = c[(c.scenario_id == scenario) & (c.decision == "permit") & (c.decided_at <= at)]
    c = c[c.withdrawn_at.isna() | (c.withdrawn_at > at)]
    return sorted(int(i) for i in c.person_id)


def consent_filter(site_dir: Path) -> ConsentFilter:
    return ConsentFilter.of(SCENARIO, AS_OF, frozenset(), consenting_ids(site_dir))


@pytest.fixture
def gz_engine(synth_dirs: dict[str, Path]) -> Iterator[DuckDBEngine]:
    con = duckdb.connect()
    attach_parquet(con, synth_dirs["gz"] / "omop")
    yield DuckDBEngine(con)
    con.close()


@pytest.fixture(scope="session")
def gz_consent(synth_dirs: dict[str, Path]) -> ConsentFilter:
    return consent_filter(synth_dirs["gz"])


@contextmanager
def duckdb_and_postgres(site_dir: Path, postgres_url: str) -> Iterator[tuple[DuckDBEngine, PostgresEngine]]:
    """The same synthetic site on both engines: DuckDB over its Parquet, PostgreSQL loaded from it (the
    source vocabulary columns under the name the store gives them)."""
    con = duckdb.connect()
    attach_parquet(con, site_dir / "omop")
    url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(url) as pg:
            tables = []
            for t in OMOP_TABLES:
                table = pq.read_table(site_dir / "omop" / f"{t}.parquet")
                names = [
                    "hs_source_vocabulary" if n.endswith("_source_vocabulary") else n
                    for n in table.column_names
                ]
                tables.append((t, table.rename_columns(names)))
            load_postgres(pg, tables)
            yield DuckDBEngine(con), PostgresEngine(pg)
    finally:
        con.close()
