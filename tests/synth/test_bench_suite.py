"""The synth benchmark suite runs quickly and reports each figure beside a baseline from the same run."""

from __future__ import annotations

from healthspace.bench.suites import synth


def test_quick_run_reports_figures_with_baselines_and_targets() -> None:
    figures = synth.run(quick=True)
    assert [f.unit for f in figures] == ["s", "patients/s"]
    for figure in figures:
        assert figure.median > 0
        assert figure.baseline_median is not None
        assert figure.baseline_median > 0
        assert figure.target is not None
