"""Our OMOP tables against the published CDM 5.4 field specification."""

from __future__ import annotations

import csv
from pathlib import Path

import duckdb
import pytest

from healthspace.data.schema import CDM_TABLES, EXTENSION_PREFIX, duckdb_ddl


def _cdm(conformance_dir: Path) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    with (conformance_dir / "omop-cdm-5.4" / "OMOP_CDMv5.4_Field_Level.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["cdmTableName"].lower(), []).append(row)
    return out


def _type(cdm_type: str) -> str:
    t = cdm_type.lower()
    return "varchar" if t.startswith("varchar") else t


@pytest.mark.parametrize("table", sorted(CDM_TABLES))
def test_columns_follow_the_cdm_in_order_type_and_required(table: str, conformance_dir: Path) -> None:
    spec = _cdm(conformance_dir)[table]
    ours = [c for c in CDM_TABLES[table].columns if not c.name.startswith(EXTENSION_PREFIX)]
    assert [(c.name, c.cdm_type, c.required) for c in ours] == [
        (r["cdmFieldName"].lower(), _type(r["cdmDatatype"]), r["isRequired"] == "Yes") for r in spec
    ]


@pytest.mark.parametrize("table", sorted(CDM_TABLES))
def test_primary_key_is_the_cdm_one(table: str, conformance_dir: Path) -> None:
    pks = [r["cdmFieldName"] for r in _cdm(conformance_dir)[table] if r["isPrimaryKey"] == "Yes"]
    assert ([CDM_TABLES[table].primary_key] if pks else []) == pks


@pytest.mark.parametrize("table", sorted(CDM_TABLES))
def test_ddl_creates_the_table_with_not_null_on_required_columns(table: str) -> None:
    con = duckdb.connect()
    con.execute(duckdb_ddl(table))
    cols = con.execute(
        f"SELECT column_name, is_nullable FROM information_schema.columns WHERE table_name = '{table}'"
    ).fetchall()
    assert {n for n, nullable in cols if nullable == "NO"} == {
        c.name for c in CDM_TABLES[table].columns if c.required
    }
