"""The DSP benchmark suite runs quickly and reports each figure beside a baseline from the same run."""

from __future__ import annotations

from healthspace.bench.suites import dsp


def test_quick_run_reports_latency_figures_with_baselines_and_targets() -> None:
    figures = dsp.run(quick=True)
    assert [f.target for f in figures] == [dsp.TARGET_P50_MS, dsp.TARGET_P99_MS, dsp.TARGET_RATE]
    for figure in figures:
        assert figure.median > 0
        assert figure.baseline_median is not None
        assert figure.baseline_median > 0
