"""The gate's compiled-policy cache never changes a decision: keyed by content, invalid stays denied."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

from healthspace.connector.gate import Member, PolicyGate
from healthspace.core.clock import FixedClock
from healthspace.policy import DEFAULT_RULES, Phase, template
from healthspace.policy.registry import CrossBorderSet

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class _Members:
    def get(self, participant_id: str) -> Member | None:
        return Member(participant_id, "university", "HK", frozenset())


class _Rules:
    def current(self) -> CrossBorderSet:
        return CrossBorderSet(DEFAULT_RULES, (), NOW)


def gate() -> PolicyGate:
    return PolicyGate("hk-hospital", "HK", _Members(), _Rules(), FixedClock(NOW), has_consent_registry=True)


def policy(scenario: str) -> dict[str, object]:
    return template(
        "aggregate-research",
        policy_type="Agreement",
        scenario=scenario,
        target="ds",
        assigner="hk-hospital",
        assignee="hk-university",
    )


def decide(g: PolicyGate, doc: dict[str, object], purpose: str) -> bool:
    d = g.decide(
        doc, "ds", "hk-university", Phase.JOB, NOW - timedelta(days=1), "aggregate",
        purpose=purpose, epsilon=0.5, cell_size=10, execution_location="provider",
    )  # fmt: skip
    return d.allowed


def test_a_changed_document_is_decided_on_its_new_content() -> None:
    g = gate()
    doc = policy("diabetes-outcomes-research")
    first = decide(g, doc, "diabetes-outcomes-research")
    changed = copy.deepcopy(doc)
    changed["permission"][0]["constraint"][0]["rightOperand"] = "other-scenario"  # type: ignore[index]
    assert (
        first,
        decide(g, changed, "diabetes-outcomes-research"),
        decide(g, doc, "diabetes-outcomes-research"),
    ) == (
        True,
        False,
        True,
    )


def test_an_invalid_policy_is_denied_every_time() -> None:
    g = gate()
    bad = {"@id": "x", "@type": "Offer", "permission": [{"action": "publish"}]}
    reasons = [
        g.decide(bad, "ds", "hk-university", Phase.JOB, NOW, "aggregate").decision.reasons for _ in range(2)
    ]
    assert all(any("policy rejected" in r for r in rs) for rs in reasons)
