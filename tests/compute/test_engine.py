"""Results of run_job on DuckDB equal the ground truth computed independently in pandas (no noise, k = 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from healthspace.compute import DisclosureRules, DuckDBEngine, JobContext, JobResult, parse_spec, run_job
from healthspace.consent.filter import ConsentFilter
from tests.compute.conftest import omop
from tests.compute.truth import cohort, follow_up

OPEN = DisclosureRules(min_cell_size=1)
T2D = {
    "inclusion": [{"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}]
}


def run(
    engine: DuckDBEngine,
    consent: ConsentFilter,
    analyses: list[dict[str, Any]],
    cohort_: dict[str, Any] = T2D,
) -> JobResult:
    spec = parse_spec({"version": 1, "cohort": cohort_, "analyses": analyses})
    return run_job(spec, engine, consent, OPEN, JobContext("job", "consumer", "scn", "gz"))


@pytest.fixture(scope="module")
def truth(synth_dirs: dict[str, Path]) -> pd.DataFrame:
    return cohort(synth_dirs["gz"], "E11")


def test_count_equals_ground_truth(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, truth: pd.DataFrame
) -> None:
    r = run(gz_engine, gz_consent, [{"type": "count", "id": "n"}])
    assert r.analyses["n"]["count"] == len(truth) > 100


def test_consent_filter_excludes_non_consenting(
    gz_engine: DuckDBEngine, synth_dirs: dict[str, Path], truth: pd.DataFrame
) -> None:
    everyone = ConsentFilter.of(
        "x",
        pd.Timestamp("2026-01-01", tz="UTC").to_pydatetime(),
        frozenset(),
        sorted(omop(synth_dirs["gz"], "person").person_id),
    )
    r = run(gz_engine, everyone, [{"type": "count", "id": "n"}])
    cond = omop(synth_dirs["gz"], "condition_occurrence")
    assert (
        r.analyses["n"]["count"]
        == cond[cond.condition_source_value.str.startswith("E11")].person_id.nunique()
    )
    assert r.analyses["n"]["count"] > len(truth)


def test_cross_tab_equals_ground_truth(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, truth: pd.DataFrame
) -> None:
    by = [{"var": "sex"}, {"var": "age_group", "breaks": [18, 50, 70, 95]}]
    r = run(gz_engine, gz_consent, [{"type": "stratified_count", "id": "t", "by": by}]).analyses["t"]
    band = pd.cut(truth.age, [18, 50, 70, 95], right=False, labels=["18-50", "50-70", "70-95"])
    expected = pd.crosstab(truth.sex, band)
    for i, sex in enumerate(["female", "male"]):
        assert r["counts"][i][:3] == [int(expected.loc[sex, b]) for b in ["18-50", "50-70", "70-95"]]
    assert r["row_totals"][:2] == [int((truth.sex == s).sum()) for s in ["female", "male"]]
    assert r["total"] == len(truth)


def test_flag_stratifier_counts_condition_holders(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, synth_dirs: dict[str, Path], truth: pd.DataFrame
) -> None:
    flag = {
        "var": "flag",
        "name": "ckd",
        "criterion": {"type": "event", "event": {"domain": "condition", "codes": ["N18"], "match": "prefix"}},
    }
    r = run(gz_engine, gz_consent, [{"type": "stratified_count", "id": "t", "by": [flag]}]).analyses["t"]
    cond = omop(synth_dirs["gz"], "condition_occurrence")
    ckd = set(cond.loc[cond.condition_source_value.str.startswith("N18"), "person_id"])
    yes = int(truth.person_id.isin(ckd).sum())
    assert r["counts"] == [len(truth) - yes, yes]


def test_measurement_summary_equals_ground_truth(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, synth_dirs: dict[str, Path], truth: pd.DataFrame
) -> None:
    a = {
        "type": "measurement_summary",
        "id": "h",
        "code": "4548-4",
        "window": {"from_days": 0, "to_days": 0},
        "quantiles": [0.1, 0.5, 0.9],
    }
    r = run(gz_engine, gz_consent, [a]).analyses["h"]
    m = omop(synth_dirs["gz"], "measurement")
    m = m[m.measurement_source_value == "4548-4"].merge(truth, on="person_id")
    m = m[pd.to_datetime(m.measurement_date) == m["index"]].sort_values(
        ["person_id", "measurement_date", "measurement_id"]
    )
    v = m.groupby("person_id").value_as_number.first()
    assert r["n"] == len(v)
    assert r["mean"] == pytest.approx(v.mean(), rel=1e-12)
    assert r["variance"] == pytest.approx(v.var(ddof=1), rel=1e-9)
    assert r["values"] == pytest.approx(list(np.quantile(v, [0.1, 0.5, 0.9])), rel=1e-12)


def test_incidence_rate_equals_ground_truth(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, synth_dirs: dict[str, Path], truth: pd.DataFrame
) -> None:
    r = run(
        gz_engine, gz_consent, [{"type": "incidence_rate", "id": "d", "outcome": {"domain": "death"}}]
    ).analyses["d"]
    fu = follow_up(synth_dirs["gz"], truth)
    assert (r["persons"], r["events"]) == (len(fu), int(fu.ev.sum()))
    assert r["rate_per_1000_py"] == pytest.approx(1000 * fu.ev.sum() / (fu.t.sum() / 365.25), rel=1e-12)


def test_kaplan_meier_equals_life_table(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, synth_dirs: dict[str, Path], truth: pd.DataFrame
) -> None:
    a = {
        "type": "kaplan_meier",
        "id": "km",
        "outcome": {"domain": "death"},
        "interval_days": 365,
        "horizon_days": 730,
    }
    r = run(gz_engine, gz_consent, [a]).analyses["km"]
    fu = follow_up(synth_dirs["gz"], truth)
    at_risk, s = len(fu), 1.0
    for row, lo in zip(r["intervals"], [0, 365], strict=True):
        inside = fu[(fu.t >= lo) & (fu.t < lo + 365)]
        d = int(inside.ev.sum())
        s *= 1 - d / at_risk
        assert (row["at_risk"], row["events"], row["survival"]) == (at_risk, d, pytest.approx(s, rel=1e-12))
        at_risk -= len(inside)


def test_exclusion_and_age_criteria_narrow_the_cohort(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, synth_dirs: dict[str, Path], truth: pd.DataFrame
) -> None:
    c = dict(T2D)
    c["inclusion"] = [*T2D["inclusion"], {"type": "age", "min_years": 60}, {"type": "sex", "sex": "female"}]
    c["exclusion"] = [{"type": "event", "event": {"domain": "condition", "codes": ["I25.1"]}}]
    r = run(gz_engine, gz_consent, [{"type": "count", "id": "n"}], c)
    cond = omop(synth_dirs["gz"], "condition_occurrence")
    ihd = set(cond.loc[cond.condition_source_value == "I25.1", "person_id"])
    exp = truth[(truth.age >= 60) & (truth.sex == "female") & ~truth.person_id.isin(ihd)]
    assert r.analyses["n"]["count"] == len(exp)


def test_index_on_first_drug_and_window(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, synth_dirs: dict[str, Path]
) -> None:
    c = {
        "index": {"kind": "first_event", "event": {"domain": "drug", "codes": ["A10BA02"]}},
        "inclusion": [
            {
                "type": "event",
                "event": {"domain": "measurement", "codes": ["4548-4"], "value_min": 8.0},
                "window": {"from_days": -30, "to_days": 30},
            }
        ],
    }
    r = run(gz_engine, gz_consent, [{"type": "count", "id": "n"}], c)
    d = omop(synth_dirs["gz"], "drug_exposure")
    d = d[(d.drug_source_value == "A10BA02") & d.person_id.isin(gz_consent.person_ids.to_pylist())]
    first = pd.to_datetime(d.groupby("person_id").drug_exposure_start_date.min()).rename("idx").reset_index()
    m = omop(synth_dirs["gz"], "measurement")
    m = m[(m.measurement_source_value == "4548-4") & (m.value_as_number >= 8.0)].merge(first, on="person_id")
    gap = (pd.to_datetime(m.measurement_date) - m.idx).dt.days
    assert r.analyses["n"]["count"] == m[(gap >= -30) & (gap <= 30)].person_id.nunique() > 0


def test_result_json_is_canonical(gz_engine: DuckDBEngine, gz_consent: ConsentFilter) -> None:
    r = run(gz_engine, gz_consent, [{"type": "count", "id": "n"}])
    text = r.to_json()
    assert text.startswith(b'{"analyses":')
    assert text == run(gz_engine, gz_consent, [{"type": "count", "id": "n"}]).to_json()
