"""The consent filter joins the clinical store built from the same hospital's FHIR, checked against pandas."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from healthspace.consent.models import Source, classes_for_omop_tables
from healthspace.consent.service import ConsentService
from healthspace.core.db import Database
from healthspace.data.ingest import ingest_ndjson
from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore
from tests.consent.conftest import DIABETES, pat, person

AT = datetime(2025, 9, 1, tzinfo=UTC)


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Database]:
    """These suites test FHIR and the engine join, not the store: SQLite alone keeps them fast."""
    database = Database(sqlite_url, branches=["audit", "consent"])
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def clinical(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClinicalStore]:
    """The hospital's clinical store, built by ingesting its FHIR NDJSON (Consent is not clinical data)."""
    root = tmp_path_factory.mktemp("clinical")
    store = ClinicalStore.create(root / "store", "gz-cohort", LocalKeyStore(root / "keys"))
    files = sorted(p for p in (synth_dir / "fhir").glob("*.ndjson") if p.name != "Consent.ndjson")
    ingest_ndjson(store, files)
    yield store
    store.close()


def _consenting_truth(synth_dir: Path, at: datetime) -> set[int]:
    """Independent truth: the generator's own consent table (pandas), its patient n being `gz-pat-n`."""
    c = pd.read_parquet(synth_dir / "omop" / "consent.parquet")
    ts = pd.Timestamp(at)
    ok = c[(c.scenario_id == DIABETES) & (c.decision == "permit") & (c.decided_at <= ts)]
    ok = ok[ok.withdrawn_at.isna() | (ok.withdrawn_at > ts)]
    return {person(int(n)) for n in ok.person_id}


def test_a_filter_from_fhir_consent_joins_the_store_ingested_from_the_same_fhir(
    service: ConsentService, synth_dir: Path, clinical: ClinicalStore
) -> None:
    service.import_ndjson((synth_dir / "fhir" / "Consent.ndjson").read_bytes().splitlines(), actor="s")
    f = service.cohort(DIABETES, classes_for_omop_tables(["measurement"]), actor="job", at=AT)
    con = clinical.connect()
    f.register(con)
    sql = "SELECT count(*), count(DISTINCT person_id) FROM measurement JOIN consenting USING (person_id)"
    rows, persons = con.execute(sql).fetchone()  # type: ignore[misc]
    # The generator's measurement table, re-keyed the way ingestion keys patients, filtered with pandas.
    meas = pd.read_parquet(synth_dir / "omop" / "measurement.parquet", columns=["person_id"])
    keyed = meas.person_id.map(lambda n: person(int(n)))
    expected = keyed[keyed.isin(_consenting_truth(synth_dir, AT))]
    assert (rows, persons) == (len(expected), expected.nunique())
    assert 0 < rows < len(meas)


def test_every_consenting_person_id_is_a_person_of_the_store(
    service: ConsentService, synth_dir: Path, clinical: ClinicalStore
) -> None:
    service.import_ndjson((synth_dir / "fhir" / "Consent.ndjson").read_bytes().splitlines(), actor="s")
    f = service.cohort(DIABETES, ["demographics"], actor="job", at=AT)
    con = clinical.connect()
    f.register(con)
    (joined,) = con.execute("SELECT count(*) FROM person JOIN consenting USING (person_id)").fetchone()  # type: ignore[misc]
    assert joined == len(f) == len(_consenting_truth(synth_dir, AT)) > 0


def test_a_withdrawal_changes_the_next_join(
    service: ConsentService, synth_dir: Path, clinical: ClinicalStore
) -> None:
    service.import_ndjson((synth_dir / "fhir" / "Consent.ndjson").read_bytes().splitlines(), actor="s")
    c = pd.read_parquet(synth_dir / "omop" / "consent.parquet")
    meas = pd.read_parquet(synth_dir / "omop" / "measurement.parquet", columns=["person_id"])
    permits = c[(c.scenario_id == DIABETES) & (c.decision == "permit") & c.withdrawn_at.isna()]
    n = int(permits[permits.person_id.isin(set(meas.person_id))].person_id.iloc[0])  # one with lab rows
    con: duckdb.DuckDBPyConnection = clinical.connect()
    sql = "SELECT count(*) FROM measurement JOIN consenting USING (person_id) WHERE person_id = ?"
    service.cohort(DIABETES, ["laboratory"], actor="job").register(con)
    (before,) = con.execute(sql, [person(n)]).fetchone()  # type: ignore[misc]
    service.withdraw(pat(n), DIABETES, actor="patient", source=Source.PATIENT)
    service.cohort(DIABETES, ["laboratory"], actor="job").register(con)
    (after,) = con.execute(sql, [person(n)]).fetchone()  # type: ignore[misc]
    assert (before, after) == (int((meas.person_id == n).sum()), 0)
