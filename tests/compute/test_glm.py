"""Federated GLM over three sites: equals a pooled statsmodels fit, recovers the known coefficients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import statsmodels.api as sm

from healthspace.compute import (
    DisclosureError,
    DisclosureRules,
    DuckDBEngine,
    GlmSite,
    attach_parquet,
    fit_glm,
    parse_spec,
)
from healthspace.compute.glm import SiteStats, _check
from healthspace.synth import OUTCOME_COEFFICIENTS
from tests.compute.conftest import consent_filter

RULES = DisclosureRules(output_types=frozenset({"model"}))


def cond(prefix: str) -> dict[str, Any]:
    return {
        "kind": "has",
        "criterion": {
            "type": "event",
            "event": {"domain": "condition", "codes": [prefix], "match": "prefix"},
            "window": {"to_days": 0},
        },
    }


OUTCOME_MODEL = [
    {"kind": "age", "center": 60, "scale": 10},
    {"kind": "male"},
    {"kind": "value", "code": "4548-4", "window": {"from_days": 0, "to_days": 0}, "center": 6.0},
    cond("N18"),
    cond("I25"),
    cond("J44"),
]
DEATH = {"kind": "has", "criterion": {"type": "event", "event": {"domain": "death"}}}
MODELS: dict[str, dict[str, Any]] = {
    "binomial": {"outcome": DEATH, "covariates": OUTCOME_MODEL},
    "gaussian": {
        "outcome": {"kind": "value", "code": "4548-4", "window": {"from_days": 0, "to_days": 0}},
        "covariates": [*OUTCOME_MODEL[:2], cond("N18")],
    },
    "poisson": {
        "outcome": {
            "kind": "count",
            "event": {"domain": "measurement", "codes": ["4548-4"]},
            "window": {"from_days": 1},
        },
        "covariates": [*OUTCOME_MODEL[:2], cond("N18")],
    },
}


def spec(family: str) -> Any:
    return parse_spec(
        {"version": 1, "analyses": [{"type": "glm", "id": "m", "family": family, **MODELS[family]}]}
    )


@pytest.fixture(scope="module")
def engines(synth_dirs: dict[str, Path]) -> Iterator[dict[str, DuckDBEngine]]:
    out = {}
    for site, d in synth_dirs.items():
        con = duckdb.connect()
        attach_parquet(con, d / "omop")
        out[site] = DuckDBEngine(con)
    yield out
    for e in out.values():
        e.con.close()


@pytest.fixture(scope="module")
def sites(engines: dict[str, DuckDBEngine], synth_dirs: dict[str, Path]) -> dict[str, list[GlmSite]]:
    return {
        fam: [
            GlmSite(engines[s], consent_filter(synth_dirs[s]), spec(fam), "m", RULES) for s in sorted(engines)
        ]
        for fam in MODELS
    }


@pytest.mark.parametrize("family", ["binomial", "gaussian", "poisson"])
def test_federated_fit_equals_pooled_statsmodels(family: str, sites: dict[str, list[GlmSite]]) -> None:
    fed = fit_glm(sites[family], family, sites[family][0].n_params)  # type: ignore[arg-type]
    x = np.vstack([s._x for s in sites[family]])
    y = np.concatenate([s._y for s in sites[family]])
    fam = {
        "binomial": sm.families.Binomial(),
        "gaussian": sm.families.Gaussian(),
        "poisson": sm.families.Poisson(),
    }[family]
    ref = sm.GLM(y, x, family=fam).fit(tol=1e-12)
    assert fed.converged
    assert np.max(np.abs(fed.coef - ref.params)) < 1e-6
    assert np.max(np.abs(fed.se - ref.bse)) < 1e-6
    assert fed.deviance == pytest.approx(ref.deviance, rel=1e-9)


def test_federated_logistic_recovers_the_generator_coefficients(sites: dict[str, list[GlmSite]]) -> None:
    fit = fit_glm(sites["binomial"], "binomial", 7)
    truth = [
        OUTCOME_COEFFICIENTS[k]
        for k in ("intercept", "age_per_10y", "male", "hba1c_per_pct", "ckd", "ihd", "copd")
    ]
    z = (fit.coef - np.array(truth)) / fit.se
    assert np.all(np.abs(z) < 3), dict(zip(fit.names, z.round(2), strict=True))


def test_sites_release_only_aggregates(sites: dict[str, list[GlmSite]]) -> None:
    stats = sites["binomial"][0](np.zeros(7))
    d = stats.to_dict()
    assert set(d) == {"n", "xtwx", "xtwz", "deviance"}
    assert np.asarray(d["xtwx"]).shape == (7, 7)
    assert SiteStats.from_dict(d).n == stats.n


def test_site_refuses_a_malformed_beta(sites: dict[str, list[GlmSite]]) -> None:
    with pytest.raises(Exception, match="7 finite numbers"):
        sites["binomial"][0](np.array([np.nan] * 7))


def test_too_many_parameters_for_the_rows_is_refused() -> None:
    rng = np.random.default_rng(1)
    x = np.column_stack([np.ones(12), rng.normal(size=(12, 3))])
    rules = DisclosureRules(min_cell_size=2)
    _check("gaussian", np.vstack([x, x]), rng.normal(size=24), 4, rules)  # 4 ≤ 0.33 x 24: allowed
    with pytest.raises(DisclosureError, match="4 parameters for 11 rows"):
        _check("gaussian", x[:11], rng.normal(size=11), 4, rules)


def test_site_refuses_an_empty_outcome_cell(
    engines: dict[str, DuckDBEngine], synth_dirs: dict[str, Path]
) -> None:
    # Among the living-only cohort (death excluded) the outcome "died" has no ones.
    s = parse_spec(
        {
            "version": 1,
            "cohort": {"exclusion": [DEATH["criterion"]]},
            "analyses": [
                {
                    "type": "glm",
                    "id": "m",
                    "family": "binomial",
                    "outcome": DEATH,
                    "covariates": OUTCOME_MODEL[:2],
                }
            ],
        }
    )
    with pytest.raises(DisclosureError, match="outcome level is empty"):
        GlmSite(engines["gz"], consent_filter(synth_dirs["gz"]), s, "m", RULES)
