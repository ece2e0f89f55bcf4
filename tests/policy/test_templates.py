"""Steward templates: named, parametrised policies that conform to the profile and mean what they say."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from healthspace.core.errors import ValidationError
from healthspace.policy import CrossBorderFact, Facts, Request, check_policy, evaluate, template

NOW = datetime(2026, 6, 1, tzinfo=UTC)
OK_FACTS = Facts(agreement_start=NOW - timedelta(days=10), cross_border=CrossBorderFact(True, "domestic"))


def job(**kw: object) -> Request:
    base: dict[str, object] = {
        "purpose": "diabetes-outcomes-research",
        "output_type": "aggregate",
        "cell_size": 10,
        "epsilon": 1.0,
        "execution_location": "provider",
        "consumer_jurisdiction": "HK",
    }
    base.update(kw)
    return Request(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["aggregate-research", "deidentified-extract", "federated-model"])
def test_template_conforms_to_the_profile(name: str) -> None:
    assert check_policy(template(name, scenario="diabetes-outcomes-research")) == []


def test_same_call_gives_the_same_policy_id() -> None:
    a = template("aggregate-research", scenario="s", k=10)
    assert a == template("aggregate-research", scenario="s", k=10)
    assert a["@id"] != template("aggregate-research", scenario="s", k=11)["@id"]


def test_aggregate_research_allows_a_conforming_job() -> None:
    policy = template(
        "aggregate-research", scenario="diabetes-outcomes-research", k=10, epsilon=3, valid_for_days=365
    )
    d = evaluate(policy, job(), OK_FACTS, NOW)
    assert d.allowed, d.reasons
    assert [x.action for x in d.duties] == ["log"]


@pytest.mark.parametrize(
    ("request_changes", "facts", "needle"),
    [
        ({"cell_size": 5}, OK_FACTS, "minimum cell size 5 is not ≥ 10"),
        (
            {"epsilon": 2.5},
            Facts(agreement_start=NOW, epsilon_spent=1.0, cross_border=CrossBorderFact(True, "")),
            "ε=2.5",
        ),
        ({"output_type": "model"}, OK_FACTS, "output type 'model' is not 'aggregate'"),
        (
            {},
            Facts(agreement_start=NOW - timedelta(days=366), cross_border=CrossBorderFact(True, "")),
            "elapsed time",
        ),
    ],
)
def test_aggregate_research_denies_what_it_should(
    request_changes: dict[str, object], facts: Facts, needle: str
) -> None:
    policy = template(
        "aggregate-research", scenario="diabetes-outcomes-research", k=10, epsilon=3, valid_for_days=365
    )
    d = evaluate(policy, job(**request_changes), facts, NOW)
    assert not d.allowed
    assert needle in d.reasons[0]


def test_deidentified_extract_returns_a_deletion_deadline() -> None:
    policy = template("deidentified-extract", scenario="diabetes-outcomes-research", k=5, valid_for_days=180)
    facts = Facts(agreement_start=NOW, consent_obtained=True, cross_border=CrossBorderFact(True, ""))
    d = evaluate(policy, job(output_type="deidentified-extract", k=5), facts, NOW)
    assert d.allowed, d.reasons
    deletion = [x for x in d.duties if x.action == "delete"]
    assert deletion[0].due == NOW + timedelta(days=180)


def test_federated_model_refuses_commercial_consumers() -> None:
    policy = template("federated-model", scenario="diabetes-outcomes-research", epsilon=1)
    d = evaluate(policy, job(output_type="model", epsilon=0.5, consumer_type="company"), OK_FACTS, NOW)
    assert not d.allowed
    assert "is not a 'non-commercial'" in d.reasons[0]


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("no-such-template", {"scenario": "s"}, "unknown policy template"),
        ("aggregate-research", {"scenario": "s", "k": 0}, "k must be an integer ≥ 1"),
        ("aggregate-research", {"scenario": "s", "epsilon": -1}, "epsilon must be a positive number"),
        ("aggregate-research", {"k": 5}, "scenario"),
        ("aggregate-research", {"scenario": "s", "colour": "red"}, "unexpected keyword argument"),
    ],
)
def test_bad_template_call_is_a_validation_error(name: str, params: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        template(name, **params)


def test_agreement_template_needs_parties() -> None:
    with pytest.raises(ValidationError):
        template("aggregate-research", policy_type="Agreement", scenario="s")
    doc = template(
        "aggregate-research",
        policy_type="Agreement",
        scenario="s",
        target="urn:ds",
        assigner="a",
        assignee="b",
    )
    assert doc["assignee"] == "b"


def test_federated_model_without_a_budget_allows_a_model_without_dp() -> None:
    policy = template("federated-model", scenario="diabetes-outcomes-research", epsilon=None)
    lefts = [c["leftOperand"] for c in policy["permission"][0]["constraint"]]
    assert "privacyBudget" not in lefts
    assert "outputType" in lefts
    d = evaluate(policy, job(output_type="model", epsilon=None, consumer_type="university"), OK_FACTS, NOW)
    assert d.allowed, d.reasons
    # The default keeps its budget: a model without DP is then outside the agreement's terms downstream.
    default = template("federated-model", scenario="diabetes-outcomes-research")
    assert "privacyBudget" in [c["leftOperand"] for c in default["permission"][0]["constraint"]]
