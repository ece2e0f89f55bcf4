"""The compute bench suite runs in quick mode and reports figures with same-run baselines."""

from __future__ import annotations

from healthspace.bench.suites import compute


def test_quick_run_reports_figures_with_baselines_and_targets() -> None:
    figures = compute.run(quick=True)
    assert len(figures) == 3
    assert all(f.samples and f.baseline_samples for f in figures)
    assert [f.target for f in figures] == [None, 0.005, 0.005]
