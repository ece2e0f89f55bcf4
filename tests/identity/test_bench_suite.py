"""The identity benchmark suite runs quickly and reports each figure beside a baseline from the same run."""

from __future__ import annotations

from healthspace.bench.suites import identity


def test_quick_run_reports_figures_with_baselines_and_targets() -> None:
    figures = identity.run(quick=True)
    assert len(figures) == 2
    for figure in figures:
        assert figure.median > 0
        assert figure.baseline_median is not None
        assert figure.baseline_median > 0
        assert figure.target is not None
