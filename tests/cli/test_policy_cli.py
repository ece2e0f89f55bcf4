"""`healthspace policy`: templates produce conforming policies; a broken policy is refused with pointers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from healthspace.cli.main import app
from tests.conftest import ROOT

runner = CliRunner()
SAMPLES = ROOT / "docs" / "policy" / "samples"


def test_a_template_policy_conforms(tmp_path: Path) -> None:
    made = runner.invoke(
        app,
        [
            "policy",
            "template",
            "aggregate-research",
            "--scenario",
            "diabetes-outcomes-research",
            "--k",
            "10",
            "--epsilon",
            "3",
            "--days",
            "365",
        ],
    )
    assert made.exit_code == 0, made.output
    policy = json.loads(made.output)
    assert {"leftOperand": "minCellSize", "operator": "gteq", "rightOperand": "10"} in (
        policy["permission"][0]["constraint"]
    )
    (tmp_path / "p.json").write_text(made.output)
    checked = runner.invoke(app, ["policy", "check", str(tmp_path / "p.json")])
    assert checked.exit_code == 0
    assert "conforms" in checked.output


INVALID = sorted(p for p in (SAMPLES / "invalid").glob("*.json") if p.name != "expected.json")


@pytest.mark.parametrize("sample", INVALID, ids=lambda p: p.name)
def test_every_invalid_sample_is_refused_with_the_pointer_the_docs_promise(sample: Path) -> None:
    expected = json.loads((SAMPLES / "invalid" / "expected.json").read_text())[sample.name]
    result = runner.invoke(app, ["policy", "check", str(sample)])
    assert result.exit_code == 1
    assert f"{expected['pointer'] or '/'}: " in result.output
    assert expected["contains"] in result.output


def test_an_unknown_template_is_a_clear_error() -> None:
    result = runner.invoke(app, ["policy", "template", "everything-goes", "--scenario", "x"])
    assert result.exit_code == 1
    assert "unknown policy template" in result.output


def test_no_budget_builds_a_federated_model_offer_without_a_privacy_budget() -> None:
    args = ["policy", "template", "federated-model", "--scenario", "diabetes-outcomes-research"]
    made = runner.invoke(app, [*args, "--no-budget"])
    assert made.exit_code == 0, made.output
    lefts = [c["leftOperand"] for c in json.loads(made.output)["permission"][0]["constraint"]]
    assert "privacyBudget" not in lefts
    assert "outputType" in lefts
    both = runner.invoke(app, [*args, "--no-budget", "--epsilon", "1"])
    assert both.exit_code == 1
    assert "--no-budget" in both.output
