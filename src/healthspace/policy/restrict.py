"""Is a candidate policy at least as restrictive as a reference? A conservative check for negotiation.

Definition (sound, not complete: when in doubt the answer is "not acceptable"):

1. Both policies conform to the profile. A target or assignee the reference fixes, the candidate keeps.
2. Every candidate permission is covered by some reference permission P: its action is P's action or
   included in it, its target/assignee equal P's, its constraints imply every constraint of P, and it
   keeps every duty of P (same action, and constraints that imply P's: an earlier deadline is fine).
3. Every reference prohibition is kept: some candidate prohibition with an action that includes it and
   constraints implied by the reference prohibition's, so it applies at least whenever the reference's did.
4. Every reference obligation is kept (as for duties).

Implication between constraints is decided syntactically: same left operand and a right operand that is
narrower (x ≤ 5 implies x ≤ 10; isAnyOf [a] implies isAnyOf [a, b]; eq 'CN-GD' implies isPartOf 'CN'),
`and` is a conjunction of its members, an `or` is implied if one branch is, a candidate `or` implies
only what each branch implies, and `xone` only matches an identical `xone`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from healthspace.policy.compiler import CompiledPolicy, Constraint, DutyDef, Rule, compile_policy
from healthspace.policy.models import Decision
from healthspace.policy.schema import PolicyError
from healthspace.policy.vocabulary import ValueType, action_includes, region_within, type_is_a

__all__ = ["is_at_least_as_restrictive"]

_UPPER = ("lt", "lteq")
_LOWER = ("gt", "gteq")


def _same(a: Constraint, b: Constraint) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == "atomic":
        return a.operand == b.operand and a.operator == b.operator and a.right == b.right
    return len(a.children) == len(b.children) and all(map(_same, a.children, b.children))


def _holds(op: str, v: Any, r: Any, operand_type: ValueType, name: str) -> bool:
    """Does the fixed value `v` satisfy `op r`?"""
    if op == "eq":
        return bool(v == r)
    if op == "neq":
        return bool(v != r)
    if op == "lt":
        return bool(v < r)
    if op == "lteq":
        return bool(v <= r)
    if op == "gt":
        return bool(v > r)
    if op == "gteq":
        return bool(v >= r)
    if op == "isAnyOf":
        return v in r
    if op == "isNoneOf":
        return v not in r
    if op == "isPartOf":
        return region_within(v, r)
    if op == "isA":
        return name == "participantType" and type_is_a(v, r)
    return False


def _atomic_implies(c: Constraint, r: Constraint) -> bool:
    if c.operand != r.operand or c.operand is None:
        return False
    if c.operator == r.operator and c.right == r.right:
        return True
    t, name = c.operand.type, c.operand.name
    co, cv, ro, rv = c.operator or "", c.right, r.operator or "", r.right
    if t is ValueType.TERM_SET:
        if co == "isAllOf":
            return (
                (ro == "isAllOf" and rv <= cv)
                or (ro == "hasPart" and rv in cv)
                or (ro == "isAnyOf" and bool(cv & rv))
            )
        if co == "hasPart":
            return (ro == "isAnyOf" and cv in rv) or (ro == "isAllOf" and rv == frozenset({cv}))
        if co == "isNoneOf":
            return ro == "isNoneOf" and rv <= cv
        return False
    if co == "eq":
        return _holds(ro, cv, rv, t, name)
    if co == "isAnyOf":
        return all(_holds(ro, v, rv, t, name) for v in cv)
    if co in _UPPER and ro in _UPPER:
        return bool(cv < rv) or (cv == rv and (co == "lt" or ro == "lteq"))
    if co in _LOWER and ro in _LOWER:
        return bool(cv > rv) or (cv == rv and (co == "gt" or ro == "gteq"))
    if co == "isNoneOf":
        return (ro == "isNoneOf" and rv <= cv) or (ro == "neq" and rv in cv)
    if co == "neq":
        return ro == "isNoneOf" and rv == frozenset({cv})
    if co == "isPartOf" and ro == "isPartOf":
        return region_within(cv, rv)
    if co == "isA" and ro == "isA" and name == "participantType":
        return type_is_a(cv, rv)
    return False


def _flatten(cs: tuple[Constraint, ...]) -> list[Constraint]:
    out: list[Constraint] = []
    for c in cs:
        out.extend(_flatten(c.children) if c.kind == "and" else [c])
    return out


def _implies(cands: list[Constraint], ref: Constraint) -> bool:
    """Does the conjunction `cands` imply `ref`?"""
    if ref.kind == "and":
        return all(_implies(cands, k) for k in ref.children)
    if any(_same(c, ref) for c in cands):
        return True
    if ref.kind == "or" and any(_implies(cands, k) for k in ref.children):
        return True
    if ref.kind == "xone":
        return False
    for c in cands:
        if c.kind == "atomic" and ref.kind == "atomic" and _atomic_implies(c, ref):
            return True
        if c.kind == "or" and all(_implies(_flatten((k,)), ref) for k in c.children):
            return True
    return False


def _all_implied(cands: tuple[Constraint, ...], refs: tuple[Constraint, ...]) -> Constraint | None:
    """The first reference constraint the candidates do not imply, or None."""
    flat = _flatten(cands)
    return next((r for r in refs if not _implies(flat, r)), None)


def _duty_kept(ref: DutyDef, duties: tuple[DutyDef, ...]) -> bool:
    return any(d.action == ref.action and _duty_constraints_imply(d, ref) for d in duties)


def _duty_constraints_imply(cand: DutyDef, ref: DutyDef) -> bool:
    # Duties keep their constraints as JSON; compare deadlines, the only refinement the profile derives.
    if cand.constraints == ref.constraints:
        return True
    if ref.due_at is not None and (cand.due_at is None or cand.due_at > ref.due_at):
        return False
    if ref.due_after_start is not None and (
        cand.due_after_start is None or cand.due_after_start > ref.due_after_start
    ):
        return False
    # Only a lone deadline constraint on each side is compared; anything else must be identical.
    has_deadline = ref.due_at is not None or ref.due_after_start is not None
    return has_deadline and len(cand.constraints) == len(ref.constraints) == 1


def _covers(ref: Rule, cand: Rule) -> str | None:
    if not action_includes(ref.action, cand.action):
        return f"action {cand.action!r} is not within {ref.action!r}"
    if ref.target is not None and cand.target != ref.target:
        return f"target {cand.target!r} is not {ref.target!r}"
    if ref.assignee is not None and cand.assignee != ref.assignee:
        return f"assignee {cand.assignee!r} is not {ref.assignee!r}"
    missing = _all_implied(cand.constraints, ref.constraints)
    if missing is not None:
        return f"does not keep the constraint at {missing.pointer} ({missing.summary})"
    for duty in ref.duties:
        if not _duty_kept(duty, cand.duties):
            return f"drops the duty {duty.action!r} at {duty.pointer}"
    return None


def _compile(doc: CompiledPolicy | Mapping[str, Any]) -> CompiledPolicy:
    return doc if isinstance(doc, CompiledPolicy) else compile_policy(doc)


def is_at_least_as_restrictive(
    candidate: CompiledPolicy | Mapping[str, Any], reference: CompiledPolicy | Mapping[str, Any]
) -> Decision:
    """Acceptable (`allowed`) if `candidate` permits nothing `reference` does not and keeps all its
    prohibitions, duties and obligations (see module docstring). Reasons say what breaks it."""
    try:
        cand, ref = _compile(candidate), _compile(reference)
    except PolicyError as exc:
        return Decision(False, tuple(f"policy rejected: {p}" for p in exc.problems))
    reasons: list[str] = []
    for field in ("target", "assignee", "assigner"):
        rv, cv = getattr(ref, field), getattr(cand, field)
        if rv is not None and cv != rv:
            reasons.append(f"{field} {cv!r} differs from the reference's {rv!r}")
    for perm in cand.permissions:
        whys = [w for w in (_covers(r, perm) for r in ref.permissions) if w is not None]
        if len(whys) == len(ref.permissions):
            detail = "; ".join(
                f"against {r.pointer}: {w}" for r, w in zip(ref.permissions, whys, strict=True)
            )
            reasons.append(f"{perm.label} is broader than the reference ({detail or 'it permits nothing'})")
    # The candidate's own target (assignee) binds all it permits only if no permission names another.
    own_target = cand.target if all(p.target == cand.target for p in cand.permissions) else None
    own_assignee = cand.assignee if all(p.assignee == cand.assignee for p in cand.permissions) else None
    for proh in ref.prohibitions:
        kept = any(
            action_includes(c.action, proh.action)
            and c.target in (None, proh.target, own_target)
            and c.assignee in (None, proh.assignee, own_assignee)
            and _all_implied(proh.constraints, c.constraints) is None
            for c in cand.prohibitions
        )
        if not kept:
            reasons.append(f"{proh.label} of the reference is dropped or narrowed")
    for ob in ref.obligations:
        if not _duty_kept(ob, cand.obligations):
            reasons.append(f"obligation {ob.action!r} at {ob.pointer} of the reference is dropped")
    if reasons:
        return Decision(False, tuple(reasons))
    return Decision(
        True, ("every permission is narrowed or equal; no prohibition, duty or obligation dropped",)
    )
