"""The DSP benchmark suite runs quickly and reports each figure beside a baseline from the same run."""

from __future__ import annotations

from healthspace.bench.suites import dsp

PER_BACKEND = 5
MULTI_PROCESS = 2  # the multi-process provider's figures: PostgreSQL only


def test_quick_run_reports_latency_cpu_and_throughput_on_both_backends_with_baselines() -> None:
    figures = dsp.run(quick=True)
    sqlite = [f for f in figures if f.name.endswith("(SQLite)")]
    postgres = [f for f in figures if f.name.endswith("(PostgreSQL)")]
    assert len(sqlite) + len(postgres) == len(figures)
    # SQLite always; PostgreSQL too (run() refuses to skip it under CI=true when it is unreachable).
    assert len(sqlite) == PER_BACKEND
    assert len(postgres) in (0, PER_BACKEND + MULTI_PROCESS)
    targets = [dsp.TARGET_P50_MS, dsp.TARGET_P99_MS, None, None, dsp.TARGET_RATE]
    assert [f.target for f in sqlite] == targets
    if postgres:
        assert [f.target for f in postgres] == [*targets, dsp.TARGET_RATE, None]
    for figure in figures:
        assert figure.median > 0
        assert figure.baseline_median is not None
        assert figure.baseline_median > 0

    # A negotiation (four signed messages, persisted and audited on both sides) costs far more CPU
    # than one GET /health round trip.
    backends = 2 if postgres else 1
    cpu = [f for f in figures if f.name.startswith("dsp CPU per negotiation")]
    assert len(cpu) == backends
    assert all(f.unit == "ms" and f.ratio is not None and f.ratio > 3 for f in cpu)
    # The provider's own share is measured in the same blocks: part of both processes', not all of it.
    provider = [f for f in figures if f.name.startswith("dsp provider CPU per negotiation (")]
    assert len(provider) == backends
    for mine, both in zip(provider, cpu, strict=True):
        assert 0 < mine.median < both.median
        assert mine.baseline_median is not None
        assert mine.ratio is not None
        assert mine.ratio > 3

    if postgres:
        # The multi-process provider's rounds alternate with the one-process provider's: the
        # baseline of each of its figures is the one-process figure of those same rounds.
        single_rate, multi_rate, multi_cpu = postgres[4], postgres[5], postgres[6]
        assert "provider of" in multi_rate.name
        assert multi_rate.unit == single_rate.unit == "negotiations/s"
        assert multi_rate.baseline_samples == single_rate.samples
        assert len(multi_rate.samples) == len(single_rate.samples) == 3
        # How the requests fell on the processes is noted.
        assert "answered by each process" in multi_rate.note
        assert multi_cpu.unit == "ms"
        assert multi_cpu.better == "lower"
        assert len(multi_cpu.samples) == len(multi_cpu.baseline_samples) == 3
