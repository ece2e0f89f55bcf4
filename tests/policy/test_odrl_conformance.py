"""The 68 cases of the ODRL test suite (SolidLab), translated into our profile and judged by our evaluator.

Each case names a policy, a request and a state of the world (SotW) in Turtle, and the compliance report
an evaluator must produce. We translate the policy into compact JSON (the profile's form), the request
into a `Request` and the SotW into `Facts` and `now`, run `explain` and compare with the expected
report: the rule's activation state, its target/party/action premises, and every constraint report
(matched by the constraint's IRI).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from rdflib import RDF, Graph, Literal, Namespace, URIRef
from rdflib.term import Node

from healthspace.policy import DutyState, Facts, Request, compile_policy, explain
from healthspace.policy.evaluator import ConstraintResult
from tests.conftest import CONFORMANCE

SUITE = CONFORMANCE / "odrl-test-suite"
ODRL = Namespace("http://www.w3.org/ns/odrl/2/")
EX = Namespace("http://example.org/")
REPORT = Namespace("https://w3id.org/force/compliance-report#")
DCT = Namespace("http://purl.org/dc/terms/")
TEMP = Namespace("http://example.com/request/")

CASES = sorted(p.name for p in (SUITE / "test_cases").glob("*.ttl")) or ["no-cases-found"]

# Policies 1 and 2 state rules without an action ("everybody can do everything / nothing"). DSP 2025-1
# (negotiation/contract-schema.json, Rule.required = ["action"]) and ODRL 2.2 (every Rule has an action)
# require one, so our profile rejects these policies and the evaluator denies: the suite expects the
# action-less permission to match every request (and the prohibition to be reported Active).
ACTIONLESS = (
    "policy-1/2 has a rule with no action, which DSP 2025-1 and ODRL 2.2 require; the profile rejects "
    "the policy (fail closed) where the suite expects an action-less rule to match every request"
)
XFAIL = {
    f"testcase-00{i}-{s}.ttl": ACTIONLESS
    for i, s in zip(range(1, 7), ["alice", "bob", "bob-write-y"] * 2, strict=True)
}


def _local(node: Node | None) -> str:
    text = str(node)
    return text.rsplit("/", 1)[-1].rsplit("#", 1)[-1]


def _sources() -> dict[str, tuple[str, str, str]]:
    index = Graph().parse(SUITE / "index.ttl")
    out: dict[str, tuple[str, str, str]] = {}
    for case in index.subjects(EX.expectedReportSource, None):
        out[_local(index.value(case, EX.expectedReportSource))] = (
            _local(index.value(case, EX.policySource)),
            _local(index.value(case, EX.requestSource)),
            _local(index.value(case, EX.sotwSource)),
        )
    return out


def _term(g: Graph, node: Node | None) -> Any:
    return {"@id": str(node)} if isinstance(node, URIRef) else str(node)


def _constraint(g: Graph, node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {"@id": str(node)}
    for logical in ("and", "or", "xone"):
        members = list(g.objects(node, ODRL[logical]))
        if members:
            out[logical] = [_constraint(g, m) for m in sorted(members, key=str)]
            return out
    out["leftOperand"] = _local(g.value(node, ODRL.leftOperand))
    out["operator"] = _local(g.value(node, ODRL.operator))
    out["rightOperand"] = _term(g, g.value(node, ODRL.rightOperand))
    return out


def _rule(g: Graph, node: Node) -> dict[str, Any]:
    rule: dict[str, Any] = {"@id": str(node)}
    action = g.value(node, ODRL.action)
    if action is not None:
        rule["action"] = _local(action)
    for key in ("target", "assignee"):
        value = g.value(node, ODRL[key])
        if value is not None:
            rule[key] = str(value)
    constraints = [_constraint(g, c) for c in g.objects(node, ODRL.constraint)]
    if constraints:
        rule["constraint"] = constraints
    duties = [{"@id": str(d), "action": _local(g.value(d, ODRL.action))} for d in g.objects(node, ODRL.duty)]
    if duties:
        rule["duty"] = duties
    return rule


def translate_policy(path: Path) -> dict[str, Any]:
    g = Graph().parse(path)
    policy = next(s for t in ("Set", "Offer", "Agreement") for s in g.subjects(RDF.type, ODRL[t]))
    doc: dict[str, Any] = {"@id": str(policy), "@type": _local(g.value(policy, RDF.type))}
    for kind in ("permission", "prohibition"):
        rules = [_rule(g, r) for r in g.objects(policy, ODRL[kind])]
        if rules:
            doc[kind] = rules
    return doc


def translate_request(path: Path) -> Request:
    g = Graph().parse(path)
    request = next(g.subjects(RDF.type, ODRL.Request))
    rule = g.value(request, ODRL.permission)
    return Request(
        action=_local(g.value(rule, ODRL.action)),
        target=str(g.value(rule, ODRL.target)),
        consumer_id=str(g.value(rule, ODRL.assignee)),
    )


_DEONTIC = {"Fulfilled": DutyState.FULFILLED, "Violated": DutyState.VIOLATED, "NonSet": DutyState.NOT_SET}


def translate_sotw(path: Path, request: Request) -> tuple[Facts, datetime]:
    g = Graph().parse(path)
    issued = g.value(TEMP.currentTime, DCT.issued)
    assert isinstance(issued, Literal)
    now = datetime.fromisoformat(str(issued))
    duties = {
        str(g.value(r, REPORT.rule)): _DEONTIC[_local(g.value(r, REPORT.deonticState))]
        for r in g.subjects(RDF.type, REPORT.DutyReport)
    }
    parties = frozenset(str(o) for o in g.objects(URIRef(str(request.consumer_id)), ODRL.partOf))
    assets = frozenset(str(o) for o in g.objects(URIRef(str(request.target)), ODRL.partOf))
    return Facts(duty_states=duties, party_collections=parties, asset_collections=assets), now


def _flatten(results: tuple[ConstraintResult, ...]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for r in results:
        if r.uid is not None:
            out[r.uid] = r.satisfied
        out.update(_flatten(r.children))
    return out


@pytest.fixture(scope="module")
def sources() -> dict[str, tuple[str, str, str]]:
    return _sources()


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=XFAIL[c])) if c in XFAIL else c
        for c in CASES
    ],
)
def test_odrl_case_matches_expected_report(case: str, conformance_dir: Path, sources: dict[str, Any]) -> None:
    # Prepare
    suite = conformance_dir / "odrl-test-suite"
    policy_file, request_file, sotw_file = sources[case]
    policy = compile_policy(translate_policy(suite / "policies" / policy_file))
    request = translate_request(suite / "requests" / request_file)
    facts, now = translate_sotw(suite / "sotw" / sotw_file, request)
    expected = Graph().parse(suite / "test_cases" / case)
    (rule_report,) = [
        s for t in (REPORT.PermissionReport, REPORT.ProhibitionReport) for s in expected.subjects(RDF.type, t)
    ]
    # Execute
    explanation = explain(policy, request, facts, now)
    # Assert: the rule's kind and activation
    rule_iri = str(expected.value(rule_report, REPORT.rule))
    (result,) = [r for r in explanation.rules if r.uid == rule_iri]
    assert result.kind.capitalize() + "Report" == _local(expected.value(rule_report, RDF.type))
    assert result.active == (expected.value(rule_report, REPORT.activationState) == REPORT.Active)
    # Assert: premises. Each case has one rule, so every Target/Party/Action report is that rule's (case
    # 065 lists premise IRIs that are not the IRIs of its premise reports).
    ours = {"TargetReport": result.target, "PartyReport": result.party, "ActionReport": result.action}
    for kind in ("TargetReport", "PartyReport", "ActionReport"):
        reports = list(expected.subjects(RDF.type, REPORT[kind]))
        if not reports:
            assert ours[kind] is None or kind == "ActionReport"
            continue
        (report,) = reports
        assert ours[kind] == (expected.value(report, REPORT.satisfactionState) == REPORT.Satisfied), kind
    # Assert: every constraint the report judges, ours judges the same
    judged = _flatten(result.constraints)
    for report in expected.subjects(RDF.type, REPORT.ConstraintReport):
        iri = str(expected.value(report, REPORT.constraint))
        assert judged[iri] == (expected.value(report, REPORT.satisfactionState) == REPORT.Satisfied), iri
    # Assert: the decision agrees with the report (allowed iff an active permission, no active prohibition)
    permitted = result.kind == "permission" and result.active
    assert explanation.decision.allowed == permitted, explanation.decision.reasons
