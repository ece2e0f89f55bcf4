"""Cross-border rules: the full matrix against an independent table, approvals, and the evaluator link."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from healthspace.policy import (
    DEFAULT_RULES,
    ExportApproval,
    Facts,
    JurisdictionRules,
    Request,
    cross_border_fact,
    decide_transfer,
    evaluate,
)

NOW = datetime(2026, 6, 1, tzinfo=UTC)
DATASET, CONSUMER, SCENARIO = "urn:dataset:t2d", "did:web:consumer", "diabetes-outcomes-research"

PROVIDERS = ("CN-GD", "HK", "MO")
CONSUMERS = ("CN-GD", "HK", "MO", "US")
OUTPUTS = ("aggregate", "deidentified-extract", "model")
APPROVALS = ("absent", "valid", "expired")


def expected(provider: str, consumer: str, output: str, approval: str) -> bool:
    """The rule set of docs/policy/README.md, written out independently of the code."""
    if consumer == provider or output == "aggregate" or provider == "HK":
        return True
    return approval == "valid"


def approvals(state: str) -> list[ExportApproval]:
    if state == "absent":
        # An approval for another consumer must not count.
        return [
            ExportApproval("GD-EXP-0", DATASET, "did:web:someone-else", SCENARIO, NOW + timedelta(days=9))
        ]
    expires = NOW + timedelta(days=30) if state == "valid" else NOW - timedelta(seconds=1)
    return [ExportApproval("GD-EXP-1", DATASET, CONSUMER, SCENARIO, expires)]


@pytest.mark.parametrize("approval", APPROVALS)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_transfer_matrix(provider: str, consumer: str, output: str, approval: str) -> None:
    decision = decide_transfer(
        DEFAULT_RULES, provider, consumer, output, DATASET, CONSUMER, SCENARIO, approvals(approval), NOW
    )
    assert decision.allowed is expected(provider, consumer, output, approval), decision.reasons


def test_expired_approval_is_named_in_the_reason() -> None:
    d = decide_transfer(
        DEFAULT_RULES, "CN-GD", "HK", "model", DATASET, CONSUMER, SCENARIO, approvals("expired"), NOW
    )
    assert "export approval GD-EXP-1 expired at 2026-05-31T23:59:59+00:00" in d.reasons[0]


def test_approval_for_another_scenario_does_not_count() -> None:
    other = [ExportApproval("GD-EXP-2", DATASET, CONSUMER, "marketing", NOW + timedelta(days=1))]
    d = decide_transfer(
        DEFAULT_RULES, "MO", "US", "deidentified-extract", DATASET, CONSUMER, SCENARIO, other, NOW
    )
    assert not d.allowed
    assert "none is registered" in d.reasons[0]


def test_hk_record_level_transfer_states_its_safeguards() -> None:
    d = decide_transfer(
        DEFAULT_RULES, "HK", "CN-GD", "deidentified-extract", DATASET, CONSUMER, SCENARIO, [], NOW
    )
    assert d.allowed
    assert "identifies a data subject" in d.reasons[0]


def test_consumer_in_a_subdivision_of_home_is_domestic() -> None:
    rules = {"CN": JurisdictionRules("CN", DEFAULT_RULES["CN-GD"].abroad, "test")}
    assert decide_transfer(rules, "CN", "CN-GD", "model", DATASET, CONSUMER, SCENARIO, [], NOW).allowed


@pytest.mark.parametrize(
    ("provider", "output", "naive"),
    [("US", "aggregate", False), ("CN-GD", "raw", False), ("CN-GD", "aggregate", True)],
    ids=["no-rules-for-jurisdiction", "unknown-output-type", "naive-now"],
)
def test_unknown_inputs_are_denied(provider: str, output: str, naive: bool) -> None:
    now = NOW.replace(tzinfo=None) if naive else NOW
    assert not decide_transfer(
        DEFAULT_RULES, provider, "HK", output, DATASET, CONSUMER, SCENARIO, [], now
    ).allowed


def test_denied_transfer_becomes_a_denying_fact_for_the_evaluator() -> None:
    transfer = decide_transfer(DEFAULT_RULES, "CN-GD", "HK", "model", DATASET, CONSUMER, SCENARIO, [], NOW)
    policy = {"@id": "urn:p", "@type": "Offer", "permission": [{"action": "use"}]}
    d = evaluate(policy, Request(), Facts(cross_border=cross_border_fact(transfer)), NOW)
    assert not d.allowed
    assert "needs an export approval" in d.reasons[0]


def test_allowed_transfer_satisfies_the_cross_border_constraint() -> None:
    transfer = decide_transfer(
        DEFAULT_RULES, "CN-GD", "HK", "aggregate", DATASET, CONSUMER, SCENARIO, [], NOW
    )
    policy = {
        "@id": "urn:p",
        "@type": "Offer",
        "permission": [
            {
                "action": "use",
                "constraint": [
                    {"leftOperand": "crossBorderRules", "operator": "eq", "rightOperand": "satisfied"}
                ],
            }
        ],
    }
    assert evaluate(policy, Request(), Facts(cross_border=cross_border_fact(transfer)), NOW).allowed
