"""DQD-style quality checks: definitions match DQD, planted defects are found exactly, statistics."""

from __future__ import annotations

import csv
from datetime import date, timedelta
from pathlib import Path

import pytest

from healthspace.data.ingest import ingest_ndjson
from healthspace.data.quality import (
    CHECK_NAMES,
    FIELD_CHECKS,
    TABLE_CHECKS,
    QualityReport,
    _parse,
    run_quality,
)
from healthspace.data.schema import CDM_TABLES
from healthspace.data.store import ClinicalStore
from tests.data import fhirgen as g

N = 40
_BOUNDS = {"'19500101'": "1950-01-01", "'18500101'": "1850-01-01", "DATEADD(dd,1,GETDATE())": "tomorrow",
           "YEAR(GETDATE())+1": "nextyear"}  # fmt: skip


def test_field_checks_are_those_of_dqd_for_our_tables(conformance_dir: Path) -> None:
    truth: dict[str, set[tuple[str, str | None, float]]] = {}
    params = {"isForeignKey": "fkTableName", "plausibleStartBeforeEnd": "plausibleStartBeforeEndFieldName",
              "sourceValueCompleteness": "standardConceptFieldName"}  # fmt: skip
    with (conformance_dir / "omop-dqd" / "OMOP_CDMv5.4_Field_Level.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            table = row["cdmTableName"].lower()
            if table not in CDM_TABLES:
                continue
            checks = set()
            for check in CHECK_NAMES.values():
                thr = row.get(f"{check}Threshold") or "0"
                if check in ("plausibleValueLow", "plausibleValueHigh"):
                    if row[check] not in ("", "NA"):
                        bound = row[check].replace(" ", "")
                        checks.add((check, _BOUNDS.get(bound, bound), float(thr)))
                elif check == "cdmDatatype":
                    if row[check].lower() == "integer":
                        checks.add((check, None, float(thr)))
                elif row[check] == "Yes":
                    p = row[params[check]].lower() if check in params else None
                    checks.add((check, p, float(thr)))
            truth[f"{table}.{row['cdmFieldName'].lower()}"] = checks
    ours = {k: set(_parse(v)) for k, v in FIELD_CHECKS.items()}
    assert ours == truth


def test_table_checks_are_those_of_dqd_for_our_tables(conformance_dir: Path) -> None:
    truth = {}
    with (conformance_dir / "omop-dqd" / "OMOP_CDMv5.4_Table_Level.csv").open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            table = row["cdmTableName"].lower()
            checks = {
                (c, None, float(row[f"{c}Threshold"]))
                for c in ("measurePersonCompleteness", "measureObservationPeriodOverlap")
                if row.get(c) == "Yes"
            }
            if table in CDM_TABLES and checks:
                truth[table] = checks
    assert {k: set(_parse(v)) for k, v in TABLE_CHECKS.items()} == truth


@pytest.fixture
def clean(store: ClinicalStore, tmp_path: Path) -> ClinicalStore:
    ingest_ndjson(store, [g.write_ndjson(tmp_path / "pop.ndjson", g.population(N))])
    return store


def _failed(report: QualityReport) -> dict[tuple[str, str | None, str], int]:
    return {(c.table, c.field, c.check): c.violated for c in report.failures()}


DEFECTS = [
    # visit that ends before it starts
    g.encounter(3, 7, period={"start": "2021-05-10", "end": "2021-05-01"}),
    # measurement of a patient the store does not hold
    g.observation(999, 0, subject={"reference": "Patient/ghost"}, encounter=None),
    # prescription for 400 days
    g.medication_request(1, id="med-long", dispenseRequest={"expectedSupplyDuration": {"value": 400}}),
    # procedure long after the patient's death (patient 0 died 2023-06-30), not linked to a visit
    g.procedure(0, id="proc-late", performedDateTime="2025-01-01T10:00:00Z", encounter=None),
]


def test_planted_defects_are_found_exactly(clean: ClinicalStore, tmp_path: Path) -> None:
    today = date(2026, 1, 1)
    before = _failed(run_quality(clean, today=today))
    r = ingest_ndjson(clean, [g.write_ndjson(tmp_path / "defects.ndjson", DEFECTS)])
    assert (r.rejected, r.accepted) == (0, len(DEFECTS))
    after = _failed(run_quality(clean, today=today))
    assert {k: v for k, v in after.items() if k not in before} == {
        ("visit_occurrence", "visit_start_date", "plausibleStartBeforeEnd"): 1,
        ("visit_occurrence", "visit_start_datetime", "plausibleStartBeforeEnd"): 1,
        ("measurement", "person_id", "isForeignKey"): 1,
        ("drug_exposure", "days_supply", "plausibleValueHigh"): 1,
        ("procedure_occurrence", "procedure_date", "plausibleBeforeDeath"): 1,
        ("procedure_occurrence", "procedure_datetime", "plausibleBeforeDeath"): 1,
        ("observation_period", "observation_period_end_date", "plausibleBeforeDeath"): 1,
    }


def test_clean_data_fails_only_the_vocabulary_checks(clean: ClinicalStore) -> None:
    failed = {check for _, _, check in _failed(run_quality(clean))}
    # Without an OMOP vocabulary every concept id is 0 ("no matching concept"): DQD counts that.
    assert failed == {
        "standardConceptRecordCompleteness",
        "sourceConceptRecordCompleteness",
        "sourceValueCompleteness",
    }


def test_check_reports_violated_denominator_and_percentage(clean: ClinicalStore, tmp_path: Path) -> None:
    ingest_ndjson(clean, [g.write_ndjson(tmp_path / "d.ndjson", DEFECTS[2:3])])
    (c,) = [
        c for c in run_quality(clean).checks if (c.field, c.check) == ("days_supply", "plausibleValueHigh")
    ]
    assert (c.violated, c.denominator, c.threshold, c.status) == (1, N + 1, 1.0, "fail")
    assert c.pct == pytest.approx(100 / (N + 1))


def test_score_is_the_share_of_evaluated_checks_passed(clean: ClinicalStore) -> None:
    r = run_quality(clean)
    statuses = [c.status for c in r.checks]
    assert r.score == statuses.count("pass") / (statuses.count("pass") + statuses.count("fail"))
    assert (r.passed, r.failed, r.not_applicable) == (
        statuses.count("pass"), statuses.count("fail"), statuses.count("not_applicable"),
    )  # fmt: skip


def test_checks_needing_the_vocabulary_are_not_applicable(clean: ClinicalStore) -> None:
    r = run_quality(clean)
    fk_concept = [c for c in r.checks if c.check == "isForeignKey" and c.parameter == "concept"]
    assert fk_concept
    assert {c.status for c in fk_concept} == {"not_applicable"}


def test_statistics_give_population_time_span_and_code_systems(clean: ClinicalStore) -> None:
    s = run_quality(clean).statistics
    assert (s.persons, s.rows) == (N, g.expected_rows(N))
    # Earliest event: the first encounters (2021-01-01); latest: the last 90-day prescription's end.
    assert (s.first_date, s.last_date) == (date(2021, 1, 1), date(2021, 2, 9) + timedelta(days=89))
    assert s.code_systems["condition_occurrence"] == {"ICD10": N}
    assert s.code_systems["measurement"] == {"LOINC": 3 * N}
    assert s.female_share == 0.5
