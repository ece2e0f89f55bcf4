"""The health ODRL profile and its pure evaluator: (policy, request, facts, now) -> Decision.

compile_policy(doc)            validate against the profile (PolicyError with JSON pointers) and compile
check_policy(doc)              the conformance problems of doc, [] when it conforms
evaluate(policy, request, facts, now) -> Decision(allowed, reasons, duties)
explain(...)                   the same with every rule's premises and constraint results
is_at_least_as_restrictive(candidate, reference) -> Decision   (negotiation)
crossborder.decide_transfer(...) -> Decision; cross_border_fact(decision) -> Facts.cross_border
template(name, **params)       a policy from a named steward template
gate.decide_use(...)           policy + cross-border rules for one use, per phase (the connector's gate)
registry                       the authority's signed rule set and export approvals; CrossBorderCache
"""

from healthspace.policy.compiler import CompiledPolicy, check_policy, compile_policy
from healthspace.policy.crossborder import (
    DEFAULT_RULES,
    ExportApproval,
    JurisdictionRules,
    Treatment,
    cross_border_fact,
    decide_transfer,
)
from healthspace.policy.evaluator import Explanation, evaluate, explain
from healthspace.policy.models import CrossBorderFact, Decision, Duty, DutyState, Facts, Phase, Request
from healthspace.policy.restrict import is_at_least_as_restrictive
from healthspace.policy.schema import PolicyError, Problem, profile_schema
from healthspace.policy.templates import TEMPLATES, template

__all__ = [
    "DEFAULT_RULES",
    "TEMPLATES",
    "CompiledPolicy",
    "CrossBorderFact",
    "Decision",
    "Duty",
    "DutyState",
    "Explanation",
    "ExportApproval",
    "Facts",
    "JurisdictionRules",
    "Phase",
    "PolicyError",
    "Problem",
    "Request",
    "Treatment",
    "check_policy",
    "compile_policy",
    "cross_border_fact",
    "decide_transfer",
    "evaluate",
    "explain",
    "is_at_least_as_restrictive",
    "profile_schema",
    "template",
]
