"""Measurement histogram cost: the demo's HbA1c band x sex x age histogram job (with DP) against the
stratified count of the same cohort by sex x age (the existing DP table) and a hand-written DuckDB query.

One synthetic hospital (quick: 2,000 patients; full: 20,000), its OMOP Parquet files attached to
DuckDB. Both jobs run the whole pipeline (spec parsing, SQL compilation, consent join, cohort
materialisation, noise, suppression); the histogram adds the first-value window query and a grid
seven times larger. The raw baseline is the same histogram written by hand in SQL, without consent,
noise or disclosure control.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from healthspace.bench.harness import Figure, seconds
from healthspace.bench.suites.compute import consenting_ids
from healthspace.compute import DisclosureRules, DuckDBEngine, JobContext, attach_parquet, parse_spec, run_job
from healthspace.consent.filter import ConsentFilter
from healthspace.synth.generate import generate

__all__ = ["run"]

_AGE = {"var": "age_group", "breaks": [18, 45, 65, 120]}
_COHORT: dict[str, Any] = {
    "index": {"kind": "first_event", "event": {"domain": "measurement", "codes": ["4548-4"]}},
    "inclusion": [{"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}],
}
_HISTOGRAM: dict[str, Any] = {
    "version": 1,
    "cohort": _COHORT,
    "analyses": [
        {
            "type": "measurement_histogram",
            "id": "h",
            "code": "4548-4",
            "window": {"from_days": 0, "to_days": 0},
            "bands": [4.0, 6.5, 7.0, 8.0, 9.0, 10.0, 15.0],
            "by": [{"var": "sex"}, _AGE],
        }
    ],
    "privacy": {"epsilon": 0.5},
}
_STRATIFIED: dict[str, Any] = {
    "version": 1,
    "cohort": _COHORT,
    "analyses": [{"type": "stratified_count", "id": "t", "by": [{"var": "sex"}, _AGE]}],
    "privacy": {"epsilon": 0.5},
}
# The same histogram by hand: first HbA1c per T2D person, its band, sex and age band, counted.
_RAW = """
WITH first AS (
  SELECT person_id, measurement_date AS d, value_as_number AS v,
         ROW_NUMBER() OVER (PARTITION BY person_id ORDER BY measurement_date, measurement_id) AS rn
  FROM measurement WHERE measurement_source_value = '4548-4' AND value_as_number IS NOT NULL),
t2d AS (
  SELECT f.v, p.gender_concept_id AS sex,
         date_diff('day', make_date(p.year_of_birth, p.month_of_birth, p.day_of_birth), f.d) / 365.25 AS age
  FROM first f JOIN person p USING (person_id)
  WHERE f.rn = 1 AND f.person_id IN (
    SELECT person_id FROM condition_occurrence WHERE condition_source_value LIKE 'E11%'))
SELECT CASE WHEN v < 4 OR v >= 15 THEN 'other' WHEN v < 6.5 THEN 'a' WHEN v < 7 THEN 'b' WHEN v < 8 THEN 'c'
            WHEN v < 9 THEN 'd' WHEN v < 10 THEN 'e' ELSE 'f' END AS band,
       sex, CASE WHEN age < 45 THEN 1 WHEN age < 65 THEN 2 ELSE 3 END AS age_band, COUNT(*)
FROM t2d GROUP BY ALL
"""


def run(quick: bool) -> list[Figure]:
    repeat = 5 if quick else 9
    patients = 2_000 if quick else 20_000
    with tempfile.TemporaryDirectory() as tmp:
        omop = generate("gz", patients, 1, Path(tmp) / "gz", progress=False).out / "omop"
        con = duckdb.connect()
        attach_parquet(con, omop)
        ids = consenting_ids(con, omop)
        consent = ConsentFilter.of("diabetes-outcomes-research", datetime.now(UTC), frozenset(), ids)
        engine = DuckDBEngine(con)
        rules = DisclosureRules()
        ctx = JobContext("bench", "c", "s", "gz")
        histogram, stratified = parse_spec(_HISTOGRAM), parse_spec(_STRATIFIED)
        # Interleaved so that load on the shared machine hits the three alike.
        hist_s: list[float] = []
        strat_s: list[float] = []
        raw_s: list[float] = []
        for _ in range(repeat):
            hist_s += seconds(lambda: run_job(histogram, engine, consent, rules, ctx), repeat=1)
            strat_s += seconds(lambda: run_job(stratified, engine, consent, rules, ctx), repeat=1)
            raw_s += seconds(lambda: con.execute(_RAW).fetchall(), repeat=1)
        con.close()
    note = f"{patients:,} patients (gz), {len(ids):,} consenting; T2D cohort indexed on the first HbA1c"
    return [
        Figure(
            "histogram job (DP, 7 bands x sex x age)",
            "s",
            hist_s,
            "lower",
            "stratified_count job (DP, sex x age)",
            strat_s,
            note=note,
        ),
        Figure(
            "histogram job (DP, 7 bands x sex x age)",
            "s",
            hist_s,
            "lower",
            "hand-written DuckDB histogram (no consent, noise or suppression)",
            raw_s,
            note=note,
        ),
    ]
