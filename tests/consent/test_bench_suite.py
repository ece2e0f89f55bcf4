"""The consent bench suite runs in quick mode and reports the join cost against its baseline."""

from __future__ import annotations

from healthspace.bench.suites import consent


def test_quick_run_reports_figures_with_baselines_and_the_target() -> None:
    figures = consent.run(quick=True)
    assert len(figures) == 3
    assert all(f.baseline_samples and f.samples for f in figures)
    added = next(f for f in figures if "added" in f.name)
    assert added.target == 20.0
