"""The federated bench suite runs in quick mode and reports figures with a same-run baseline."""

from __future__ import annotations

from healthspace.bench.suites import federated


def test_federated_suite_quick_reports_p50_and_p99_against_the_raw_query() -> None:
    figures = federated.run(quick=True)
    assert [f.name.split()[2] for f in figures] == ["p50", "p99"]
    assert all(f.baseline_samples and f.ratio is not None and f.ratio > 0 for f in figures)
