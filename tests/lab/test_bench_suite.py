"""The federated bench suite runs in quick mode and reports figures with a same-run baseline."""

from __future__ import annotations

from healthspace.bench.suites import federated


def test_federated_suite_quick_reports_latencies_and_job_cost_against_the_engine() -> None:
    figures = federated.run(quick=True)
    names = [f.name for f in figures]
    assert [n.split(" (")[0] for n in names] == [
        "federated count p50",
        "federated count p99",
        "count by 1,000 codes p50",
        "count by 1,000 codes p99",
        "one job end to end",
        "one job: everything but the engine",
    ]
    assert all(f.baseline_samples and f.ratio is not None and f.ratio > 0 for f in figures)
    assert [f.target for f in figures][:3] == [100.0, None, 300.0]
    # Engine time comes from the site's own process: a job's whole time is never below it.
    whole, rest = figures[4], figures[5]
    assert all(0 <= r < w for r, w in zip(rest.samples, whole.samples, strict=True))
    assert all(e > 0 for e in rest.baseline_samples)
    assert "one process each" in figures[0].note
