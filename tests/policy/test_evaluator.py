"""The evaluator: each left operand and operator, fail-closed behaviour, prohibitions, duties, logic."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from healthspace.policy import (
    CrossBorderFact,
    DutyState,
    Facts,
    Phase,
    Request,
    compile_policy,
    evaluate,
)
from healthspace.policy.compiler import Ctx

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
START = datetime(2026, 1, 1, tzinfo=UTC)


def c(left: str, op: str, right: Any) -> dict[str, Any]:
    return {"leftOperand": left, "operator": op, "rightOperand": right}


def offer(*constraints: dict[str, Any], **rule: Any) -> dict[str, Any]:
    perm: dict[str, Any] = {"action": "use", **rule}
    if constraints:
        perm["constraint"] = list(constraints)
    return {"@id": "urn:test:policy", "@type": "Offer", "permission": [perm]}


FULL = Request(
    action="use",
    target="urn:dataset:t2d",
    purpose="diabetes-outcomes-research",
    consumer_id="did:web:hku",
    consumer_type="university",
    consumer_roles=frozenset({"data-consumer", "researcher"}),
    consumer_jurisdiction="HK",
    output_type="aggregate",
    epsilon=0.5,
    k=10,
    cell_size=10,
    execution_location="provider",
)
FACTS = Facts(use_count=4, epsilon_spent=1.0, agreement_start=START)

# (left operand, operator, right operand, request/facts changes, allowed?) — expected values worked out
# by hand from the profile's definitions (README): count is use_count + 1 = 5, budget is 1.0 + 0.5 = 1.5,
# elapsed time is 151.5 days.
CASES: list[tuple[str, str, Any, dict[str, Any], bool]] = [
    ("purpose", "eq", "diabetes-outcomes-research", {}, True),
    ("purpose", "eq", "marketing", {}, False),
    ("purpose", "neq", "marketing", {}, True),
    ("purpose", "neq", "diabetes-outcomes-research", {}, False),
    ("purpose", "isAnyOf", ["x", "diabetes-outcomes-research"], {}, True),
    ("purpose", "isAnyOf", ["x", "y"], {}, False),
    ("purpose", "isNoneOf", ["x", "y"], {}, True),
    ("purpose", "isNoneOf", ["diabetes-outcomes-research"], {}, False),
    ("dateTime", "lt", "2026-06-01T12:00:01Z", {}, True),
    ("dateTime", "lt", "2026-06-01T12:00:00Z", {}, False),
    ("dateTime", "lteq", "2026-06-01T12:00:00Z", {}, True),
    ("dateTime", "gt", "2026-06-01T11:59:59Z", {}, True),
    ("dateTime", "gteq", "2026-06-01T12:00:01Z", {}, False),
    ("dateTime", "eq", "2026-06-01T20:00:00+08:00", {}, True),
    ("dateTime", "neq", "2026-06-01T20:00:00+08:00", {}, False),
    ("elapsedTime", "lteq", "P152D", {}, True),
    ("elapsedTime", "lteq", "P151D", {}, False),
    ("elapsedTime", "gt", "P21W", {}, True),
    ("elapsedTime", "lt", "P151DT12H", {}, False),
    ("count", "lteq", "5", {}, True),
    ("count", "lteq", "4", {}, False),
    ("count", "lt", "5", {}, False),
    ("count", "eq", "5", {}, True),
    ("jurisdiction", "eq", "HK", {}, True),
    ("jurisdiction", "isAnyOf", ["CN-GD", "MO"], {}, False),
    ("jurisdiction", "isPartOf", "CN", {"consumer_jurisdiction": "CN-GD"}, True),
    ("jurisdiction", "isPartOf", "CN", {}, False),
    ("jurisdiction", "isNoneOf", ["US"], {}, True),
    ("participantType", "eq", "university", {}, True),
    ("participantType", "isA", "non-commercial", {}, True),
    ("participantType", "isA", "commercial", {}, False),
    ("participantType", "isA", "commercial", {"consumer_type": "company"}, True),
    ("role", "hasPart", "researcher", {}, True),
    ("role", "hasPart", "auditor", {}, False),
    ("role", "isAllOf", ["researcher", "data-consumer"], {}, True),
    ("role", "isAllOf", ["researcher", "auditor"], {}, False),
    ("role", "isAnyOf", ["auditor", "researcher"], {}, True),
    ("role", "isAnyOf", ["auditor", "operator"], {}, False),
    ("role", "isNoneOf", ["auditor"], {}, True),
    ("role", "isNoneOf", ["auditor", "researcher"], {}, False),
    ("outputType", "eq", "aggregate", {}, True),
    ("outputType", "eq", "model", {}, False),
    ("outputType", "isAnyOf", ["model", "deidentified-extract"], {}, False),
    ("minCellSize", "gteq", "10", {}, True),
    ("minCellSize", "gteq", "11", {}, False),
    ("privacyBudget", "lteq", "1.5", {}, True),
    ("privacyBudget", "lteq", "1.4", {}, False),
    ("privacyBudget", "lt", "1.5", {}, False),
    ("kAnonymity", "gteq", "5", {}, True),
    ("kAnonymity", "gt", "10", {}, False),
    ("executionLocation", "eq", "provider", {}, True),
    ("executionLocation", "isPartOf", "CN-GD", {"execution_location": "CN-GD"}, True),
    ("executionLocation", "neq", "provider", {}, False),
]


@pytest.mark.parametrize(
    ("left", "op", "right", "changes", "allowed"),
    CASES,
    ids=[f"{a}-{b}-{i}" for i, (a, b, *_rest) in enumerate(CASES)],
)
def test_operand_operator(left: str, op: str, right: Any, changes: dict[str, Any], allowed: bool) -> None:
    request = replace(FULL, **changes)
    decision = evaluate(offer(c(left, op, right)), request, FACTS, NOW)
    assert decision.allowed is allowed, decision.reasons


def test_purpose_reason_names_both_values() -> None:
    d = evaluate(
        offer(c("purpose", "eq", "diabetes-outcomes-research")),
        replace(FULL, purpose="marketing"),
        FACTS,
        NOW,
    )
    assert "purpose 'marketing' is not 'diabetes-outcomes-research'" in d.reasons[0]


def test_budget_reason_states_request_spent_and_limit() -> None:
    d = evaluate(
        offer(c("privacyBudget", "lteq", "3")),
        replace(FULL, epsilon=1.5),
        replace(FACTS, epsilon_spent=2.0),
        NOW,
    )
    assert "privacy budget: requested ε=1.5 with 2.0 spent exceeds ε ≤ 3" in d.reasons[0]


def test_count_reason_states_the_use_number() -> None:
    d = evaluate(offer(c("count", "lteq", "4")), FULL, FACTS, NOW)
    assert "this would be use 5, which exceeds ≤ 4" in d.reasons[0]


def test_allowed_decision_names_the_permission() -> None:
    d = evaluate(offer(c("purpose", "eq", "diabetes-outcomes-research")), FULL, FACTS, NOW)
    assert d.allowed
    assert d.reasons == ("permission /permission/0 (use) applies",)


# --- actions, targets, parties ---------------------------------------------------------------------


def test_permitted_use_covers_compute() -> None:
    assert evaluate(offer(), replace(FULL, action="compute"), FACTS, NOW).allowed


def test_permitted_read_does_not_cover_use() -> None:
    d = evaluate({**offer(), "permission": [{"action": "read"}]}, FULL, FACTS, NOW)
    assert not d.allowed
    assert "action 'use' is not within 'read'" in d.reasons[0]


def test_policy_target_binds_the_request_target() -> None:
    policy = {**offer(), "target": "urn:dataset:other"}
    assert not evaluate(policy, FULL, FACTS, NOW).allowed


def test_assignee_collection_membership_satisfies_party() -> None:
    policy = offer(assignee="urn:group:hk-universities")
    facts = replace(FACTS, party_collections=frozenset({"urn:group:hk-universities"}))
    assert evaluate(policy, FULL, facts, NOW).allowed
    assert not evaluate(policy, FULL, FACTS, NOW).allowed


# --- logical constraints ---------------------------------------------------------------------------


YES = c("purpose", "eq", "diabetes-outcomes-research")
NO = c("outputType", "eq", "model")


@pytest.mark.parametrize(
    ("logic", "members", "allowed"),
    [
        ("and", [YES, YES], True),
        ("and", [YES, NO], False),
        ("or", [NO, YES], True),
        ("or", [NO, NO], False),
        ("xone", [YES, NO], True),
        ("xone", [YES, YES], False),
        ("xone", [NO, NO], False),
    ],
)
def test_logical_constraint(logic: str, members: list[dict[str, Any]], allowed: bool) -> None:
    assert evaluate(offer({logic: members}), FULL, FACTS, NOW).allowed is allowed


# --- prohibitions ----------------------------------------------------------------------------------


def test_prohibition_overrides_permission() -> None:
    policy = {**offer(), "prohibition": [{"action": "use", "constraint": [c("jurisdiction", "eq", "HK")]}]}
    d = evaluate(policy, FULL, FACTS, NOW)
    assert not d.allowed
    assert d.reasons[0].startswith("prohibition /prohibition/0 (use) applies")


def test_prohibition_of_narrower_action_blocks_broader_request() -> None:
    policy = {**offer(), "prohibition": [{"action": "read"}]}
    assert not evaluate(policy, FULL, FACTS, NOW).allowed


def test_prohibition_whose_constraint_fails_does_not_block() -> None:
    policy = {**offer(), "prohibition": [{"action": "use", "constraint": [c("jurisdiction", "eq", "US")]}]}
    assert evaluate(policy, FULL, FACTS, NOW).allowed


def test_no_applicable_permission_denies() -> None:
    policy = {"@id": "urn:p", "@type": "Offer", "prohibition": [{"action": "sell"}]}
    d = evaluate(policy, FULL, FACTS, NOW)
    assert not d.allowed
    assert d.reasons == ("the policy grants no permission",)


# --- duties ----------------------------------------------------------------------------------------


def test_duties_are_returned_with_deadlines() -> None:
    policy = offer(
        duty=[
            {"action": "log"},
            {"@id": "urn:duty:del", "action": "delete", "constraint": [c("elapsedTime", "lteq", "P30D")]},
            {"action": "delete", "constraint": [c("dateTime", "lt", "2027-01-01T00:00:00Z")]},
        ]
    )
    policy["obligation"] = [{"action": "inform"}]
    d = evaluate(policy, FULL, FACTS, NOW)
    assert d.allowed
    assert [(x.action, x.due) for x in d.duties] == [
        ("log", None),
        ("delete", START + timedelta(days=30)),
        ("delete", datetime(2027, 1, 1, tzinfo=UTC)),
        ("inform", None),
    ]
    assert d.duties[1].uid == "urn:duty:del"
    assert d.duties[1].source == "/permission/0/duty/1"


def test_violated_duty_voids_the_permission() -> None:
    policy = offer(duty=[{"@id": "urn:duty:1", "action": "compensate"}])
    facts = replace(FACTS, duty_states={"urn:duty:1": DutyState.VIOLATED})
    d = evaluate(policy, FULL, facts, NOW)
    assert not d.allowed
    assert "recorded as violated" in d.reasons[0]


def test_obtain_consent_is_a_precondition() -> None:
    policy = offer(duty=[{"action": "obtainConsent"}])
    assert not evaluate(policy, FULL, FACTS, NOW).allowed
    assert evaluate(policy, FULL, replace(FACTS, consent_obtained=True), NOW).allowed


# --- phases ----------------------------------------------------------------------------------------


def test_catalog_phase_defers_job_parameters_to_the_job() -> None:
    policy = offer(
        c("privacyBudget", "lteq", "3"), c("minCellSize", "gteq", "10"), c("elapsedTime", "lteq", "P1D")
    )
    early = Request(action="use", purpose="p", phase=Phase.CATALOG)
    d = evaluate(policy, early, Facts(), NOW)
    assert d.allowed
    assert "privacy budget constraint deferred to the job phase" in d.reasons


def test_job_phase_denies_missing_job_parameters() -> None:
    policy = offer(c("privacyBudget", "lteq", "3"))
    d = evaluate(policy, replace(FULL, epsilon=None), FACTS, NOW)
    assert not d.allowed
    assert "states no ε" in d.reasons[0]


def test_deferred_value_does_not_trigger_a_prohibition_early() -> None:
    policy = {**offer(), "prohibition": [{"action": "use", "constraint": [c("outputType", "eq", "model")]}]}
    assert evaluate(policy, Request(phase=Phase.NEGOTIATION), Facts(), NOW).allowed


# --- cross-border facts ----------------------------------------------------------------------------


def test_negative_cross_border_fact_denies_whatever_the_policy_says() -> None:
    facts = replace(FACTS, cross_border=CrossBorderFact(False, "needs an export approval"))
    d = evaluate(offer(), FULL, facts, NOW)
    assert not d.allowed
    assert d.reasons == ("cross-border rules: needs an export approval",)


def test_cross_border_constraint_needs_an_assessment_at_job_time() -> None:
    policy = offer(c("crossBorderRules", "eq", "satisfied"))
    assert not evaluate(policy, FULL, FACTS, NOW).allowed
    ok = replace(FACTS, cross_border=CrossBorderFact(True, "domestic"))
    assert evaluate(policy, FULL, ok, NOW).allowed


# --- fail closed -----------------------------------------------------------------------------------


def test_malformed_policy_denies_with_pointer() -> None:
    d = evaluate(offer(c("purpose", "lt", "x")), FULL, FACTS, NOW)
    assert not d.allowed
    assert d.reasons[0].startswith("policy rejected: /permission/0/constraint/0/operator:")


def test_unknown_left_operand_denies() -> None:
    d = evaluate(offer(c("weather", "eq", "sunny")), FULL, FACTS, NOW)
    assert not d.allowed
    assert "/permission/0/constraint/0/leftOperand" in d.reasons[0]


def test_unknown_operator_denies() -> None:
    d = evaluate(offer(c("count", "approximately", "5")), FULL, FACTS, NOW)
    assert not d.allowed
    assert "/permission/0/constraint/0/operator" in d.reasons[0]


def test_non_object_policy_denies() -> None:
    assert not evaluate(["not", "a", "policy"], FULL, FACTS, NOW).allowed  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"cell_size": "10"}, "expected integer"),
        ({"purpose": 42}, "expected term"),
        ({"consumer_roles": ["researcher"]}, "expected term set"),
        ({"epsilon": "0.5"}, "must be numbers"),
        ({"epsilon": float("nan")}, "finite"),
    ],
)
def test_wrongly_typed_request_value_denies(changes: dict[str, Any], needle: str) -> None:
    policy = offer(
        c("minCellSize", "gteq", "5"),
        c("purpose", "neq", "x"),
        c("role", "isNoneOf", ["auditor"]),
        c("privacyBudget", "lteq", "3"),
    )
    d = evaluate(policy, replace(FULL, **changes), FACTS, NOW)
    assert not d.allowed
    assert needle in d.reasons[0]


def test_missing_value_in_prohibition_denies() -> None:
    policy = {**offer(), "prohibition": [{"action": "use", "constraint": [c("jurisdiction", "eq", "US")]}]}
    d = evaluate(policy, replace(FULL, consumer_jurisdiction=None), FACTS, NOW)
    assert not d.allowed
    assert "consumer jurisdiction: the request states none" in d.reasons[0]


def test_unknown_request_action_denies() -> None:
    d = evaluate(offer(), replace(FULL, action="exfiltrate"), FACTS, NOW)
    assert not d.allowed
    assert "'exfiltrate' is not a term" in d.reasons[0]


def test_naive_now_denies() -> None:
    assert not evaluate(offer(), FULL, FACTS, NOW.replace(tzinfo=None)).allowed


def test_elapsed_time_without_agreement_start_denies_at_job_time() -> None:
    d = evaluate(offer(c("elapsedTime", "lteq", "P30D")), FULL, replace(FACTS, agreement_start=None), NOW)
    assert not d.allowed


def test_evaluator_exception_denies() -> None:
    compiled = compile_policy(offer(c("purpose", "eq", "x")))

    def broken(ctx: Ctx) -> str | None:
        raise RuntimeError("boom")

    rule = compiled.permissions[0]
    sabotaged = replace(
        compiled, permissions=(replace(rule, constraints=(replace(rule.constraints[0], check=broken),)),)
    )
    d = evaluate(sabotaged, FULL, FACTS, NOW)
    assert not d.allowed
    assert d.reasons[0].startswith("evaluator error (RuntimeError: boom)")


def test_compiled_and_raw_policy_decide_alike() -> None:
    raw = offer(c("purpose", "eq", "diabetes-outcomes-research"), c("count", "lteq", "3"))
    assert evaluate(compile_policy(raw), FULL, FACTS, NOW) == evaluate(raw, FULL, FACTS, NOW)


def test_odrl_prefixed_policy_decides_like_plain_and_points_into_what_was_written() -> None:
    plain = offer(c("purpose", "eq", "x"))
    prefixed = {
        "@id": "urn:test:policy",
        "@type": "odrl:Offer",
        "odrl:permission": [
            {
                "odrl:action": {"@id": "odrl:use"},
                "odrl:constraint": [
                    {"odrl:leftOperand": "odrl:purpose", "odrl:operator": "odrl:eq", "odrl:rightOperand": "x"}
                ],
            }
        ],
    }
    for purpose in ("x", "y"):
        request = replace(FULL, purpose=purpose)
        assert evaluate(prefixed, request, FACTS, NOW).allowed is evaluate(plain, request, FACTS, NOW).allowed
    denied = evaluate(prefixed, replace(FULL, purpose="y"), FACTS, NOW)
    assert denied.reasons[0].startswith("permission /odrl:permission/0 (use):")
