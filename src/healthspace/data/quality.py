"""Data Quality Dashboard-style checks and catalog statistics, run set-based in DuckDB over the store.

The check definitions are those of OHDSI DQD v2.8.4 (field and table level) for the CDM tables we hold;
`FIELD_CHECKS` carries their parameters and thresholds (a test compares them with the published CSV).
Each table is scanned once for all of its field checks (one wide aggregate with the joins they need), plus
one UNION ALL query for primary keys and one for the table-level checks: a handful of queries, whatever the
number of checks or rows. A check passes when its violated share (%) is at most the DQD threshold; the
overall score is the share of evaluated checks that pass.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Literal

from pydantic import BaseModel, Field

from healthspace.core.clock import utcnow
from healthspace.data.schema import CDM_TABLES
from healthspace.data.store import ClinicalStore

__all__ = [
    "CHECK_NAMES",
    "FIELD_CHECKS",
    "TABLE_CHECKS",
    "CheckResult",
    "DatasetStatistics",
    "QualityReport",
    "dataset_statistics",
    "run_quality",
]

# "table.field" -> space-separated "check[=parameter]@threshold" (DQD v2.8.4 Field_Level, our tables),
# with the check names abbreviated as in `CHECK_NAMES`.
# Parameters: fk table, end-date field, standard concept field, or a plausible bound where
# `tomorrow` / `nextyear` stand for DQD's DATEADD(dd,1,GETDATE()) / YEAR(GETDATE())+1.
FIELD_CHECKS: dict[str, str] = {
    "condition_occurrence.condition_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@5",
    "condition_occurrence.condition_end_date": "mvc@100 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1",
    "condition_occurrence.condition_end_datetime": "mvc@100 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1",
    "condition_occurrence.condition_occurrence_id": "req@0 int@0 pk@0 mvc@0",
    "condition_occurrence.condition_source_concept_id": "int@0 fk=concept@0 mvc@100 srcrc@10",
    "condition_occurrence.condition_source_value": "mvc@100 svc=condition_concept_id@10",
    "condition_occurrence.condition_start_date": (
        "req@0 mvc@0 low=1950-01-01@1 high=tomorrow@1 sbe=condition_end_date@1 birth@1 death@1 visit@5"
    ),
    "condition_occurrence.condition_start_datetime": (
        "mvc@100 low=1950-01-01@1 high=tomorrow@1 sbe=condition_end_datetime@1 birth@1 death@1"
    ),
    "condition_occurrence.condition_status_concept_id": "int@0 fk=concept@0 mvc@100 scrc@5",
    "condition_occurrence.condition_status_source_value": "mvc@100 svc=condition_status_concept_id@100",
    "condition_occurrence.condition_type_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@0",
    "condition_occurrence.person_id": "req@0 int@0 fk=person@0 mvc@0",
    "condition_occurrence.provider_id": "int@0 fk=provider@0 mvc@100",
    "condition_occurrence.stop_reason": "mvc@100",
    "condition_occurrence.visit_detail_id": "int@0 fk=visit_detail@0 mvc@100",
    "condition_occurrence.visit_occurrence_id": "int@0 fk=visit_occurrence@0 mvc@100",
    "death.cause_concept_id": "int@0 fk=concept@0 mvc@100 scrc@5",
    "death.cause_source_concept_id": "int@0 fk=concept@0 mvc@100 srcrc@10",
    "death.cause_source_value": "mvc@100 svc=cause_source_concept_id@10",
    "death.death_date": "req@0 mvc@0 low=1950-01-01@1 high=tomorrow@1 birth@1",
    "death.death_datetime": "mvc@100 low=1950-01-01@1 high=tomorrow@1 birth@1",
    "death.death_type_concept_id": "int@0 fk=concept@0 mvc@100 scrc@0",
    "death.person_id": "req@0 int@0 fk=person@0 mvc@0",
    "drug_exposure.days_supply": "int@0 mvc@100 low=1@1 high=365@1",
    "drug_exposure.dose_unit_source_value": "mvc@100",
    "drug_exposure.drug_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@5",
    "drug_exposure.drug_exposure_end_date": "req@0 mvc@0 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1",
    "drug_exposure.drug_exposure_end_datetime": "mvc@100 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1",
    "drug_exposure.drug_exposure_id": "req@0 int@0 pk@0 mvc@0",
    "drug_exposure.drug_exposure_start_date": (
        "req@0 mvc@0 low=1950-01-01@1 high=tomorrow@1 sbe=drug_exposure_end_date@1 birth@1 death@1 visit@5"
    ),
    "drug_exposure.drug_exposure_start_datetime": (
        "mvc@100 low=1950-01-01@1 high=tomorrow@1 sbe=drug_exposure_end_datetime@1 birth@1 death@1"
    ),
    "drug_exposure.drug_source_concept_id": "int@0 fk=concept@0 mvc@100 srcrc@10",
    "drug_exposure.drug_source_value": "mvc@100 svc=drug_concept_id@10",
    "drug_exposure.drug_type_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@0",
    "drug_exposure.lot_number": "mvc@100",
    "drug_exposure.person_id": "req@0 int@0 fk=person@0 mvc@0",
    "drug_exposure.provider_id": "int@0 fk=provider@0 mvc@100",
    "drug_exposure.quantity": "mvc@100 low=0.0000001@1",
    "drug_exposure.refills": "int@0 mvc@100 low=0@1 high=24@1",
    "drug_exposure.route_concept_id": "int@0 fk=concept@0 mvc@100 scrc@100",
    "drug_exposure.route_source_value": "mvc@100 svc=route_concept_id@100",
    "drug_exposure.sig": "mvc@100",
    "drug_exposure.stop_reason": "mvc@100",
    "drug_exposure.verbatim_end_date": "mvc@100 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1",
    "drug_exposure.visit_detail_id": "int@0 fk=visit_detail@0 mvc@100",
    "drug_exposure.visit_occurrence_id": "int@0 fk=visit_occurrence@0 mvc@100",
    "measurement.meas_event_field_concept_id": "int@0 fk=concept@0 mvc@100",
    "measurement.measurement_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@5",
    "measurement.measurement_date": "req@0 mvc@0 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1 visit@5",
    "measurement.measurement_datetime": "mvc@100 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1",
    "measurement.measurement_event_id": "mvc@100",
    "measurement.measurement_id": "req@0 int@0 pk@0 mvc@0",
    "measurement.measurement_source_concept_id": "int@0 fk=concept@0 mvc@100 srcrc@10",
    "measurement.measurement_source_value": "mvc@100 svc=measurement_concept_id@10",
    "measurement.measurement_time": "mvc@100",
    "measurement.measurement_type_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@0",
    "measurement.operator_concept_id": "int@0 fk=concept@0 mvc@100",
    "measurement.person_id": "req@0 int@0 fk=person@0 mvc@0",
    "measurement.provider_id": "int@0 fk=provider@0 mvc@100",
    "measurement.range_high": "mvc@100",
    "measurement.range_low": "mvc@100",
    "measurement.unit_concept_id": "int@0 fk=concept@0 mvc@100 scrc@5",
    "measurement.unit_source_concept_id": "int@0 fk=concept@0 mvc@100 srcrc@100",
    "measurement.unit_source_value": "mvc@100 svc=unit_concept_id@100",
    "measurement.value_as_concept_id": "int@0 fk=concept@0 mvc@100",
    "measurement.value_as_number": "mvc@100",
    "measurement.value_source_value": "mvc@100",
    "measurement.visit_detail_id": "int@0 fk=visit_detail@0 mvc@100",
    "measurement.visit_occurrence_id": "int@0 fk=visit_occurrence@0 mvc@100",
    "observation_period.observation_period_end_date": (
        "req@0 mvc@0 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1"
    ),
    "observation_period.observation_period_id": "req@0 int@0 pk@0 mvc@0",
    "observation_period.observation_period_start_date": (
        "req@0 mvc@0 low=1950-01-01@1 high=tomorrow@1 sbe=observation_period_end_date@0 birth@1 death@1"
    ),
    "observation_period.period_type_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@0",
    "observation_period.person_id": "req@0 int@0 fk=person@0 mvc@0",
    "person.birth_datetime": "mvc@100 low=1850-01-01@1 high=tomorrow@1",
    "person.care_site_id": "int@0 fk=care_site@0 mvc@100",
    "person.day_of_birth": "int@0 mvc@100 low=1@1 high=31@1",
    "person.ethnicity_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@100",
    "person.ethnicity_source_concept_id": "int@0 fk=concept@0 mvc@100",
    "person.ethnicity_source_value": "mvc@100 svc=ethnicity_concept_id@100",
    "person.gender_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@5",
    "person.gender_source_concept_id": "int@0 fk=concept@0 mvc@100",
    "person.gender_source_value": "mvc@100 svc=gender_concept_id@100",
    "person.location_id": "int@0 fk=location@0 mvc@100",
    "person.month_of_birth": "int@0 mvc@100 low=1@1 high=12@1",
    "person.person_id": "req@0 int@0 pk@0 mvc@0",
    "person.person_source_value": "mvc@100",
    "person.provider_id": "int@0 fk=provider@0 mvc@100",
    "person.race_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@100",
    "person.race_source_concept_id": "int@0 fk=concept@0 mvc@100",
    "person.race_source_value": "mvc@100 svc=race_concept_id@100",
    "person.year_of_birth": "req@0 int@0 mvc@0 low=1850@1 high=nextyear@1",
    "procedure_occurrence.modifier_concept_id": "int@0 fk=concept@0 mvc@100 scrc@100",
    "procedure_occurrence.modifier_source_value": "mvc@100 svc=modifier_concept_id@100",
    "procedure_occurrence.person_id": "req@0 int@0 fk=person@0 mvc@0",
    "procedure_occurrence.procedure_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@5",
    "procedure_occurrence.procedure_date": (
        "req@0 mvc@0 low=1950-01-01@1 high=tomorrow@1 sbe=procedure_end_date@1 birth@1 death@1 visit@5"
    ),
    "procedure_occurrence.procedure_datetime": (
        "mvc@100 low=1950-01-01@1 high=tomorrow@1 sbe=procedure_end_datetime@1 birth@1 death@1"
    ),
    "procedure_occurrence.procedure_end_date": "mvc@100 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1",
    "procedure_occurrence.procedure_end_datetime": "mvc@100 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1",
    "procedure_occurrence.procedure_occurrence_id": "req@0 int@0 pk@0 mvc@0",
    "procedure_occurrence.procedure_source_concept_id": "int@0 fk=concept@0 mvc@100 srcrc@10",
    "procedure_occurrence.procedure_source_value": "mvc@100 svc=procedure_concept_id@10",
    "procedure_occurrence.procedure_type_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@0",
    "procedure_occurrence.provider_id": "int@0 fk=provider@0 mvc@100",
    "procedure_occurrence.quantity": "int@0 mvc@100 low=1@1",
    "procedure_occurrence.visit_detail_id": "int@0 fk=visit_detail@0 mvc@100",
    "procedure_occurrence.visit_occurrence_id": "int@0 fk=visit_occurrence@0 mvc@100",
    "visit_occurrence.admitted_from_concept_id": "int@0 fk=concept@0 mvc@100 scrc@5",
    "visit_occurrence.admitted_from_source_value": "mvc@100 svc=admitted_from_concept_id@100",
    "visit_occurrence.care_site_id": "int@0 fk=care_site@0 mvc@100",
    "visit_occurrence.discharged_to_concept_id": "int@0 fk=concept@0 mvc@100 scrc@5",
    "visit_occurrence.discharged_to_source_value": "mvc@100 svc=discharged_to_concept_id@100",
    "visit_occurrence.person_id": "req@0 int@0 fk=person@0 mvc@0",
    "visit_occurrence.preceding_visit_occurrence_id": "int@0 fk=visit_occurrence@0 mvc@100",
    "visit_occurrence.provider_id": "int@0 fk=provider@0 mvc@100",
    "visit_occurrence.visit_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@0",
    "visit_occurrence.visit_end_date": "req@0 mvc@0 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1",
    "visit_occurrence.visit_end_datetime": "mvc@100 low=1950-01-01@1 high=tomorrow@1 birth@1 death@1",
    "visit_occurrence.visit_occurrence_id": "req@0 int@0 pk@0 mvc@0",
    "visit_occurrence.visit_source_concept_id": "int@0 fk=concept@0 mvc@100 srcrc@100",
    "visit_occurrence.visit_source_value": "mvc@100 svc=visit_concept_id@10",
    "visit_occurrence.visit_start_date": (
        "req@0 mvc@0 low=1950-01-01@1 high=tomorrow@1 sbe=visit_end_date@1 birth@1 death@1"
    ),
    "visit_occurrence.visit_start_datetime": (
        "mvc@100 low=1950-01-01@1 high=tomorrow@1 sbe=visit_end_datetime@1 birth@1 death@1"
    ),
    "visit_occurrence.visit_type_concept_id": "req@0 int@0 fk=concept@0 mvc@0 scrc@0",
}

CHECK_NAMES: dict[str, str] = {
    "req": "isRequired",
    "int": "cdmDatatype",
    "pk": "isPrimaryKey",
    "fk": "isForeignKey",
    "mvc": "measureValueCompleteness",
    "scrc": "standardConceptRecordCompleteness",
    "srcrc": "sourceConceptRecordCompleteness",
    "svc": "sourceValueCompleteness",
    "low": "plausibleValueLow",
    "high": "plausibleValueHigh",
    "sbe": "plausibleStartBeforeEnd",
    "birth": "plausibleAfterBirth",
    "death": "plausibleBeforeDeath",
    "visit": "withinVisitDates",
}

# Table level (DQD Table_Level): measurePersonCompleteness thresholds, and observation period overlap.
TABLE_CHECKS: dict[str, str] = {
    "observation_period": "measurePersonCompleteness@0 measureObservationPeriodOverlap@0",
    "visit_occurrence": "measurePersonCompleteness@95",
    "condition_occurrence": "measurePersonCompleteness@95",
    "drug_exposure": "measurePersonCompleteness@95",
    "procedure_occurrence": "measurePersonCompleteness@95",
    "measurement": "measurePersonCompleteness@95",
    "death": "measurePersonCompleteness@100",
}

_CATEGORY = {
    "cdmTable": "Conformance",
    "cdmField": "Conformance",
    "cdmDatatype": "Conformance",
    "isRequired": "Conformance",
    "isPrimaryKey": "Conformance",
    "isForeignKey": "Conformance",
    "measureValueCompleteness": "Completeness",
    "standardConceptRecordCompleteness": "Completeness",
    "sourceConceptRecordCompleteness": "Completeness",
    "sourceValueCompleteness": "Completeness",
    "measurePersonCompleteness": "Completeness",
}
# DQD's plausibleBeforeDeath allows events up to 60 days after death (administrative lag).
_DEATH_GRACE_DAYS = 60
_VISIT_WINDOW_DAYS = 7


class CheckResult(BaseModel):
    check: str
    level: Literal["TABLE", "FIELD"]
    category: str
    table: str
    field: str | None = None
    parameter: str | None = None
    violated: int = 0
    denominator: int = 0
    pct: float = 0.0
    threshold: float = 0.0
    status: Literal["pass", "fail", "not_applicable"] = "pass"
    note: str = ""


class DatasetStatistics(BaseModel):
    """Key figures for a catalog entry; no record-level data."""

    persons: int
    rows: dict[str, int]
    first_date: date | None
    last_date: date | None
    code_systems: dict[str, dict[str, int]] = Field(description="table -> vocabulary -> rows")
    female_share: float | None


class QualityReport(BaseModel):
    dataset_id: str
    checked_at: str
    checks: list[CheckResult]
    passed: int
    failed: int
    not_applicable: int
    score: float = Field(description="passed / (passed + failed), in [0, 1]")
    seconds: float
    statistics: DatasetStatistics

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "fail"]


def _parse(spec: str) -> list[tuple[str, str | None, float]]:
    out = []
    for item in spec.split():
        head, _, thr = item.rpartition("@")
        name, _, param = head.partition("=")
        out.append((CHECK_NAMES.get(name, name), param or None, float(thr)))
    return out


def _bound(param: str, today: date) -> str:
    if param == "tomorrow":
        return f"DATE '{(today + timedelta(days=1)).isoformat()}'"
    if param == "nextyear":
        return str(today.year + 1)
    if len(param) == 10 and param[4] == "-":
        return f"DATE '{param}'"
    return str(float(param))


def _fields(table: str) -> dict[str, list[tuple[str, str | None, float]]]:
    prefix = table + "."
    return {k[len(prefix) :]: _parse(v) for k, v in FIELD_CHECKS.items() if k.startswith(prefix)}


class _Builder:
    """Collects aggregate expressions for one table (each distinct one computed once) and their checks."""

    def __init__(self) -> None:
        self.exprs: list[str] = []
        self._index: dict[str, int] = {}
        self.meta: list[tuple[CheckResult, int, int]] = []  # check, index of numerator, of denominator

    def agg(self, expr: str) -> int:
        if expr not in self._index:
            self._index[expr] = len(self.exprs)
            self.exprs.append(expr)
        return self._index[expr]

    def add(self, check: CheckResult, num: str, den: str) -> None:
        self.meta.append((check, self.agg(num), self.agg(den)))


_TS = "TIMESTAMP WITH TIME ZONE"


def _table_query(table: str, types: dict[str, str], today: date) -> tuple[str, _Builder, list[CheckResult]]:
    """One aggregate query for all field checks of `table`.

    Comparisons are made in each column's own type (dates with dates, UTC timestamps with timestamps
    derived once per person or visit in the joined subqueries) so that no per-row cast is needed.
    """
    b = _Builder()
    na: list[CheckResult] = []
    n_all = "count(*)"
    has_person = "person_id" in types and table != "person"
    has_visit = "visit_occurrence_id" in types and table != "visit_occurrence"
    for field, checks in _fields(table).items():
        f = f"t.{field}"
        sfx = "_ts" if types.get(field) == _TS else ""
        for name, param, thr in checks:
            c = CheckResult(
                check=name,
                level="FIELD",
                category=_CATEGORY.get(name, "Plausibility"),
                table=table,
                field=field,
                parameter=param,
                threshold=thr,
            )
            if name in ("cdmDatatype", "isPrimaryKey"):
                continue  # answered from the schema / by one UNION ALL query over all tables
            if name in ("isRequired", "measureValueCompleteness"):
                b.add(c, f"count(*) - count({f})", n_all)
            elif name in ("standardConceptRecordCompleteness", "sourceConceptRecordCompleteness"):
                b.add(c, f"count(*) FILTER (WHERE {f} = 0)", n_all)
            elif name == "sourceValueCompleteness" and param:
                b.add(c, f"count(DISTINCT {f}) FILTER (WHERE t.{param} = 0)", f"count(DISTINCT {f})")
            elif name == "isForeignKey" and param == "person" and table != "person":
                b.add(c, f"count({f}) - count(p.person_id)", n_all)
            elif name == "isForeignKey" and param == "visit_occurrence" and has_visit:
                b.add(c, f"count({f}) - count(v.visit_occurrence_id)", n_all)
            elif name == "isForeignKey":
                c.status, c.note = "not_applicable", f"{param} table is not held (no vocabulary or registry)"
                na.append(c)
            elif name in ("plausibleValueLow", "plausibleValueHigh") and param:
                op = "<" if name == "plausibleValueLow" else ">"
                bound = _bound(param, today)
                if sfx and bound.startswith("DATE"):
                    bound = f"TIMESTAMPTZ '{bound[6:16]} 00:00:00+00'"
                b.add(c, f"count(*) FILTER (WHERE {f} {op} {bound})", f"count({f})")
            elif name == "plausibleStartBeforeEnd" and param:
                e = f"t.{param}"
                b.add(
                    c,
                    f"count(*) FILTER (WHERE {f} > {e})",
                    f"count(*) FILTER (WHERE {f} IS NOT NULL AND {e} IS NOT NULL)",
                )
            elif name == "plausibleAfterBirth" and has_person:
                b.add(
                    c,
                    f"count(*) FILTER (WHERE {f} < p.birth{sfx})",
                    f"count(*) FILTER (WHERE {f} IS NOT NULL AND p.birth IS NOT NULL)",
                )
            elif name == "plausibleBeforeDeath" and has_person:
                b.add(
                    c,
                    f"count(*) FILTER (WHERE {f} > d.latest{sfx})",
                    f"count(*) FILTER (WHERE {f} IS NOT NULL AND d.latest IS NOT NULL)",
                )
            elif name == "withinVisitDates" and has_visit:
                b.add(
                    c,
                    f"count(*) FILTER (WHERE {f} < v.lo{sfx} OR {f} > v.hi{sfx})",
                    f"count(*) FILTER (WHERE v.visit_occurrence_id IS NOT NULL AND {f} IS NOT NULL)",
                )
            else:
                c.status, c.note = "not_applicable", "needs a table this store does not hold"
                na.append(c)
    joins = ""
    w, grace = _VISIT_WINDOW_DAYS, _DEATH_GRACE_DAYS
    if has_person:
        joins += (
            " LEFT JOIN (SELECT person_id, birth, CAST(birth AS TIMESTAMPTZ) AS birth_ts FROM ("  # noqa: S608
            "SELECT person_id, min(coalesce(CAST(birth_datetime AS DATE), make_date("
            "CAST(year_of_birth AS BIGINT), CAST(coalesce(month_of_birth, 1) AS BIGINT), "
            "CAST(coalesce(day_of_birth, 1) AS BIGINT)))) AS birth FROM person GROUP BY person_id)) p "
            "ON p.person_id = t.person_id"
            f" LEFT JOIN (SELECT person_id, min(death_date) + {grace} AS latest, "
            f"CAST(min(death_date) + {grace} + 1 AS TIMESTAMPTZ) AS latest_ts "
            "FROM death GROUP BY person_id) d"
            " ON d.person_id = t.person_id"
        )
    if has_visit:
        joins += (
            f" LEFT JOIN (SELECT visit_occurrence_id, min(visit_start_date) - {w} AS lo, "  # noqa: S608
            f"max(visit_end_date) + {w} AS hi, CAST(min(visit_start_date) - {w} AS TIMESTAMPTZ) AS lo_ts, "
            f"CAST(max(visit_end_date) + {w} + 1 AS TIMESTAMPTZ) AS hi_ts "
            "FROM visit_occurrence GROUP BY visit_occurrence_id) v "
            "ON v.visit_occurrence_id = t.visit_occurrence_id"
        )
    sql = f"SELECT {', '.join(b.exprs) or '0'} FROM {table} t{joins}"  # noqa: S608
    return sql, b, na


def _finish(c: CheckResult, violated: int, denominator: int) -> CheckResult:
    c.violated, c.denominator = int(violated), int(denominator)
    if c.denominator == 0 and c.check not in ("cdmTable", "cdmField", "cdmDatatype"):
        c.status, c.note = "not_applicable", "no records to check"
        return c
    c.pct = 100.0 * c.violated / c.denominator if c.denominator else 0.0
    c.status = "pass" if c.pct <= c.threshold else "fail"
    return c


def run_quality(store: ClinicalStore, *, today: date | None = None) -> QualityReport:
    """Run every applicable check on the committed data of `store`."""
    started = utcnow()
    today = today or started.date()
    con = store.connect()
    results: list[CheckResult] = []
    pk_parts: list[tuple[CheckResult, str]] = []
    for table, spec in CDM_TABLES.items():
        described = con.execute(f"DESCRIBE SELECT * FROM {table}").fetchall()  # noqa: S608
        types = {str(r[0]): str(r[1]) for r in described}
        results.append(
            _finish(
                CheckResult(
                    check="cdmTable", level="TABLE", category="Conformance", table=table, threshold=0
                ),
                0,
                1,
            )
        )
        expected = {c.name for c in spec.columns}
        for field, checks in _fields(table).items():
            results.append(
                _finish(
                    CheckResult(
                        check="cdmField",
                        level="FIELD",
                        category="Conformance",
                        table=table,
                        field=field,
                        threshold=0,
                    ),
                    0 if field in types and field in expected else 1,
                    1,
                )
            )
            for name, _, thr in checks:
                if name == "cdmDatatype":
                    c = CheckResult(
                        check=name,
                        level="FIELD",
                        category="Conformance",
                        table=table,
                        field=field,
                        threshold=thr,
                    )
                    results.append(_finish(c, 0 if types.get(field) == "BIGINT" else 1, 1))
                elif name == "isPrimaryKey":
                    c = CheckResult(
                        check=name,
                        level="FIELD",
                        category="Conformance",
                        table=table,
                        field=field,
                        threshold=thr,
                    )
                    pk_parts.append(
                        (
                            c,
                            f"SELECT (SELECT coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM {table} "  # noqa: S608
                            f"GROUP BY {field} HAVING count(*) > 1)), (SELECT count(*) FROM {table})",
                        )
                    )
        sql, b, na = _table_query(table, types, today)
        results.extend(na)
        if b.meta:
            row = con.execute(sql).fetchone()
            if row is None:
                raise RuntimeError(f"quality query on {table} returned nothing")
            for c, ni, di in b.meta:
                results.append(_finish(c, row[ni], row[di]))
    if pk_parts:
        rows = con.execute(
            " UNION ALL ".join(f"SELECT {i} AS i, * FROM ({q})" for i, (_, q) in enumerate(pk_parts))  # noqa: S608
        ).fetchall()
        for i, v, d in sorted(rows):
            results.append(_finish(pk_parts[i][0], v, d))
    results.extend(_table_checks(store))
    passed = sum(c.status == "pass" for c in results)
    failed = sum(c.status == "fail" for c in results)
    return QualityReport(
        dataset_id=store.dataset_id,
        checked_at=started.isoformat(),
        checks=results,
        passed=passed,
        failed=failed,
        not_applicable=len(results) - passed - failed,
        score=passed / (passed + failed) if passed + failed else 0.0,
        seconds=(utcnow() - started).total_seconds(),
        statistics=dataset_statistics(store),
    )


def _table_checks(store: ClinicalStore) -> list[CheckResult]:
    con = store.connect()
    out: list[CheckResult] = []
    parts: list[tuple[CheckResult, str]] = []
    for table, spec in TABLE_CHECKS.items():
        for name, _, thr in _parse(spec):
            c = CheckResult(
                check=name,
                level="TABLE",
                category=_CATEGORY.get(name, "Plausibility"),
                table=table,
                threshold=thr,
            )
            if name == "measurePersonCompleteness":
                q = (
                    "SELECT count(*) FILTER (WHERE person_id NOT IN "  # noqa: S608
                    f"(SELECT person_id FROM {table})), count(*) "
                    "FROM person"
                )
            else:
                q = (
                    "SELECT count(DISTINCT a.person_id), "
                    "(SELECT count(DISTINCT person_id) FROM observation_period) "
                    "FROM observation_period a JOIN observation_period b ON a.person_id = b.person_id "
                    "AND a.observation_period_id <> b.observation_period_id "
                    "AND a.observation_period_start_date <= b.observation_period_end_date + 1 "
                    "AND b.observation_period_start_date <= a.observation_period_end_date + 1"
                )
            parts.append((c, q))
    rows = con.execute(
        " UNION ALL ".join(f"SELECT {i} AS i, * FROM ({q})" for i, (_, q) in enumerate(parts))  # noqa: S608
    ).fetchall()
    for i, v, d in sorted(rows):
        out.append(_finish(parts[i][0], v, d))
    return out


def dataset_statistics(store: ClinicalStore) -> DatasetStatistics:
    """Population size, time coverage and the code systems present, for the federated catalog."""
    con = store.connect()
    rows = store.row_counts()
    first, last = con.execute(
        "SELECT min(observation_period_start_date), max(observation_period_end_date) FROM observation_period"
    ).fetchone() or (None, None)
    systems: dict[str, dict[str, int]] = {}
    vocab_tables = [t for t, s in CDM_TABLES.items() if "hs_source_vocabulary" in s.names]
    q = " UNION ALL ".join(
        f"SELECT '{t}' AS t, coalesce(hs_source_vocabulary, '(none)') AS v, count(*) AS n FROM {t} GROUP BY 2"  # noqa: S608
        for t in vocab_tables
    )
    for t, v, n in con.execute(q).fetchall():
        systems.setdefault(t, {})[v] = int(n)
    (female,) = con.execute(
        "SELECT avg(CASE WHEN gender_concept_id = 8532 THEN 1.0 ELSE 0.0 END) FROM person"
    ).fetchone() or (None,)
    return DatasetStatistics(
        persons=rows["person"],
        rows=rows,
        first_date=first,
        last_date=last,
        code_systems=systems,
        female_share=float(female) if female is not None else None,
    )
