"""The data bench suite runs in quick mode and reports its figures with same-run baselines."""

from __future__ import annotations

from healthspace.bench.suites import data


def test_quick_run_reports_ingest_and_quality_with_baselines() -> None:
    figures = {f.name: f for f in data.run(quick=True)}
    assert set(figures) == {"fhir_ndjson_ingest_validated", "dqd_quality_checks"}
    assert all(f.baseline_samples and f.target for f in figures.values())
    assert figures["fhir_ndjson_ingest_validated"].median > 0
