"""A synthetic hospital end to end: our ingest of its FHIR export against its own OMOP rendering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from healthspace.data.ingest import ingest_ndjson
from healthspace.data.keys import LocalKeyStore
from healthspace.data.quality import run_quality
from healthspace.data.schema import CDM_TABLES
from healthspace.data.store import ClinicalStore
from healthspace.synth.generate import generate

PATIENTS, SEED = 150, 11


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "gz"
    generate("gz", PATIENTS, SEED, out, progress=False)
    return out


@pytest.fixture(scope="module")
def loaded(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClinicalStore]:
    base = tmp_path_factory.mktemp("store")
    store = ClinicalStore.create(base / "store", "gz-demo", LocalKeyStore(base / "keys"))
    report = ingest_ndjson(store, sorted((site / "fhir").glob("*.ndjson")))
    if report.rejected:
        pytest.fail(f"synthetic data rejected: {report.rules}")
    yield store
    store.close()


def test_every_resource_type_the_generator_writes_is_read(site: Path, loaded: ClinicalStore) -> None:
    lines = sum(p.read_bytes().count(b"\n") for p in (site / "fhir").glob("*.ndjson"))
    (batch,) = loaded.batches
    assert batch["read"] == lines
    assert (batch["unmapped"], batch["not_clinical"]) == ({}, {"Consent": batch["resources"]["Consent"]})


@pytest.mark.parametrize("table", sorted(CDM_TABLES))
def test_row_counts_equal_the_generator_omop_tables(table: str, site: Path, loaded: ClinicalStore) -> None:
    (truth,) = duckdb.execute(
        f"SELECT count(*) FROM read_parquet('{site / 'omop' / table}.parquet')"
    ).fetchone()  # type: ignore[misc]
    assert loaded.row_counts()[table] == truth


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("condition_occurrence", "condition"),
        ("drug_exposure", "drug"),
        ("procedure_occurrence", "procedure"),
        ("measurement", "measurement"),
    ],
)
def test_source_codes_and_vocabularies_match_the_generator(
    table: str, column: str, site: Path, loaded: ClinicalStore
) -> None:
    q = "SELECT {v}, {c}_source_value, count(*) FROM {t} GROUP BY ALL ORDER BY ALL"
    truth = duckdb.execute(
        q.format(
            v=f"{column}_source_vocabulary", c=column, t=f"read_parquet('{site / 'omop' / table}.parquet')"
        )
    ).fetchall()
    ours = loaded.connect().execute(q.format(v="hs_source_vocabulary", c=column, t=table)).fetchall()
    assert ours == truth


def test_measurement_values_and_units_match_the_generator(site: Path, loaded: ClinicalStore) -> None:
    q = (
        "SELECT measurement_source_value, unit_source_value, count(value_as_number), "
        "round(sum(value_as_number), 6) FROM {t} GROUP BY ALL ORDER BY ALL"
    )
    truth = duckdb.execute(q.format(t=f"read_parquet('{site / 'omop' / 'measurement'}.parquet')")).fetchall()
    assert loaded.connect().execute(q.format(t="measurement")).fetchall() == truth


def test_quality_report_runs_on_a_synthetic_hospital(loaded: ClinicalStore) -> None:
    r = run_quality(loaded)
    assert r.statistics.persons == PATIENTS
    assert r.passed > r.failed > 0
