"""Negotiation: is a candidate (counter-offer or agreement) at least as restrictive as the reference offer?"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from healthspace.policy import is_at_least_as_restrictive, template


def c(left: str, op: str, right: Any) -> dict[str, Any]:
    return {"leftOperand": left, "operator": op, "rightOperand": right}


REFERENCE: dict[str, Any] = {
    "@id": "urn:offer:1",
    "@type": "Offer",
    "permission": [
        {
            "action": "use",
            "constraint": [
                c("purpose", "isAnyOf", ["diabetes-outcomes-research", "hypertension-registry"]),
                c("privacyBudget", "lteq", "3"),
                c("minCellSize", "gteq", "10"),
                c("dateTime", "lt", "2027-01-01T00:00:00Z"),
                c("jurisdiction", "isPartOf", "CN"),
                {"or": [c("outputType", "eq", "aggregate"), c("outputType", "eq", "model")]},
            ],
            "duty": [{"action": "delete", "constraint": [c("dateTime", "lteq", "2027-02-01T00:00:00Z")]}],
        }
    ],
    "prohibition": [{"action": "transfer"}],
    "obligation": [{"action": "log"}],
}


def variant(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(REFERENCE)
    perm = doc["permission"][0]
    for index, constraint in changes.pop("replace", {}).items():
        perm["constraint"][index] = constraint
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def test_identical_policy_is_acceptable() -> None:
    assert is_at_least_as_restrictive(REFERENCE, REFERENCE).allowed


def test_agreement_adding_parties_and_target_is_acceptable() -> None:
    agreement = variant(
        **{"@type": "Agreement", "target": "urn:ds:1", "assigner": "did:a", "assignee": "did:b"}
    )
    assert is_at_least_as_restrictive(agreement, REFERENCE).allowed


@pytest.mark.parametrize(
    ("index", "narrower"),
    [
        (0, c("purpose", "eq", "diabetes-outcomes-research")),
        (0, c("purpose", "isAnyOf", ["hypertension-registry"])),
        (1, c("privacyBudget", "lteq", "1.5")),
        (1, c("privacyBudget", "lt", "3")),
        (2, c("minCellSize", "gteq", "20")),
        (3, c("dateTime", "lteq", "2026-12-01T00:00:00Z")),
        (4, c("jurisdiction", "eq", "CN-GD")),
        (4, c("jurisdiction", "isPartOf", "CN-GD")),
        (5, c("outputType", "eq", "aggregate")),
        (5, {"and": [c("outputType", "eq", "model"), c("kAnonymity", "gteq", "5")]}),
    ],
)
def test_narrowed_constraint_is_acceptable(index: int, narrower: dict[str, Any]) -> None:
    d = is_at_least_as_restrictive(variant(replace={index: narrower}), REFERENCE)
    assert d.allowed, d.reasons


@pytest.mark.parametrize(
    ("index", "broader"),
    [
        (0, c("purpose", "isAnyOf", ["diabetes-outcomes-research", "marketing"])),
        (0, c("purpose", "neq", "marketing")),
        (1, c("privacyBudget", "lteq", "3.5")),
        (2, c("minCellSize", "gteq", "5")),
        (2, c("minCellSize", "gt", "9")),
        (3, c("dateTime", "lteq", "2027-01-01T00:00:00Z")),
        (4, c("jurisdiction", "isAnyOf", ["CN-GD", "HK"])),
        (5, c("outputType", "isAnyOf", ["aggregate", "deidentified-extract"])),
        (5, {"xone": [c("outputType", "eq", "aggregate"), c("outputType", "eq", "model")]}),
    ],
)
def test_widened_or_unknown_constraint_is_not_acceptable(index: int, broader: dict[str, Any]) -> None:
    d = is_at_least_as_restrictive(variant(replace={index: broader}), REFERENCE)
    assert not d.allowed
    assert f"/permission/0/constraint/{index}" in d.reasons[0]


def test_dropped_constraint_is_not_acceptable() -> None:
    doc = variant()
    del doc["permission"][0]["constraint"][1]
    d = is_at_least_as_restrictive(doc, REFERENCE)
    assert not d.allowed
    assert "privacy budget" in d.reasons[0]


def test_broader_action_is_not_acceptable() -> None:
    doc = variant()
    ref = variant()
    ref["permission"][0]["action"] = "read"
    assert not is_at_least_as_restrictive(doc, ref).allowed
    assert is_at_least_as_restrictive(ref, doc).allowed


def test_dropped_prohibition_is_not_acceptable() -> None:
    d = is_at_least_as_restrictive(variant(prohibition=None), REFERENCE)
    assert not d.allowed
    assert "prohibition /prohibition/0 (transfer) of the reference is dropped" in d.reasons[0]


def test_narrowed_prohibition_is_not_acceptable() -> None:
    d = is_at_least_as_restrictive(variant(prohibition=[{"action": "sell"}]), REFERENCE)
    assert not d.allowed


def test_broader_prohibition_is_acceptable() -> None:
    assert is_at_least_as_restrictive(
        variant(prohibition=[{"action": "transfer"}, {"action": "derive"}]), REFERENCE
    ).allowed


def test_dropped_duty_is_not_acceptable() -> None:
    doc = variant()
    del doc["permission"][0]["duty"]
    d = is_at_least_as_restrictive(doc, REFERENCE)
    assert not d.allowed
    assert "drops the duty 'delete'" in d.reasons[0]


def test_earlier_deletion_deadline_is_acceptable_later_is_not() -> None:
    earlier, later = variant(), variant()
    earlier["permission"][0]["duty"][0]["constraint"][0]["rightOperand"] = "2027-01-15T00:00:00Z"
    later["permission"][0]["duty"][0]["constraint"][0]["rightOperand"] = "2027-03-01T00:00:00Z"
    assert is_at_least_as_restrictive(earlier, REFERENCE).allowed
    assert not is_at_least_as_restrictive(later, REFERENCE).allowed


def test_dropped_obligation_is_not_acceptable() -> None:
    assert not is_at_least_as_restrictive(variant(obligation=None), REFERENCE).allowed


def test_changed_target_is_not_acceptable() -> None:
    ref = variant(target="urn:ds:1")
    assert not is_at_least_as_restrictive(variant(target="urn:ds:2"), ref).allowed


def test_malformed_candidate_is_not_acceptable() -> None:
    d = is_at_least_as_restrictive({"@id": "x", "@type": "Offer"}, REFERENCE)
    assert not d.allowed
    assert d.reasons[0].startswith("policy rejected:")


def test_template_with_tighter_parameters_is_acceptable_against_looser() -> None:
    loose = template("aggregate-research", scenario="s", k=10, epsilon=3, valid_for_days=365)
    tight = template("aggregate-research", scenario="s", k=20, epsilon=1, valid_for_days=90, max_uses=50)
    assert is_at_least_as_restrictive(tight, loose).allowed
    assert not is_at_least_as_restrictive(loose, tight).allowed
