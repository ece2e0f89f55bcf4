"""CSV files described by a mapping go through the same validated ingestion as FHIR exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from healthspace.core.errors import ValidationError
from healthspace.data import quarantine
from healthspace.data.cli import data_app
from healthspace.data.csvmap import CsvMapping, csv_to_ndjson, ingest_csv, load_mapping
from healthspace.data.store import ClinicalStore

PATIENTS = {
    "resourceType": "Patient",
    "template": {"resourceType": "Patient", "id": "{mrn}", "gender": "{sex}", "birthDate": "{dob}"},
}
LABS = {
    "resourceType": "Observation",
    "delimiter": ";",
    "template": {
        "resourceType": "Observation",
        "id": "lab-{lab_id}",
        "status": "final",
        "subject": {"reference": "Patient/{mrn}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "{loinc}"}]},
        "effectiveDateTime": "{taken}",
        "valueQuantity": {"value": "{value:number}", "unit": "{unit}", "code": "{unit}"},
    },
}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path: Path) -> list[tuple[Path, CsvMapping]]:
    patients = _write(
        tmp_path, "patients.csv", "mrn,sex,dob\npat-1,female,1960-02-03\npat-2,male,1955-07-01\n"
    )
    labs = _write(
        tmp_path,
        "labs.csv",
        "lab_id;mrn;loinc;taken;value;unit\n"
        "1;pat-1;4548-4;2024-01-05;7.4;%\n"
        "2;pat-2;4548-4;2024-01-06;6.1;%\n"
        "3;pat-2;4548-4;2024-01-07;n/a;%\n"  # not a number: quarantined, never stored without its value
        "4;pat-1;4548-4;;6.0;%\n",  # no date: the standard requires effective[x]
    )
    return [(patients, CsvMapping.model_validate(PATIENTS)), (labs, CsvMapping.model_validate(LABS))]


def test_rows_become_resources_and_bad_rows_are_quarantined_with_reasons(
    store: ClinicalStore, files: list[tuple[Path, CsvMapping]]
) -> None:
    report = ingest_csv(store, files)
    assert report.read == 6
    assert report.inserted == {"person": 2, "measurement": 2}
    assert report.rejected == 2
    reasons = sorted(e.reason for e in quarantine.list_entries(store))
    assert reasons == [
        "Observation.effective is missing",
        "Observation.valueQuantity.value n/a is not a number",
    ]
    con = store.connect()
    values = con.execute("SELECT value_as_number FROM measurement ORDER BY value_as_number").fetchall()
    assert values == [(6.1,), (7.4,)]
    assert report.sources == ["patients.csv.ndjson", "labs.csv.ndjson"]


def test_the_same_csv_twice_adds_nothing(store: ClinicalStore, files: list[tuple[Path, CsvMapping]]) -> None:
    ingest_csv(store, files)
    again = ingest_csv(store, files)
    assert again.already_ingested or sum(again.inserted.values()) == 0
    assert store.row_counts()["measurement"] == 2


def test_a_mapping_that_names_a_missing_column_refuses_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.csv", "mrn,gender,dob\npat-1,female,1960-02-03\n")
    with pytest.raises(ValidationError, match="no column\\(s\\) sex"):
        csv_to_ndjson(path, CsvMapping.model_validate(PATIENTS), tmp_path / "out.ndjson")


def test_a_row_with_more_cells_than_the_header_is_quarantined_as_malformed(
    store: ClinicalStore, tmp_path: Path
) -> None:
    path = _write(tmp_path, "p.csv", "mrn,sex,dob\npat-1,female,1960-02-03,extra\n")
    report = ingest_csv(store, [(path, CsvMapping.model_validate(PATIENTS))])
    assert report.rejected == 1
    assert sum(report.inserted.values()) == 0


def test_a_mapping_file_is_checked_when_loaded(tmp_path: Path) -> None:
    bad = _write(tmp_path, "m.json", json.dumps(PATIENTS | {"resourceType": "Observation"}))
    with pytest.raises(ValidationError, match="resourceType must be Observation"):
        load_mapping(bad)
    with pytest.raises(ValidationError, match="not valid"):
        load_mapping(_write(tmp_path, "n.json", "{"))


def test_the_cli_ingests_csv_with_a_mapping(tmp_path: Path, files: list[tuple[Path, CsvMapping]]) -> None:
    runner = CliRunner()
    store_dir, keys = tmp_path / "store", tmp_path / "keys"
    assert (
        runner.invoke(
            data_app, ["init", "--store", str(store_dir), "--keys", str(keys), "--dataset", "csv-test"]
        ).exit_code
        == 0
    )
    mapping = _write(tmp_path, "labs.map.json", json.dumps(LABS))
    patients = _write(tmp_path, "patients.map.json", json.dumps(PATIENTS))
    first = runner.invoke(
        data_app,
        [
            "ingest",
            "--store",
            str(store_dir),
            "--keys",
            str(keys),
            "--csv-mapping",
            str(patients),
            "--json",
            str(files[0][0]),
        ],
    )
    assert first.exit_code == 0, first.output
    second = runner.invoke(
        data_app,
        [
            "ingest",
            "--store",
            str(store_dir),
            "--keys",
            str(keys),
            "--csv-mapping",
            str(mapping),
            "--json",
            str(files[1][0]),
        ],
    )
    assert second.exit_code == 0, second.output
    assert json.loads(second.output)["rejected"] == 2
