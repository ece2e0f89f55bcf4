"""The DSP benchmark suite runs quickly and reports each figure beside a baseline from the same run."""

from __future__ import annotations

from healthspace.bench.suites import dsp


def test_quick_run_reports_latency_and_throughput_on_both_backends_with_baselines() -> None:
    figures = dsp.run(quick=True)
    # SQLite always; PostgreSQL too (run() refuses to skip it under CI=true when it is unreachable).
    backends = ["SQLite", "PostgreSQL"] if len(figures) == 6 else ["SQLite"]
    assert [f.target for f in figures] == [dsp.TARGET_P50_MS, dsp.TARGET_P99_MS, dsp.TARGET_RATE] * len(
        backends
    )
    for figure, backend in zip(figures, [b for b in backends for _ in range(3)], strict=True):
        assert figure.name.endswith(f"({backend})")
        assert figure.median > 0
        assert figure.baseline_median is not None
        assert figure.baseline_median > 0
