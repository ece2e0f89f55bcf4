"""The pure policy decision: (policy, request, facts, now) -> Decision, failing closed on anything unclear."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from healthspace.policy.compiler import CompiledPolicy, Constraint, Ctx, EvalError, Rule, compile_policy
from healthspace.policy.models import Decision, Duty, DutyState, Facts, Request
from healthspace.policy.schema import PolicyError
from healthspace.policy.vocabulary import ACTIONS

__all__ = ["ConstraintResult", "Explanation", "RuleResult", "evaluate", "explain"]


def _premises(rule: Rule, ctx: Ctx) -> str | None:
    """None when the rule's action, target and assignee cover the request, else why not."""
    req = ctx.request
    if req.action not in rule.covered_actions:
        return f"{rule.label}: action {req.action!r} is not within {rule.action!r}"
    if rule.target is not None and req.target != rule.target:
        if req.target is None:
            raise EvalError(
                f"{rule.label}: the request names no target; the rule is bound to {rule.target!r}"
            )
        if rule.target not in ctx.facts.asset_collections:
            return f"{rule.label}: target {req.target!r} is not {rule.target!r} nor in that collection"
    if rule.assignee is not None and req.consumer_id != rule.assignee:
        if req.consumer_id is None:
            raise EvalError(f"{rule.label}: the request names no consumer; the rule is for {rule.assignee!r}")
        if rule.assignee not in ctx.facts.party_collections:
            return f"{rule.label}: consumer {req.consumer_id!r} is not {rule.assignee!r} nor a member of it"
    return None


def _duties_block(rule: Rule, facts: Facts) -> str | None:
    """A recorded violation voids the permission; obtainConsent must be fulfilled before the use."""
    for duty in rule.duties:
        state = facts.duty_states.get(duty.uid) if duty.uid is not None else None
        if state is DutyState.VIOLATED:
            return f"{rule.label}: duty {duty.action!r} ({duty.uid}) is recorded as violated"
        if duty.action == "obtainConsent" and not (facts.consent_obtained or state is DutyState.FULFILLED):
            return f"{rule.label}: duty 'obtainConsent' is not fulfilled (no consent recorded)"
    return None


def _applies(rule: Rule, ctx: Ctx) -> str | None:
    why = _premises(rule, ctx)
    if why is not None:
        return why
    for c in rule.constraints:
        why = c.check(ctx)
        if why is not None:
            return f"{rule.label}: {why}"
    if rule.duties:
        return _duties_block(rule, ctx.facts)
    return None


def _start(
    policy: CompiledPolicy | Mapping[str, Any], request: Request, facts: Facts, now: datetime
) -> tuple[CompiledPolicy, Ctx]:
    compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise EvalError("now must be a timezone-aware datetime")
    if request.action not in ACTIONS:
        raise EvalError(f"action {request.action!r} is not a term of the profile")
    return compiled, Ctx(request, facts, now)


def evaluate(
    policy: CompiledPolicy | Mapping[str, Any], request: Request, facts: Facts, now: datetime
) -> Decision:
    """Decide whether `request` may go ahead under `policy`, given `facts`, at `now` (timezone-aware).

    Pure: no I/O, no global state. Any active prohibition denies; otherwise some permission must apply
    (its action covers the request's, target and assignee match, every constraint holds, none of its duties
    is recorded violated, and obtainConsent is fulfilled). A negative cross-border fact denies whatever
    the policy says. A policy that does not conform, a missing or mistyped value or any error while
    evaluating denies, with the reason. When allowed, `duties` holds the duties of every applicable
    permission and the policy's obligations, which the caller must carry out.

    Pass a `CompiledPolicy` (from `compile_policy`) on hot paths; a raw document is compiled each call.
    """
    try:
        compiled, ctx = _start(policy, request, facts, now)
        return _decide(compiled, ctx)
    except PolicyError as exc:
        return Decision(False, tuple(f"policy rejected: {p}" for p in exc.problems))
    except EvalError as exc:
        return Decision(False, (str(exc),))
    except Exception as exc:  # fail closed on any defect, and say so
        return Decision(False, (f"evaluator error ({type(exc).__name__}: {exc}); denied",))


def _decide(compiled: CompiledPolicy, ctx: Ctx) -> Decision:
    facts = ctx.facts
    cb = facts.cross_border
    if cb is not None and not cb.allowed:
        return Decision(False, (f"cross-border rules: {cb.reason}",))
    denied: list[str] = []
    for rule in compiled.prohibitions:
        if _applies(rule, ctx) is None:
            summary = " and ".join(c.summary for c in rule.constraints)
            denied.append(f"{rule.label} applies" + (f" ({summary})" if summary else ""))
    if denied:
        return Decision(False, tuple(denied))
    granted: list[Rule] = []
    why_not: list[str] = []
    for rule in compiled.permissions:
        why = _applies(rule, ctx)
        if why is None:
            granted.append(rule)
        else:
            why_not.append(why)
    if not granted:
        return Decision(False, tuple(why_not) or ("the policy grants no permission",))
    duties: list[Duty] = [d.view(facts) for rule in granted for d in rule.duties]
    duties.extend(d.view(facts) for d in compiled.obligations)
    reasons = tuple(f"{rule.label} applies" for rule in granted)
    if ctx.notes:
        reasons += tuple(dict.fromkeys(ctx.notes))
    return Decision(True, reasons, tuple(duties))


# --- explanation (a full trace, for audits and the ODRL conformance suite) -------------------------


@dataclass(frozen=True, slots=True)
class ConstraintResult:
    pointer: str
    uid: str | None
    satisfied: bool
    reason: str | None
    children: tuple[ConstraintResult, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleResult:
    """One rule's premises: None where the rule does not state that premise."""

    kind: str
    pointer: str
    uid: str | None
    active: bool
    action: bool
    target: bool | None
    party: bool | None
    constraints: tuple[ConstraintResult, ...]
    duties_ok: bool | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    rules: tuple[RuleResult, ...]


def _trace(c: Constraint, ctx: Ctx) -> ConstraintResult:
    if c.kind == "atomic":
        try:
            why = c.check(ctx)
        except EvalError as exc:
            why = str(exc)
        return ConstraintResult(c.pointer, c.uid, why is None, why)
    kids = tuple(_trace(k, ctx) for k in c.children)
    held = sum(k.satisfied for k in kids)
    ok = {"and": held == len(kids), "or": held >= 1, "xone": held == 1}[c.kind]
    return ConstraintResult(c.pointer, c.uid, ok, None if ok else f"{c.kind} not satisfied", kids)


def _explain_rule(rule: Rule, ctx: Ctx) -> RuleResult:
    req, facts = ctx.request, ctx.facts
    action_ok = req.action in rule.covered_actions
    target_ok = None
    if rule.target is not None:
        target_ok = req.target == rule.target or rule.target in facts.asset_collections
    party_ok = None
    if rule.assignee is not None:
        party_ok = req.consumer_id == rule.assignee or rule.assignee in facts.party_collections
    constraints = tuple(_trace(c, ctx) for c in rule.constraints)
    duties_ok = None if not rule.duties else _duties_block(rule, facts) is None
    active = action_ok and target_ok is not False and party_ok is not False
    active = active and all(c.satisfied for c in constraints) and duties_ok is not False
    try:
        reason = _applies(rule, ctx)
    except EvalError as exc:
        reason = str(exc)
    return RuleResult(
        rule.kind,
        rule.pointer,
        rule.uid,
        active,
        action_ok,
        target_ok,
        party_ok,
        constraints,
        duties_ok,
        reason,
    )


def explain(
    policy: CompiledPolicy | Mapping[str, Any], request: Request, facts: Facts, now: datetime
) -> Explanation:
    """`evaluate` plus every rule's premises and every constraint's result (no short-circuit). Slower;
    for audit trails and conformance tests. A policy that cannot be compiled raises PolicyError."""
    compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)
    decision = evaluate(compiled, request, facts, now)
    ctx = Ctx(request, facts, now)
    rules = tuple(_explain_rule(r, ctx) for r in (*compiled.permissions, *compiled.prohibitions))
    return Explanation(decision, rules)
