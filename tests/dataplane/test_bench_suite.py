"""The data-plane bench suite runs in quick mode and reports each figure with a same-run baseline."""

from __future__ import annotations

from healthspace.bench.suites import dataplane


def test_dataplane_suite_quick_reports_three_figures_against_baselines() -> None:
    figures = dataplane.run(quick=True)
    assert [f.name for f in figures] == [
        "GLM step over HTTP, persisted session",
        "data-plane token refresh",
        "job decision via PolicyGate.decide",
    ]
    assert all(f.samples and f.baseline_samples and f.ratio is not None and f.ratio > 0 for f in figures)
