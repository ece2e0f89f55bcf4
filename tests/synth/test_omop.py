"""The OMOP-style Parquet tables use CDM 5.4 names, checked against the OHDSI field-level specification."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from healthspace.synth.omop import EXTENSION_COLUMNS, EXTENSION_TABLES
from tests.synth._data import Population

CDM_TABLES = (
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "measurement",
    "drug_exposure",
    "procedure_occurrence",
    "death",
)


@pytest.fixture(scope="module")
def cdm(conformance_dir: Path) -> dict[str, dict[str, bool]]:
    """Table -> field -> required, from the CDM 5.4 field-level CSV."""
    spec: dict[str, dict[str, bool]] = defaultdict(dict)
    with (conformance_dir / "omop-cdm-5.4" / "OMOP_CDMv5.4_Field_Level.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            spec[row["cdmTableName"]][row["cdmFieldName"]] = row["isRequired"] == "Yes"
    return spec


def _columns(pop: Population, table: str) -> list[str]:
    return pq.read_schema(pop.out / "omop" / f"{table}.parquet").names


def test_omop_directory_holds_the_cdm_tables_and_consent(small: Population) -> None:
    names = sorted(p.stem for p in (small.out / "omop").glob("*.parquet"))
    assert names == sorted((*CDM_TABLES, "consent"))


@pytest.mark.parametrize("table", CDM_TABLES)
def test_columns_are_cdm_fields_or_documented_extensions(
    small: Population, cdm: dict[str, dict[str, bool]], table: str
) -> None:
    unknown = [
        c for c in _columns(small, table) if c not in cdm[table] and (table, c) not in EXTENSION_COLUMNS
    ]
    assert unknown == []


@pytest.mark.parametrize("table", CDM_TABLES)
def test_required_cdm_fields_are_present(
    small: Population, cdm: dict[str, dict[str, bool]], table: str
) -> None:
    required = {f for f, req in cdm[table].items() if req}
    assert required <= set(_columns(small, table))


def test_declared_extensions_are_really_outside_the_cdm(cdm: dict[str, dict[str, bool]]) -> None:
    assert all(column not in cdm[table] for table, column in EXTENSION_COLUMNS)
    assert all(table not in cdm for table in EXTENSION_TABLES)


def test_consent_table_has_the_agreed_columns(small: Population) -> None:
    assert {"person_id", "scenario_id", "decision", "decided_at", "withdrawn_at"} <= set(
        _columns(small, "consent")
    )


@pytest.mark.parametrize(
    ("table", "column", "vocabulary"),
    [
        ("condition_occurrence", "condition_source_vocabulary", "ICD10"),
        ("measurement", "measurement_source_vocabulary", "LOINC"),
        ("drug_exposure", "drug_source_vocabulary", "ATC"),
        ("procedure_occurrence", "procedure_source_vocabulary", "SNOMED"),
    ],
)
def test_source_values_name_their_vocabulary(
    small: Population, table: str, column: str, vocabulary: str
) -> None:
    assert set(small.omop(table).column(column).to_pylist()) == {vocabulary}


def test_condition_source_values_are_icd10_codes(small: Population) -> None:
    codes = set(small.omop("condition_occurrence").column("condition_source_value").to_pylist())
    assert {"E11.9", "I10", "I25.1", "J44.9"} <= codes
    assert all(c[0].isalpha() and c[1:3].isdigit() for c in codes)


def test_every_row_belongs_to_a_generated_person(small: Population) -> None:
    persons = set(small.omop("person").column("person_id").to_pylist())
    assert persons == set(range(1, small.summary.patients + 1))
    for table in ("visit_occurrence", "condition_occurrence", "measurement", "drug_exposure", "consent"):
        assert set(small.omop(table).column("person_id").to_pylist()) <= persons, table


def test_visit_references_resolve(small: Population) -> None:
    visits = set(small.omop("visit_occurrence").column("visit_occurrence_id").to_pylist())
    for table in ("condition_occurrence", "measurement", "drug_exposure", "procedure_occurrence"):
        refs = {v for v in small.omop(table).column("visit_occurrence_id").to_pylist() if v is not None}
        assert refs <= visits, table


def test_person_source_value_is_the_fhir_patient_id(small: Population) -> None:
    person = small.omop("person")
    expected = [f"gz-pat-{i}" for i in person.column("person_id").to_pylist()]
    assert person.column("person_source_value").to_pylist() == expected


def test_about_fifty_rows_per_patient(small: Population) -> None:
    per_patient = small.summary.total_rows / small.summary.patients
    assert 40 <= per_patient <= 65
