"""The DSP benchmark suite runs quickly and reports each figure beside a baseline from the same run."""

from __future__ import annotations

from healthspace.bench.suites import dsp

PER_BACKEND = 5


def test_quick_run_reports_latency_cpu_and_throughput_on_both_backends_with_baselines() -> None:
    figures = dsp.run(quick=True)
    # SQLite always; PostgreSQL too (run() refuses to skip it under CI=true when it is unreachable).
    backends = ["SQLite", "PostgreSQL"] if len(figures) == 2 * PER_BACKEND else ["SQLite"]
    targets = [dsp.TARGET_P50_MS, dsp.TARGET_P99_MS, None, None, dsp.TARGET_RATE]
    assert [f.target for f in figures] == targets * len(backends)
    for figure, backend in zip(figures, [b for b in backends for _ in range(PER_BACKEND)], strict=True):
        assert figure.name.endswith(f"({backend})")
        assert figure.median > 0
        assert figure.baseline_median is not None
        assert figure.baseline_median > 0

    # A negotiation (four signed messages, persisted and audited on both sides) costs far more CPU
    # than one GET /health round trip.
    cpu = [f for f in figures if f.name.startswith("dsp CPU per negotiation")]
    assert len(cpu) == len(backends)
    assert all(f.unit == "ms" and f.ratio is not None and f.ratio > 3 for f in cpu)
    # The provider's own share is measured in the same blocks: part of both processes', not all of it.
    provider = [f for f in figures if f.name.startswith("dsp provider CPU per negotiation")]
    assert len(provider) == len(backends)
    for mine, both in zip(provider, cpu, strict=True):
        assert 0 < mine.median < both.median
        assert mine.baseline_median is not None
        assert mine.ratio is not None
        assert mine.ratio > 3
