"""The published profile: its schema, the sample policies, and how policies fit inside DSP 2025-1 messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft201909Validator
from referencing import Registry, Resource

from healthspace.policy import PolicyError, check_policy, compile_policy, profile_schema, template
from healthspace.policy.vocabulary import LEFT_OPERANDS, PARTICIPANT_TYPES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "policy"
VALID = sorted((DOCS / "samples" / "valid").glob("*.json"))
INVALID_EXPECTED: dict[str, dict[str, str]] = json.loads(
    (DOCS / "samples" / "invalid" / "expected.json").read_text("utf-8")
)


def load(path: Path) -> Any:
    return json.loads(path.read_text("utf-8"))


def test_published_schema_is_the_one_the_code_uses() -> None:
    assert load(DOCS / "health-odrl-profile.schema.json") == profile_schema()


def test_every_invalid_sample_has_an_expectation() -> None:
    files = {p.name for p in (DOCS / "samples" / "invalid").glob("*.json")} - {"expected.json"}
    assert files == set(INVALID_EXPECTED)


def test_schema_enumerates_the_left_operands_the_evaluator_knows() -> None:
    atomic = profile_schema()["$defs"]["AtomicConstraint"]["properties"]
    assert set(atomic["leftOperand"]["enum"]) == set(LEFT_OPERANDS)


def test_participant_types_are_the_identity_credential_types() -> None:
    from healthspace.identity.credentials import ParticipantType

    assert {t.value for t in ParticipantType} == PARTICIPANT_TYPES


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_sample_is_accepted(path: Path) -> None:
    assert check_policy(load(path)) == []


@pytest.mark.parametrize("name", sorted(INVALID_EXPECTED))
def test_invalid_sample_is_rejected_with_pointer_and_reason(name: str) -> None:
    expected = INVALID_EXPECTED[name]
    with pytest.raises(PolicyError) as caught:
        compile_policy(load(DOCS / "samples" / "invalid" / name))
    found = [(p.pointer, p.message) for p in caught.value.problems]
    assert any(ptr == expected["pointer"] and expected["contains"] in msg for ptr, msg in found), found


def test_policy_error_is_a_422_problem_listing_every_pointer() -> None:
    with pytest.raises(PolicyError) as caught:
        compile_policy(load(DOCS / "samples" / "invalid" / "not-an-integer.json"))
    problem = caught.value.to_problem()
    assert problem["status"] == 422
    assert problem["problems"][0]["pointer"] == "/permission/0/constraint/0/rightOperand"


# --- fitting inside DSP 2025-1 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def dsp_policy_validators(conformance_dir: Path) -> dict[str, Draft201909Validator]:
    schema = load(conformance_dir / "dsp-2025-1" / "negotiation" / "contract-schema.json")
    registry: Registry[Any] = Registry().with_resource(schema["$id"], Resource.from_contents(schema))
    out = {}
    for kind in ("MessageOffer", "Agreement"):
        ref = {"$ref": f"{schema['$id']}#/definitions/{kind}"}
        out[kind] = Draft201909Validator(ref, registry=registry)
    return out


def _dsp_kind(doc: dict[str, Any]) -> str:
    return "MessageOffer" if doc["@type"] == "Offer" else "Agreement"


@pytest.mark.parametrize(
    "path",
    [p for p in VALID if not json.dumps(load(p)).count("odrl:")],
    ids=lambda p: p.name,
)
def test_plain_valid_sample_is_a_valid_dsp_policy(
    path: Path, dsp_policy_validators: dict[str, Draft201909Validator]
) -> None:
    doc = load(path)
    errors = list(dsp_policy_validators[_dsp_kind(doc)].iter_errors(doc))
    assert errors == [], [e.message for e in errors]


@pytest.mark.parametrize("name", ["aggregate-research", "deidentified-extract", "federated-model"])
def test_template_output_is_a_valid_dsp_offer(
    name: str, dsp_policy_validators: dict[str, Draft201909Validator]
) -> None:
    doc = template(name, scenario="diabetes-outcomes-research")
    assert list(dsp_policy_validators["MessageOffer"].iter_errors(doc)) == []


def _dsp_example_policies(conformance_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for f in sorted((conformance_dir / "dsp-2025-1").glob("*/example/*.json")):
        body = load(f)
        for key in ("offer", "agreement"):
            if isinstance(body, dict) and key in body:
                found.append((f.name, body[key]))
    return found


def test_dsp_example_offers_and_agreements_in_our_vocabulary_compile(conformance_dir: Path) -> None:
    examples = _dsp_example_policies(conformance_dir)
    outcome = {name: check_policy(doc) for name, doc in examples}
    # Only the "full" agreement uses terms outside the profile (left operands `partner`, `constraint1`,
    # ..., and `andSequence`): rejected there, at those places.
    assert {n for n, problems in outcome.items() if not problems} == {
        "contract-agreement-message.json",
        "contract-offer-message.json",
        "contract-offer-message_initial.json",
        "contract-request-message.json",
        "contract-request-message_initial.json",
    }
    full = outcome["contract-agreement-message-full.json"]
    unknown_operands = [p for p in full if p.pointer.endswith("/leftOperand")]
    assert len(unknown_operands) == 10
    assert all("is not a term of the profile" in p.message for p in unknown_operands)
    others = {p.pointer for p in full} - {p.pointer for p in unknown_operands}
    assert others == {"/permission/4/constraint/0"}
    assert any("'andSequence' was unexpected" in p.message for p in full)
