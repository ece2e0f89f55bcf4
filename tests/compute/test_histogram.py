"""measurement_histogram: persons by value band x strata, equal to pandas ground truth on DuckDB and
PostgreSQL, with a DP release under a budget, suppression without one, refused where not allowed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from healthspace.compute import (
    DifferencingGuard,
    DisclosureRules,
    DuckDBEngine,
    JobContext,
    JobResult,
    MemoryCohortHistory,
    PostgresEngine,
    parse_spec,
    run_job,
)
from healthspace.compute.disclosure import Grid
from healthspace.compute.sql import SqlBuilder
from healthspace.connector.dataplane.terms import data_classes_of
from healthspace.consent.filter import ConsentFilter
from healthspace.core.errors import ForbiddenError, ValidationError
from healthspace.lab.study import SiteOutcome, combine
from healthspace.synth.generate import generate
from tests.compute.conftest import consent_filter, duckdb_and_postgres, omop
from tests.compute.test_disclosure import determined
from tests.compute.truth import cohort
from tests.support.dp import laplace_noise_bound

OPEN = DisclosureRules(min_cell_size=1)
T2D = {
    "inclusion": [{"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}]
}
BANDS = [5.0, 6.5, 7.0, 8.0, 9.0, 10.0]
AGE = [18, 45, 65, 95]
HIST: dict[str, Any] = {
    "type": "measurement_histogram",
    "id": "h",
    "code": "4548-4",
    "window": {"from_days": 0, "to_days": 0},
    "bands": BANDS,
    "by": [{"var": "sex"}, {"var": "age_group", "breaks": AGE}],
}
BAND_LABELS = ["5-6.5", "6.5-7", "7-8", "8-9", "9-10", "other"]
AGE_LABELS = ["18-45", "45-65", "65-95", "other"]


def spec(analyses: list[dict[str, Any]], **over: Any) -> Any:
    return parse_spec({"version": 1, "cohort": T2D, "analyses": analyses, **over})


def run(engine: Any, consent: ConsentFilter, analyses: list[dict[str, Any]], **kw: Any) -> JobResult:
    rules = kw.pop("rules", OPEN)
    return run_job(spec(analyses, **kw), engine, consent, rules, JobContext("job", "c", "s", "gz"))


def truth_table(site_dir: Path) -> pd.DataFrame:
    """Consenting T2D persons with their index-visit HbA1c (first by date, then measurement id) and bands,
    computed in pandas from the synth Parquet files."""
    c = cohort(site_dir, "E11")
    m = omop(site_dir, "measurement")
    m = m[(m.measurement_source_value == "4548-4") & m.value_as_number.notna()].merge(c, on="person_id")
    m = m[pd.to_datetime(m.measurement_date) == m["index"]]
    m = m.sort_values(["person_id", "measurement_date", "measurement_id"]).groupby("person_id").first()
    v = m.value_as_number
    band = pd.cut(v, BANDS, right=False, labels=BAND_LABELS[:-1]).astype(object).fillna("other")
    age = pd.cut(m.age, AGE, right=False, labels=AGE_LABELS[:-1]).astype(object).fillna("other")
    return pd.DataFrame({"band": band, "sex": m.sex, "age": age})


def expected_cells(t: pd.DataFrame) -> list[list[list[int]]]:
    sexes = ["female", "male", "other"]
    return [
        [[int(((t.band == b) & (t.sex == s) & (t.age == a)).sum()) for a in AGE_LABELS] for s in sexes]
        for b in BAND_LABELS
    ]


@pytest.fixture(scope="module")
def truth(synth_dirs: dict[str, Path]) -> pd.DataFrame:
    return truth_table(synth_dirs["gz"])


# --- the spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bands", "needle"),
    [
        ([5.0, 5.0, 6.0], "strictly increasing"),
        ([7.0, 6.0], "strictly increasing"),
        ([6.5], "at least 2"),
        ([5.0, float("inf")], "finite number"),
        ([5.0, float("nan")], "finite number"),
        (["high", 7.0], "valid number"),
    ],
)
def test_bad_bands_are_refused_with_their_pointer(bands: list[Any], needle: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec([{**HIST, "bands": bands}])
    problems = exc.value.extra["problems"]
    assert any(p["pointer"].startswith("/analyses/0/measurement_histogram/bands") for p in problems)
    assert needle in str(exc.value.detail)


def test_three_stratifiers_are_refused() -> None:
    with pytest.raises(ValidationError, match="at most 2"):
        spec([{**HIST, "by": [{"var": "sex"}, {"var": "sex"}, {"var": "sex"}]}])


def test_band_edges_and_code_are_bound_never_pasted_into_sql() -> None:
    a = spec([{**HIST, "bands": [5.123, 6.987]}]).analyses[0]
    q = SqlBuilder("duckdb").histogram(a)
    assert "5.123" not in q.sql
    assert "6.987" not in q.sql
    assert "4548-4" not in q.sql
    assert {5.123, 6.987, "4548-4", "5.123-6.987", "other"} <= set(q.params.values())


def test_a_histogram_reads_the_laboratory_consent_class() -> None:
    assert "laboratory" in data_classes_of(spec([HIST]))


# --- results equal ground truth --------------------------------------------------------------------


def test_cross_tab_by_band_sex_and_age_equals_ground_truth(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, truth: pd.DataFrame
) -> None:
    r = run(gz_engine, gz_consent, [HIST]).analyses["h"]
    assert (r["bands"], r["dims"], r["levels"]) == (
        BAND_LABELS,
        ["sex", "age_group"],
        [["female", "male", "other"], AGE_LABELS],
    )
    cells = expected_cells(truth)
    assert r["counts"] == cells
    assert r["band_totals"] == [int((truth.band == b).sum()) for b in BAND_LABELS]
    female = truth[truth.sex == "female"]
    assert r["stratum_totals"][0] == [int((female.age == a).sum()) for a in AGE_LABELS]
    assert r["total"] == len(truth) > 500
    # Both tails are populated in this population, so 'other' is tested too.
    assert r["band_totals"][-1] > 0
    assert r["band_totals"][0] > 0


def test_one_way_histogram_without_strata_equals_ground_truth(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, truth: pd.DataFrame
) -> None:
    r = run(gz_engine, gz_consent, [{**HIST, "by": []}]).analyses["h"]
    assert r["counts"] == [int((truth.band == b).sum()) for b in BAND_LABELS]
    assert r["total"] == len(truth)
    assert "band_totals" not in r


def test_histogram_without_consent_filter_counts_more(
    gz_engine: DuckDBEngine, synth_dirs: dict[str, Path], truth: pd.DataFrame
) -> None:
    everyone = ConsentFilter.of(
        "x",
        pd.Timestamp("2026-01-01", tz="UTC").to_pydatetime(),
        frozenset(),
        sorted(omop(synth_dirs["gz"], "person").person_id),
    )
    r = run(gz_engine, everyone, [HIST]).analyses["h"]
    assert r["total"] > len(truth)


# --- disclosure control ------------------------------------------------------------------------------


def test_without_dp_small_cells_are_suppressed_and_none_can_be_recovered(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, truth: pd.DataFrame
) -> None:
    r = run(gz_engine, gz_consent, [HIST], rules=DisclosureRules(min_cell_size=10)).analyses["h"]
    cells = expected_cells(truth)
    flat_r = [v for band in r["counts"] for row in band for v in row]
    flat_t = [v for band in cells for row in band for v in row]
    assert any(v is None for v in flat_r)
    # Published cells are exact; every truly small cell is hidden.
    assert all(p is None or p == t for p, t in zip(flat_r, flat_t, strict=True))
    assert all(p is None for p, t in zip(flat_r, flat_t, strict=True) if 0 < t < 10)
    # Rebuild the published grid (bands x strata with margins) and check nothing hidden is determined.
    rows = [list(chain.from_iterable(band)) for band in r["counts"]]
    grid = Grid([[v if v is not None else -1 for v in row] for row in rows])
    cols = len(grid.cells[0])
    for i, row in enumerate(rows):
        grid.hidden |= {(i, j) for j, v in enumerate(row) if v is None}
    grid.hidden |= {(i, cols) for i, v in enumerate(r["band_totals"]) if v is None}
    strata = chain.from_iterable(r["stratum_totals"])
    grid.hidden |= {(len(rows), j) for j, v in enumerate(strata) if v is None}
    assert determined(grid) == []


def test_dp_release_is_within_the_noise_bound_of_the_truth(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, truth: pd.DataFrame
) -> None:
    eps = 2.0  # the whole job's ε; one DP release, so each cell gets discrete Laplace of scale 1/2
    result = run(
        gz_engine,
        gz_consent,
        [HIST],
        privacy={"epsilon": eps},
        rules=DisclosureRules(min_cell_size=10),
    )
    r = result.analyses["h"]
    bound = laplace_noise_bound(eps)  # P(|noise| > bound) < 1e-9 per cell
    noisy_cells = 0
    for got_band, want_band in zip(r["counts"], expected_cells(truth), strict=True):
        for got_row, want_row in zip(got_band, want_band, strict=True):
            for got, want in zip(got_row, want_row, strict=True):
                if got is None:  # suppressed: the noisy value was in 1..9
                    assert want <= 9 + bound
                else:
                    assert abs(got - want) <= bound
                    noisy_cells += got != want
    assert noisy_cells > 0  # noise was added
    # Margins sum the cells' unclamped noise: 12 strata per band, 6 x 12 = 72 cells in the total.
    band_bound = laplace_noise_bound(eps, terms=12)
    for got, want in zip(r["band_totals"], [int((truth.band == b).sum()) for b in BAND_LABELS], strict=True):
        assert want <= 9 + band_bound if got is None else abs(got - want) <= band_bound
    assert abs(r["total"] - len(truth)) <= laplace_noise_bound(eps, terms=72)
    assert result.disclosure["dp"] == {"mechanism": "laplace", "epsilon": eps, "delta": 0.0}


def test_dp_stratified_count_margins_are_unbiased_with_many_empty_cells(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter
) -> None:
    # Sex x age bands of two years up to 18: most cells are empty (adults only). A margin summing
    # cells clamped at 0 would gain E[max(0, X)] ~ 0.96 per empty cell at ε 0.5 (about +30 on the
    # total here); summing the unclamped noise, its error averages 0.
    by = [{"var": "sex"}, {"var": "age_group", "breaks": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 130]}]
    table = [{"type": "stratified_count", "id": "t", "by": by}]
    exact = run(gz_engine, gz_consent, table).analyses["t"]
    cells = len(exact["row_totals"]) * len(exact["col_totals"])
    assert sum(v == 0 for row in exact["counts"] for v in row) > cells // 2
    eps, runs = 0.5, 60
    errors = [
        run(gz_engine, gz_consent, table, privacy={"epsilon": eps}).analyses["t"]["total"] - exact["total"]
        for _ in range(runs)
    ]
    a = math.exp(-eps)
    sd_of_mean = math.sqrt(cells * 2 * a / (1 - a) ** 2 / runs)  # discrete Laplace variance, per cell
    assert abs(statistics.fmean(errors)) < 5 * sd_of_mean, (statistics.fmean(errors), sd_of_mean)


def test_dp_splits_epsilon_over_the_histogram_and_the_counts(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter
) -> None:
    analyses = [{"type": "count", "id": "n"}, HIST]
    r = run(gz_engine, gz_consent, analyses, privacy={"epsilon": 1.0})
    assert r.disclosure["dp"]["epsilon"] == 1.0
    assert set(r.analyses) == {"n", "h"}


def test_histogram_is_allowed_under_a_budget_with_dp_and_refused_without() -> None:
    budget = DisclosureRules(epsilon_total=3.0)
    from healthspace.compute import authorise

    authorise(spec([HIST], privacy={"epsilon": 1.0}), budget)
    with pytest.raises(ForbiddenError, match="must ask for differential privacy"):
        authorise(spec([HIST]), budget)


def test_histogram_is_refused_when_the_agreement_does_not_allow_it(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter
) -> None:
    rules = DisclosureRules(analyses=frozenset({"count", "stratified_count"}))
    with pytest.raises(ForbiddenError) as exc:
        run(gz_engine, gz_consent, [HIST], rules=rules)
    assert "measurement_histogram" in str(exc.value.detail)
    assert exc.value.extra.get("pointer") == "/analyses/0/type"


def test_guard_records_the_histogram_cells_and_allows_a_repeat(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, truth: pd.DataFrame
) -> None:
    history = MemoryCohortHistory()
    guard = DifferencingGuard(history, 10)
    s = spec([HIST])
    for job in ("a", "b"):
        run_job(s, gz_engine, gz_consent, OPEN, JobContext(job, "c", "s", "gz"), guard=guard)
    sizes = {len(ids) for _, _, ids in history.rows}
    assert len(truth) in sizes  # everyone counted
    assert int((truth.band == "7-8").sum()) in sizes  # a band
    female_old = int(((truth.sex == "female") & (truth.age == "65-95")).sum())
    assert female_old in sizes  # a stratum
    assert int(((truth.band == "7-8") & (truth.sex == "female") & (truth.age == "65-95")).sum()) in sizes


# --- PostgreSQL ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate("hk", 1_500, 3, tmp_path_factory.mktemp("pg-hist") / "hk", progress=False).out


@pytest.fixture
def both(small: Path, postgres_url: str) -> Iterator[tuple[DuckDBEngine, PostgresEngine]]:
    with duckdb_and_postgres(small, postgres_url) as pair:
        yield pair


@pytest.mark.postgres
def test_postgres_and_duckdb_give_the_ground_truth_histogram(
    both: tuple[DuckDBEngine, PostgresEngine], small: Path
) -> None:
    duck, pg = both
    consent = consent_filter(small)
    a = run(duck, consent, [HIST]).analyses["h"]
    b = run(pg, consent, [HIST]).analyses["h"]
    assert a == b
    assert a["counts"] == expected_cells(truth_table(small))
    one_a = run(duck, consent, [{**HIST, "by": [{"var": "sex"}]}]).analyses["h"]
    one_b = run(pg, consent, [{**HIST, "by": [{"var": "sex"}]}]).analyses["h"]
    assert one_a == one_b
    assert one_a["total"] == a["total"]


# --- combining across sites ----------------------------------------------------------------------------


def _site(name: str, result: dict[str, Any]) -> SiteOutcome:
    return SiteOutcome(name, "ok", result={"result": {"analyses": {"h": result}}})


def test_lab_sums_histograms_cell_by_cell(gz_engine: DuckDBEngine, gz_consent: ConsentFilter) -> None:
    r = run(gz_engine, gz_consent, [HIST]).analyses["h"]
    combined = combine([_site("a", r), _site("b", r)])["h"]
    assert combined["counts"] == [[[2 * v for v in row] for row in band] for band in r["counts"]]
    assert combined["band_totals"] == [2 * v for v in r["band_totals"]]
    assert combined["total"] == 2 * r["total"]
    assert combined["exact"] is True


def test_a_suppressed_cell_makes_the_combined_histogram_a_lower_bound() -> None:
    base = {
        "type": "measurement_histogram",
        "code": "4548-4",
        "bands": ["5-7", "other"],
        "dims": [],
        "levels": [],
    }
    a = {**base, "counts": [20, None], "total": 25}
    b = {**base, "counts": [30, 12], "total": 42}
    combined = combine([_site("a", a), _site("b", b)])["h"]
    assert combined["counts"] == [50, 12]
    assert combined["total"] == 67
    assert combined["exact"] is False


def test_histograms_with_different_bands_are_not_combined() -> None:
    base = {"type": "measurement_histogram", "code": "4548-4", "dims": [], "levels": [], "total": 5}
    a = {**base, "bands": ["5-7", "other"], "counts": [3, 2]}
    b = {**base, "bands": ["5-8", "other"], "counts": [3, 2]}
    combined = combine([_site("a", a), _site("b", b)])["h"]
    assert "counts" not in combined
    assert "differ" in combined["note"]


def test_bench_suite_reports_the_histogram_job_against_same_run_baselines() -> None:
    from healthspace.bench.suites import histogram

    figures = histogram.run(quick=True)
    assert [f.baseline_name for f in figures] == [
        "stratified_count job (DP, sex x age)",
        "hand-written DuckDB histogram (no consent, noise or suppression)",
    ]
    assert all(len(f.samples) == len(f.baseline_samples) == 5 for f in figures)
