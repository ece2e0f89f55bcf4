"""The consent filter as a DuckDB join on the synthetic OMOP tables, checked against pandas."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from healthspace.consent.models import classes_for_omop_tables
from healthspace.consent.service import ConsentService
from healthspace.core.db import Database
from tests.consent.conftest import DIABETES

AT = datetime(2025, 9, 1, tzinfo=UTC)


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Database]:
    """These suites test FHIR and the engine join, not the store: SQLite alone keeps them fast."""
    database = Database(sqlite_url, branches=["audit", "consent"])
    yield database
    database.dispose()


def test_filtered_measurement_counts_equal_pandas_on_the_generator_table(
    service: ConsentService, synth_dir: Path
) -> None:
    service.import_ndjson((synth_dir / "fhir" / "Consent.ndjson").read_bytes().splitlines(), actor="s")
    f = service.cohort(DIABETES, classes_for_omop_tables(["measurement"]), actor="job", at=AT)
    con = duckdb.connect()
    f.register(con)
    m = str(synth_dir / "omop" / "measurement.parquet")
    sql = "SELECT count(*), count(DISTINCT person_id) FROM read_parquet(?) JOIN consenting USING (person_id)"
    rows, persons = con.execute(sql, [m]).fetchone()  # type: ignore[misc]
    # Independent truth: the generator's own consent table and measurement file, with pandas.
    c = pd.read_parquet(synth_dir / "omop" / "consent.parquet")
    ts = pd.Timestamp(AT)
    ok = c[(c.scenario_id == DIABETES) & (c.decision == "permit") & (c.decided_at <= ts)]
    ok = ok[ok.withdrawn_at.isna() | (ok.withdrawn_at > ts)]
    meas = pd.read_parquet(synth_dir / "omop" / "measurement.parquet", columns=["person_id"])
    expected = meas[meas.person_id.isin(set(ok.person_id))]
    assert (rows, persons) == (len(expected), expected.person_id.nunique())
    assert 0 < rows < len(meas)


def test_a_withdrawal_changes_the_next_join(service: ConsentService, synth_dir: Path) -> None:
    service.import_ndjson((synth_dir / "fhir" / "Consent.ndjson").read_bytes().splitlines(), actor="s")
    from healthspace.consent.models import Source

    con = duckdb.connect()
    m = str(synth_dir / "omop" / "measurement.parquet")
    sql = f"SELECT count(DISTINCT person_id) FROM read_parquet('{m}') JOIN consenting USING (person_id)"
    service.cohort(DIABETES, ["laboratory"], actor="job").register(con)
    (before,) = con.sql(sql).fetchone()  # type: ignore[misc]
    person = service.cohort(DIABETES, ["laboratory"], actor="job").person_ids[0].as_py()
    service.withdraw(person, DIABETES, actor="patient", source=Source.PATIENT)
    service.cohort(DIABETES, ["laboratory"], actor="job").register(con)
    (after,) = con.sql(sql).fetchone()  # type: ignore[misc]
    has_rows = con.sql(f"SELECT count(*) FROM read_parquet('{m}') WHERE person_id = {person}").fetchone()
    assert after == before - (1 if has_rows and has_rows[0] else 0)
