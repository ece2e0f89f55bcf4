"""The same specs on PostgreSQL as the clinical store give the same results as on DuckDB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from healthspace.compute import (
    DisclosureRules,
    DuckDBEngine,
    GlmSite,
    JobContext,
    PostgresEngine,
    parse_spec,
    run_job,
)
from healthspace.compute.sql import light_plan
from healthspace.synth.generate import generate
from tests.compute.conftest import consent_filter, duckdb_and_postgres

pytestmark = pytest.mark.postgres

SPEC = {
    "version": 1,
    "cohort": {
        "inclusion": [
            {"type": "event", "event": {"domain": "condition", "codes": ["I10", "E11"], "match": "prefix"}},
            {"type": "age", "min_years": 30},
        ]
    },
    "analyses": [
        {"type": "count", "id": "n"},
        {
            "type": "stratified_count",
            "id": "t",
            "by": [{"var": "sex"}, {"var": "age_group", "breaks": [30, 60, 95]}],
        },
        {
            "type": "measurement_summary",
            "id": "h",
            "code": "4548-4",
            "window": {"from_days": 0, "to_days": 0},
            "quantiles": [0.25, 0.5],
        },
        {"type": "incidence_rate", "id": "i", "outcome": {"domain": "death"}},
        {"type": "kaplan_meier", "id": "km", "outcome": {"domain": "death"}, "interval_days": 180},
    ],
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate("hk", 1_500, 2, tmp_path_factory.mktemp("pg") / "hk", progress=False).out


@pytest.fixture
def engines(small: Path, postgres_url: str) -> Iterator[tuple[DuckDBEngine, PostgresEngine]]:
    with duckdb_and_postgres(small, postgres_url) as pair:
        yield pair


def test_postgres_and_duckdb_give_the_same_results(
    engines: tuple[DuckDBEngine, PostgresEngine], small: Path
) -> None:
    duck, pg = engines
    spec, consent, rules = parse_spec(SPEC), consent_filter(small), DisclosureRules(min_cell_size=5)
    a = run_job(spec, duck, consent, rules, JobContext("j", "c", "s", "hk"))
    b = run_job(spec, pg, consent, rules, JobContext("j", "c", "s", "hk"))
    assert a.analyses["n"]["count"] > 100
    # Counts must match exactly; sums of floats may differ in the last bit (summation order).
    assert _close(a.analyses, b.analyses), (a.analyses, b.analyses)


LIGHT_SPEC = {
    "version": 1,
    "cohort": {
        "inclusion": [
            {"type": "event", "event": {"domain": "condition", "codes": ["I10", "E11"], "match": "prefix"}}
        ],
        "exclusion": [{"type": "event", "event": {"domain": "condition", "codes": ["N18.5"]}}],
    },
    "analyses": [
        {"type": "count", "id": "n"},
        {
            "type": "stratified_count",
            "id": "t",
            "by": [
                {"var": "sex"},
                {
                    "var": "flag",
                    "name": "ckd",
                    "criterion": {
                        "type": "event",
                        "event": {"domain": "condition", "codes": ["N18"], "match": "prefix"},
                    },
                },
            ],
        },
    ],
}


def test_the_light_plan_gives_the_same_results_on_postgres(
    engines: tuple[DuckDBEngine, PostgresEngine], small: Path
) -> None:
    duck, pg = engines
    spec, consent, rules = parse_spec(LIGHT_SPEC), consent_filter(small), DisclosureRules(min_cell_size=5)
    assert light_plan(spec)
    full = run_job(spec, duck, consent, rules, JobContext("j", "c", "s", "hk"), plan="full")
    for engine in (duck, pg):
        r = run_job(spec, engine, consent, rules, JobContext("j", "c", "s", "hk"))
        assert r.analyses == full.analyses
    assert full.analyses["n"]["count"] > 100


def _close(x: object, y: object) -> bool:
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(a, b) for a, b in zip(x, y, strict=True))
    if isinstance(x, float) and isinstance(y, float):
        return bool(x == pytest.approx(y, rel=1e-12))
    return x == y and type(x) is type(y)


def test_postgres_and_duckdb_give_the_same_glm_statistics(
    engines: tuple[DuckDBEngine, PostgresEngine], small: Path
) -> None:
    duck, pg = engines
    glm = {
        "type": "glm",
        "id": "m",
        "family": "gaussian",
        "outcome": {"kind": "value", "code": "4548-4", "window": {"from_days": 0, "to_days": 0}},
        "covariates": [{"kind": "age", "center": 60, "scale": 10}, {"kind": "male"}],
    }
    spec = parse_spec({"version": 1, "analyses": [glm]})
    rules = DisclosureRules(output_types=frozenset({"model"}))
    beta = np.array([6.0, 0.1, 0.1])
    sa = GlmSite(duck, consent_filter(small), spec, "m", rules)(beta)
    sb = GlmSite(pg, consent_filter(small), spec, "m", rules)(beta)
    assert sa.n == sb.n
    assert np.allclose(sa.xtwx, sb.xtwx, rtol=1e-12)
    assert np.allclose(sa.xtwz, sb.xtwz, rtol=1e-12)
