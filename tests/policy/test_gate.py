"""The policy gate: an agreement's policy with the cross-border rules as a fact, decided per use phase."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from healthspace.policy import DEFAULT_RULES, ExportApproval, Facts, Phase, Request, template
from healthspace.policy.gate import UseDecision, decide_use, scenarios_of

NOW = datetime(2026, 3, 1, tzinfo=UTC)
SCENARIO = "diabetes-outcomes-research"
EXTRACT = template("deidentified-extract", scenario=SCENARIO)
AGGREGATE = template("aggregate-research", scenario=SCENARIO)
MODEL = template("federated-model", scenario=SCENARIO)


def _request(jurisdiction: str = "HK", **over: object) -> Request:
    base: dict[str, object] = {
        "target": "ds-1",
        "consumer_id": "hku",
        "consumer_type": "university",
        "consumer_jurisdiction": jurisdiction,
        "phase": Phase.NEGOTIATION,
    }
    base.update(over)
    return Request(**base)  # type: ignore[arg-type]


def _decide(
    policy: dict[str, object],
    request: Request,
    provider: str = "CN-GD",
    approvals: tuple[ExportApproval, ...] = (),
) -> UseDecision:
    return decide_use(
        policy,
        request,
        Facts(consent_obtained=True),
        provider_jurisdiction=provider,
        rules=DEFAULT_RULES,
        approvals=approvals,
        now=NOW,
    )


def test_the_scenario_is_the_policys_purpose() -> None:
    assert scenarios_of(EXTRACT) == {SCENARIO}


def test_a_policy_without_a_scenario_is_denied() -> None:
    policy = {"@id": "urn:p:1", "@type": "Offer", "permission": [{"action": "use"}]}
    d = decide_use(
        policy, _request(), Facts(), provider_jurisdiction="CN-GD", rules=DEFAULT_RULES, approvals=(), now=NOW
    )
    assert not d.allowed
    assert "names no scenario" in d.decision.reasons[0]


def test_record_level_output_from_cn_gd_needs_an_approval() -> None:
    d = _decide(EXTRACT, _request())
    assert not d.allowed


def test_an_approval_for_the_dataset_consumer_and_scenario_allows_it() -> None:
    approval = ExportApproval("CAC-1", "ds-1", "hku", SCENARIO, NOW + timedelta(days=1))
    d = _decide(EXTRACT, _request(), approvals=(approval,))
    assert (d.allowed, d.output_types) == (True, ("deidentified-extract",))


def test_an_agreement_allowing_model_and_aggregate_holds_across_the_border_for_aggregates_only() -> None:
    d = _decide(MODEL, _request())
    assert (d.allowed, d.output_types) == (True, ("aggregate",))


def test_at_the_job_the_jobs_own_output_type_is_decided() -> None:
    job = _request(phase=Phase.JOB, output_type="model", epsilon=0.5, execution_location="provider")
    d = decide_use(
        MODEL,
        job,
        Facts(agreement_start=NOW - timedelta(days=1)),
        provider_jurisdiction="CN-GD",
        rules=DEFAULT_RULES,
        approvals=(),
        now=NOW,
    )
    assert not d.allowed
    assert "needs an export approval" in d.decision.reasons[0]


def test_a_job_without_an_output_type_is_denied() -> None:
    d = _decide(AGGREGATE, _request(phase=Phase.JOB))
    assert not d.allowed


@pytest.mark.parametrize(
    ("provider", "consumer", "policy", "allowed"),
    [
        ("CN-GD", "CN-GD", EXTRACT, True),
        ("CN-GD", "HK", AGGREGATE, True),
        ("HK", "CN-GD", EXTRACT, True),
        ("MO", "HK", EXTRACT, False),
        ("MO", "HK", AGGREGATE, True),
        ("SG", "HK", AGGREGATE, False),
    ],
)
def test_the_gate_agrees_with_the_pure_cross_border_matrix(
    provider: str, consumer: str, policy: dict[str, object], allowed: bool
) -> None:
    assert _decide(policy, _request(consumer), provider).allowed is allowed


def test_an_unknown_consumer_jurisdiction_is_denied() -> None:
    d = _decide(AGGREGATE, _request(consumer_jurisdiction=None))
    assert not d.allowed
