"""Suppression, rounding, secondary suppression and DP noise."""

from __future__ import annotations

import numpy as np
import pytest

from healthspace.compute import DisclosureRules, DuckDBEngine, JobContext, parse_spec, run_job
from healthspace.compute.disclosure import (
    Grid,
    dp_counts,
    primary_suppression,
    round_to,
    secondary_suppression,
)
from healthspace.consent.filter import ConsentFilter


def determined(grid: Grid) -> list[tuple[int, int]]:
    """Hidden entries an attacker can solve exactly from the visible ones and the additive relations."""
    hidden = sorted(grid.hidden)
    if not hidden:
        return []
    idx = {e: i for i, e in enumerate(hidden)}
    a = np.array(
        [[1.0 if e in line else 0.0 for e in hidden] for line in grid.lines() if any(e in idx for e in line)]
    )
    out = []
    for e, i in idx.items():
        unit = np.zeros(len(hidden))
        unit[i] = 1
        # e is determined iff its unit vector lies in the row space of the relations.
        if np.linalg.matrix_rank(np.vstack([a, unit])) == np.linalg.matrix_rank(a):
            out.append(e)
    return out


def test_small_cells_are_suppressed() -> None:
    g = Grid([[3, 40, 50]])
    primary_suppression(g, 10)
    assert g.hidden == {(0, 0)}


def test_a_lone_hidden_cell_would_be_recoverable_from_the_total() -> None:
    g = Grid([[3, 40, 50]])
    primary_suppression(g, 10)
    assert determined(g) == [(0, 0)]


def test_secondary_suppression_protects_a_one_way_table() -> None:
    g = Grid([[3, 40, 50]])
    primary_suppression(g, 10)
    secondary_suppression(g)
    assert g.hidden == {(0, 0), (0, 1)}
    assert determined(g) == []


def test_secondary_suppression_protects_a_cross_tab_with_margins() -> None:
    g = Grid([[2, 30, 41], [25, 33, 12], [17, 4, 60]])
    primary_suppression(g, 10)
    secondary_suppression(g)
    assert {(0, 0), (2, 1)} <= g.hidden
    assert determined(g) == []


@pytest.mark.parametrize("seed", range(20))
def test_secondary_suppression_leaves_nothing_determined_on_random_tables(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = Grid(rng.integers(0, 25, size=(3, 4)).tolist())
    primary_suppression(g, 10)
    secondary_suppression(g)
    assert determined(g) == []


def test_rounding_to_base_five() -> None:
    assert [round_to(n, 5) for n in (10, 12, 13, 17, 18)] == [10, 10, 15, 15, 20]


def test_job_suppresses_and_rounds(gz_engine: DuckDBEngine, gz_consent: ConsentFilter) -> None:
    by = [{"var": "sex"}, {"var": "age_group", "breaks": [18, 30, 90, 95]}]
    spec = parse_spec(
        {
            "version": 1,
            "cohort": {
                "inclusion": [
                    {"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}
                ]
            },
            "analyses": [{"type": "stratified_count", "id": "t", "by": by}],
        }
    )
    open_ = run_job(
        spec, gz_engine, gz_consent, DisclosureRules(min_cell_size=1), JobContext("a", "c", "s", "gz")
    ).analyses["t"]
    shut = run_job(
        spec,
        gz_engine,
        gz_consent,
        DisclosureRules(min_cell_size=10, rounding_base=5),
        JobContext("b", "c", "s", "gz"),
    ).analyses["t"]
    for row_o, row_s in zip(open_["counts"], shut["counts"], strict=True):
        for o, s in zip(row_o, row_s, strict=True):
            if 0 < o < 10:
                assert s is None
            if s is not None:
                assert s % 5 == 0
                assert abs(s - o) <= 2
    assert sum(v is None for row in shut["counts"] for v in row) >= 2


def test_laplace_noise_has_the_expected_spread() -> None:
    eps = 0.5
    noisy = np.array(dp_counts([1000] * 4000, eps))
    # Discrete Laplace with scale 1/ε: variance 2·e^{-ε}/(1-e^{-ε})² ≈ 2/ε² for small ε.
    expected = 2 * np.exp(-eps) / (1 - np.exp(-eps)) ** 2
    assert noisy.dtype.kind == "i"
    assert abs(noisy.mean() - 1000) < 0.2
    assert noisy.var() == pytest.approx(expected, rel=0.1)


def test_gaussian_noise_is_integer_and_centred() -> None:
    noisy = np.array(dp_counts([50] * 2000, 1.0, "gaussian", 1e-6))
    assert noisy.dtype.kind == "i"
    assert abs(noisy.mean() - 50) < 0.3
    assert noisy.std() > 1


def test_dp_job_adds_noise_and_reports_the_mechanism(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter
) -> None:
    spec = parse_spec({"version": 1, "analyses": [{"type": "count", "id": "n"}], "privacy": {"epsilon": 0.1}})
    exact = run_job(
        spec.model_copy(update={"privacy": None}),
        gz_engine,
        gz_consent,
        DisclosureRules(),
        JobContext("a", "c", "s", "gz"),
    )
    values = {
        run_job(spec, gz_engine, gz_consent, DisclosureRules(), JobContext(f"j{i}", "c", "s", "gz")).analyses[
            "n"
        ]["count"]
        for i in range(8)
    }
    assert len(values) > 1
    assert all(abs(v - exact.analyses["n"]["count"]) < 200 for v in values)
