"""The compute bench suite runs in quick mode and reports figures with same-run baselines."""

from __future__ import annotations

from healthspace.bench.suites import compute


def test_quick_run_reports_figures_with_baselines_and_targets() -> None:
    figures = compute.run(quick=True)
    assert len(figures) == 6
    assert all(f.samples and f.baseline_samples and f.ratio is not None for f in figures)
    assert [f.target for f in figures] == [None, None, 0.005, None, 0.005, 0.005]
    # "All but the engine" is the whole job minus its engine time: never negative, below the whole.
    whole, rest = figures[0], figures[2]
    assert all(0 <= r < w for r, w in zip(rest.samples, whole.samples, strict=True))


def test_thousand_codes_are_distinct_valid_codes() -> None:
    codes = compute.thousand_codes()
    assert len(codes) == len(set(codes)) == 1000
