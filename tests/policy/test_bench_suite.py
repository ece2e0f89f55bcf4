"""The policy benchmark suite runs quickly and reports against a baseline and the issue's target."""

from __future__ import annotations

from healthspace.bench.suites import policy


def test_quick_run_reports_figures_with_baseline_and_target() -> None:
    figures = policy.run(quick=True)
    assert len(figures) == 2
    for f in figures:
        assert f.baseline_samples
        assert f.ratio is not None
        assert f.target == 50_000
