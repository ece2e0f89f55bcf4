"""The outcome (death during follow-up) follows the documented logistic model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from healthspace.synth import OUTCOME_COEFFICIENTS, model

# The design an analyst builds from the documentation (docs/synth.md), in the order of the coefficients.
COLUMNS = ("intercept", "age_per_10y", "male", "hba1c_per_pct", "ckd", "ihd", "copd")


def _design(df: pd.DataFrame) -> np.ndarray:
    return np.column_stack(
        [
            np.ones(len(df)),
            (df["age"] - 60.0) / 10.0,
            df["male"],
            df["hba1c"] - 6.0,
            df["ckd"],
            df["ihd"],
            df["copd"],
        ]
    )


def _irls(x: np.ndarray, y: np.ndarray, iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression by iteratively reweighted least squares: coefficients and standard errors."""
    beta = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(x @ beta)))
        w = p * (1 - p)
        info = x.T @ (x * w[:, None])
        step = np.linalg.solve(info, x.T @ (y - p))
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    p = 1 / (1 + np.exp(-(x @ beta)))
    info = x.T @ (x * (p * (1 - p))[:, None])
    return beta, np.sqrt(np.diag(np.linalg.inv(info)))


def test_coefficients_are_exposed_in_documented_order() -> None:
    assert tuple(OUTCOME_COEFFICIENTS) == COLUMNS


def test_logistic_fit_recovers_outcome_coefficients(baselines: dict[str, pd.DataFrame]) -> None:
    df = pd.concat(baselines.values())
    beta, se = _irls(_design(df), df["dead"].to_numpy())
    truth = np.array([OUTCOME_COEFFICIENTS[c] for c in COLUMNS])
    z = (beta - truth) / se
    assert np.all(np.abs(z) < 3.0), dict(zip(COLUMNS, np.round(z, 2), strict=True))


def test_fit_would_reject_a_wrong_coefficient(baselines: dict[str, pd.DataFrame]) -> None:
    # The check above has power: halving the CKD effect lies far outside the fitted interval.
    df = pd.concat(baselines.values())
    beta, se = _irls(_design(df), df["dead"].to_numpy())
    ckd = COLUMNS.index("ckd")
    assert abs(beta[ckd] - OUTCOME_COEFFICIENTS["ckd"] / 2) / se[ckd] > 3.0


def test_deaths_fall_within_follow_up(baselines: dict[str, pd.DataFrame]) -> None:
    for df in baselines.values():
        dead = df[df["dead"] == 1]
        start = pd.to_datetime(dead["observation_period_start_date"])
        end = pd.to_datetime(dead["observation_period_end_date"])
        assert (end > start).all()
        assert (end <= pd.Timestamp(model.FOLLOW_UP_END)).all()


def test_death_ends_the_observation_period(populations: dict[str, object]) -> None:
    pop = populations["gz"]
    death = pop.omop("death").to_pandas()  # type: ignore[attr-defined]
    period = pop.omop("observation_period").to_pandas()  # type: ignore[attr-defined]
    merged = death.merge(period, on="person_id")
    assert (merged["death_date"] == merged["observation_period_end_date"]).all()
