"""The benchmark runner writes every figure with its same-run baseline and ratio."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from healthspace.bench.runner import available_suites, run_suites


def test_the_foundation_suites_are_registered() -> None:
    assert {"audit", "identity", "synth"} <= set(available_suites())


def test_a_quick_run_writes_figures_with_ratios(tmp_path: Path) -> None:
    code = run_suites(["identity"], quick=True, out=tmp_path, console=Console(quiet=True))
    assert code == 0
    doc = json.loads((tmp_path / "latest.json").read_text())
    figures = doc["suites"]["identity"]
    assert figures
    for f in figures:
        assert f["baseline_median"] > 0
        assert abs(f["ratio"] - f["median"] / f["baseline_median"]) < 1e-9
