"""Turns a profile-conforming ODRL policy (compact JSON) into a compiled form the evaluator runs fast."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from healthspace.policy.models import Duty, Phase
from healthspace.policy.schema import PolicyError, Problem, normalise, original_pointer, schema_problems
from healthspace.policy.vocabulary import (
    ACTIONS,
    LEFT_OPERANDS,
    PARTICIPANT_TYPE_GROUPS,
    PARTICIPANT_TYPES,
    LeftOperand,
    ValueType,
    action_includes,
    region_within,
    type_is_a,
)

__all__ = [
    "CompiledPolicy",
    "Constraint",
    "DutyDef",
    "EvalError",
    "Rule",
    "check_policy",
    "compile_policy",
    "format_duration",
]

_JURISDICTION = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_DECIMAL = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")
_DURATION = re.compile(
    r"^P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_SYMBOL = {"eq": "=", "neq": "≠", "lt": "<", "lteq": "≤", "gt": ">", "gteq": "≥"}
_SET_OPERATORS = frozenset({"isAnyOf", "isNoneOf", "isAllOf"})


class EvalError(Exception):
    """Evaluation cannot decide (a value is missing or of the wrong type): the decision is deny."""


class _Deferred:
    """Marks a job parameter that a request before the job phase leaves unset."""


DEFERRED = _Deferred()


class Ctx:
    """What one evaluation reads; `notes` collects deferrals to report with the decision."""

    __slots__ = ("facts", "notes", "now", "request")

    def __init__(self, request: Any, facts: Any, now: datetime) -> None:
        self.request = request
        self.facts = facts
        self.now = now
        self.notes: list[str] = []


Check = Callable[[Ctx], "str | None"]
"""Returns None when satisfied, else why not; raises EvalError when it cannot tell."""


@dataclass(frozen=True, slots=True)
class Constraint:
    """A compiled constraint: atomic (`operand`, `operator`, `right`) or logical (`kind` and/or/xone)."""

    kind: str
    pointer: str
    uid: str | None
    check: Check
    summary: str
    operand: LeftOperand | None = None
    operator: str | None = None
    right: Any = None
    children: tuple[Constraint, ...] = ()


@dataclass(frozen=True, slots=True)
class DutyDef:
    action: str
    uid: str | None
    pointer: str
    constraints: tuple[Mapping[str, Any], ...]
    due_at: datetime | None
    due_after_start: timedelta | None
    fixed: Duty | None
    """The duty as returned when its deadline does not depend on the facts."""

    def view(self, facts: Any) -> Duty:
        if self.fixed is not None:
            return self.fixed
        start = facts.agreement_start
        due = start + self.due_after_start if start is not None and self.due_after_start else None
        return Duty(self.action, self.uid, self.pointer, due, self.constraints)


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str
    pointer: str
    uid: str | None
    action: str
    covered_actions: frozenset[str]
    """Request actions the rule speaks about: included actions (permission) or overlapping (prohibition)."""
    target: str | None
    assignee: str | None
    constraints: tuple[Constraint, ...]
    duties: tuple[DutyDef, ...]
    label: str


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    uid: str
    type: str
    target: str | None
    assigner: str | None
    assignee: str | None
    permissions: tuple[Rule, ...]
    prohibitions: tuple[Rule, ...]
    obligations: tuple[DutyDef, ...]
    document: Mapping[str, Any]
    """The policy after normalisation (ODRL prefixes removed)."""
    left_operands: frozenset[str] = frozenset()
    """Every leftOperand a constraint of the policy names (rules, duties, refinements): what a caller
    must gather facts for, e.g. the agreement's use count only when `count` is among them."""


# --- value formatting ------------------------------------------------------------------------------


def format_duration(d: timedelta) -> str:
    """An xsd:duration for `d` in days, hours, minutes and seconds (P30D, PT12H, P1DT0.5S)."""
    total = d.total_seconds()
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    out = "P" + (f"{int(days)}D" if days else "")
    time = (
        (f"{int(hours)}H" if hours else "")
        + (f"{int(minutes)}M" if minutes else "")
        + (f"{seconds:g}S" if seconds else "")
    )
    if time:
        out += "T" + time
    return out if out != "P" else "PT0S"


def _fmt(v: Any) -> str:
    if isinstance(v, datetime):
        return v.isoformat().replace("+00:00", "Z")
    if isinstance(v, timedelta):
        return format_duration(v)
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, frozenset):
        return repr(sorted(v))
    if isinstance(v, str):
        return repr(v)
    return str(v)


# --- value getters ---------------------------------------------------------------------------------


def _request_getter(attr: str, operand: LeftOperand, types: tuple[type, ...]) -> Callable[[Ctx], Any]:
    missing = f"{operand.label}: the request states none ({operand.source})"
    wrong = f"{operand.label}: expected {operand.type.value}, the request has {{}}"

    def get(ctx: Ctx) -> Any:
        v = getattr(ctx.request, attr)
        if v is None:
            if operand.deferrable and ctx.request.phase < Phase.JOB:
                return DEFERRED
            raise EvalError(missing)
        if type(v) not in types:
            raise EvalError(wrong.format(type(v).__name__))
        return v

    return get


def _get_now(ctx: Ctx) -> Any:
    return ctx.now


def _get_elapsed(ctx: Ctx) -> Any:
    start = ctx.facts.agreement_start
    if start is None:
        if ctx.request.phase < Phase.JOB:
            return DEFERRED
        raise EvalError("elapsed time: no agreement start time is recorded (facts.agreement_start)")
    if not isinstance(start, datetime) or start.tzinfo is None:
        raise EvalError("elapsed time: facts.agreement_start must be a timezone-aware datetime")
    return ctx.now - start


def _get_count(ctx: Ctx) -> Any:
    n = ctx.facts.use_count
    if type(n) is not int or n < 0:
        raise EvalError(f"use count: facts.use_count must be a non-negative integer, not {n!r}")
    return n + 1


def _get_budget(ctx: Ctx) -> Any:
    eps = ctx.request.epsilon
    if eps is None:
        if ctx.request.phase < Phase.JOB:
            return DEFERRED
        raise EvalError("privacy budget: the request states no ε (request.epsilon)")
    spent = ctx.facts.epsilon_spent
    if type(eps) not in (int, float) or type(spent) not in (int, float):
        raise EvalError("privacy budget: request.epsilon and facts.epsilon_spent must be numbers")
    if not (math.isfinite(eps) and math.isfinite(spent)) or eps < 0 or spent < 0:
        raise EvalError(f"privacy budget: ε must be finite and ≥ 0 (requested {eps!r}, spent {spent!r})")
    return spent + eps


def _get_cross_border(ctx: Ctx) -> Any:
    fact = ctx.facts.cross_border
    if fact is None:
        if ctx.request.phase < Phase.JOB:
            return DEFERRED
        raise EvalError("cross-border rules: not assessed for this request (facts.cross_border)")
    return "satisfied" if fact.allowed else "violated"


def _getter(operand: LeftOperand) -> Callable[[Ctx], Any]:
    name = operand.name
    if name == "dateTime":
        return _get_now
    if name == "elapsedTime":
        return _get_elapsed
    if name == "count":
        return _get_count
    if name == "privacyBudget":
        return _get_budget
    if name == "crossBorderRules":
        return _get_cross_border
    attr, types = {
        "purpose": ("purpose", (str,)),
        "jurisdiction": ("consumer_jurisdiction", (str,)),
        "participantType": ("consumer_type", (str,)),
        "role": ("consumer_roles", (frozenset, set)),
        "outputType": ("output_type", (str,)),
        "minCellSize": ("cell_size", (int,)),
        "kAnonymity": ("k", (int,)),
        "executionLocation": ("execution_location", (str,)),
    }[name]
    return _request_getter(attr, operand, types)


# --- operator tests and reasons --------------------------------------------------------------------


def _test(operand: LeftOperand, op: str, r: Any) -> Callable[[Any], bool]:
    t = operand.type
    if t is ValueType.TERM_SET:
        if op == "hasPart":
            return lambda v: r in v
        if op == "isAllOf":
            return lambda v: r <= v
        if op == "isAnyOf":
            return lambda v: not r.isdisjoint(v)
        if op == "isNoneOf":
            return lambda v: r.isdisjoint(v)
    if op == "eq":
        return lambda v: bool(v == r)
    if op == "neq":
        return lambda v: bool(v != r)
    if op == "lt":
        return lambda v: bool(v < r)
    if op == "lteq":
        return lambda v: bool(v <= r)
    if op == "gt":
        return lambda v: bool(v > r)
    if op == "gteq":
        return lambda v: bool(v >= r)
    if op == "isAnyOf":
        return lambda v: v in r
    if op == "isNoneOf":
        return lambda v: v not in r
    if op == "isPartOf":
        return lambda v: region_within(v, r)
    if op == "isA":
        return lambda v: type_is_a(v, r)
    raise EvalError(f"operator {op!r} is not defined for {operand.name!r}")  # compile checks prevent this


def _reason(operand: LeftOperand, op: str, r: Any) -> Callable[[Ctx, Any], str]:
    label, name, rs = operand.label, operand.name, _fmt(r)
    if name == "privacyBudget" and op in ("lt", "lteq"):

        def budget(ctx: Ctx, v: Any) -> str:
            eps, spent = ctx.request.epsilon, ctx.facts.epsilon_spent
            return (
                f"privacy budget: requested ε={float(eps)!r} with {float(spent)!r} spent "
                f"exceeds ε {_SYMBOL[op]} {rs}"
            )

        return budget
    if name == "count" and op in ("lt", "lteq"):
        return lambda ctx, v: f"use count: this would be use {v}, which exceeds {_SYMBOL[op]} {rs}"
    if name == "crossBorderRules":
        return lambda ctx, v: f"cross-border rules: {ctx.facts.cross_border.reason}"
    if operand.type is ValueType.TERM_SET:
        phrase = {
            "hasPart": f"do not include {rs}",
            "isAllOf": f"do not include all of {rs}",
            "isAnyOf": f"include none of {rs}",
            "isNoneOf": f"include one of the excluded {rs}",
        }[op]
        return lambda ctx, v: f"{label} {_fmt(frozenset(v))} {phrase}"
    if op in _SYMBOL and operand.type is not ValueType.TERM:
        return lambda ctx, v: f"{label} {_fmt(v)} is not {_SYMBOL[op]} {rs}"
    phrase = {
        "eq": f"is not {rs}",
        "neq": "is excluded",
        "isAnyOf": f"is not one of {rs}",
        "isNoneOf": f"is one of the excluded {rs}",
        "isPartOf": f"is not within {rs}",
        "isA": f"is not a {rs}",
    }[op]
    return lambda ctx, v: f"{label} {_fmt(v)} {phrase}"


def _atomic_check(operand: LeftOperand, op: str, right: Any, kind: str) -> Check:
    get = _getter(operand)
    test = _test(operand, op, right)
    reason = _reason(operand, op, right)
    note = f"{operand.label} constraint deferred to the job phase"
    # A deferred value satisfies a permission's constraint for now (the job re-checks it) but must not
    # make a prohibition apply early: the prohibition too is checked again at the job.
    on_deferred = None if kind == "permission" else f"{operand.label} not known yet"

    def check(ctx: Ctx) -> str | None:
        v = get(ctx)
        if v is DEFERRED:
            ctx.notes.append(note)
            return on_deferred
        if test(v):
            return None
        return reason(ctx, v)

    return check


def _and(children: tuple[Constraint, ...]) -> Check:
    checks = tuple(c.check for c in children)

    def check(ctx: Ctx) -> str | None:
        for c in checks:
            r = c(ctx)
            if r is not None:
                return r
        return None

    return check


def _or(children: tuple[Constraint, ...]) -> Check:
    checks = tuple(c.check for c in children)

    def check(ctx: Ctx) -> str | None:
        why: list[str] = []
        for c in checks:
            r = c(ctx)
            if r is None:
                return None
            why.append(r)
        return "none of the alternatives holds: " + "; ".join(why)

    return check


def _xone(children: tuple[Constraint, ...]) -> Check:
    checks = tuple(c.check for c in children)

    def check(ctx: Ctx) -> str | None:
        why: list[str] = []
        for c in checks:
            r = c(ctx)
            if r is not None:
                why.append(r)
        held = len(checks) - len(why)
        if held == 1:
            return None
        if held == 0:
            return "exactly one alternative must hold, none does: " + "; ".join(why)
        return f"exactly one alternative must hold, {held} do"

    return check


# --- compiling -------------------------------------------------------------------------------------


class _Compiler:
    def __init__(self, original: Any) -> None:
        self.original = original
        self.problems: list[Problem] = []
        self.operands: set[str] = set()

    def problem(self, path: list[str | int], message: str) -> None:
        self.problems.append(Problem(original_pointer(self.original, path), message))

    def scalar(self, raw: Any) -> str:
        if isinstance(raw, dict):
            return str(raw.get("@value", raw.get("@id")))
        return str(raw)

    def value(self, operand: LeftOperand, op: str, raw: str, path: list[str | int]) -> Any:
        t = operand.type
        if t is ValueType.DATETIME:
            try:
                dt = datetime.fromisoformat(raw)
            except ValueError:
                self.problem(path, f"{raw!r} is not an xsd:dateTime (e.g. 2026-12-31T23:59:59Z)")
                return None
            if dt.tzinfo is None:
                self.problem(path, f"{raw!r} has no timezone; write Z or ±hh:mm")
                return None
            return dt
        if t is ValueType.DURATION:
            m = _DURATION.match(raw)
            if not m or raw in ("P", "PT") or raw.endswith("T"):
                why = (
                    " (years and months have no fixed length: use days)"
                    if re.search(r"\dY|P[^T]*\dM", raw)
                    else ""
                )
                self.problem(path, f"{raw!r} is not an xsd:duration in weeks/days/hours/minutes/seconds{why}")
                return None
            g = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
            return timedelta(weeks=g["w"], days=g["d"], hours=g["h"], minutes=g["m"], seconds=g["s"])
        if t is ValueType.INTEGER:
            if not _INTEGER.match(raw):
                self.problem(path, f"{raw!r} is not an integer, which {operand.name} needs")
                return None
            return int(raw)
        if t is ValueType.DECIMAL:
            if not _DECIMAL.match(raw) or not math.isfinite(float(raw)):
                self.problem(path, f"{raw!r} is not a decimal number, which {operand.name} needs")
                return None
            return float(raw)
        # terms
        if operand.name == "jurisdiction" and not _JURISDICTION.match(raw):
            self.problem(path, f"{raw!r} is not an ISO 3166 code such as CN-GD, HK or MO")
            return None
        if operand.name == "participantType":
            known = PARTICIPANT_TYPES | (frozenset(PARTICIPANT_TYPE_GROUPS) if op == "isA" else frozenset())
            if raw not in known:
                self.problem(path, f"{raw!r} is not a participant type; expected one of {sorted(known)}")
                return None
        elif operand.values is not None and raw not in operand.values:
            self.problem(
                path, f"{raw!r} is not a value of {operand.name}; expected one of {sorted(operand.values)}"
            )
            return None
        return raw

    def constraint(self, node: Mapping[str, Any], path: list[str | int], kind: str) -> Constraint | None:
        pointer = original_pointer(self.original, path)
        uid = node.get("@id") or node.get("uid")
        for logical in ("and", "or", "xone"):
            if logical in node:
                kids = [self.constraint(c, [*path, logical, i], kind) for i, c in enumerate(node[logical])]
                if any(k is None for k in kids):
                    return None
                children = tuple(k for k in kids if k is not None)
                make = {"and": _and, "or": _or, "xone": _xone}[logical]
                summary = f" {logical} ".join(f"({c.summary})" for c in children)
                return Constraint(logical, pointer, uid, make(children), summary, children=children)
        name, op, raw = node["leftOperand"], node["operator"], node["rightOperand"]
        self.operands.add(name)
        operand = LEFT_OPERANDS[name]
        if op not in operand.operators:
            self.problem(
                [*path, "operator"],
                f"operator {op!r} is not defined for leftOperand {name!r} ({operand.type.value}); "
                f"use one of {', '.join(sorted(operand.operators))}",
            )
            return None
        wants_set = op in _SET_OPERATORS
        if wants_set != isinstance(raw, list):
            self.problem(
                [*path, "rightOperand"],
                f"operator {op!r} needs " + ("an array of values" if wants_set else "a single value"),
            )
            return None
        if wants_set:
            values = [
                self.value(operand, op, self.scalar(x), [*path, "rightOperand", i]) for i, x in enumerate(raw)
            ]
            if any(v is None for v in values):
                return None
            right: Any = frozenset(values)
        else:
            right = self.value(operand, op, self.scalar(raw), [*path, "rightOperand"])
            if right is None:
                return None
        summary = f"{operand.label} {_SYMBOL.get(op, op)} {_fmt(right)}"
        check = _atomic_check(operand, op, right, kind)
        return Constraint("atomic", pointer, uid, check, summary, operand, op, right)

    def duty(self, node: Mapping[str, Any], path: list[str | int]) -> DutyDef | None:
        pointer = original_pointer(self.original, path)
        cons = node.get("constraint", [])
        compiled = [self.constraint(c, [*path, "constraint", i], "duty") for i, c in enumerate(cons)]
        if any(c is None for c in compiled):
            return None
        due_at: datetime | None = None
        due_after: timedelta | None = None
        for c in compiled:
            if (
                c is not None
                and c.kind == "atomic"
                and c.operator in ("lt", "lteq")
                and c.operand is not None
            ):
                if c.operand.name == "dateTime":
                    due_at = c.right if due_at is None else min(due_at, c.right)
                elif c.operand.name == "elapsedTime":
                    due_after = c.right if due_after is None else min(due_after, c.right)
        uid = node.get("@id") or node.get("uid")
        action = node["action"]
        fixed = None if due_after is not None else Duty(action, uid, pointer, due_at, tuple(cons))
        return DutyDef(action, uid, pointer, tuple(cons), due_at, due_after, fixed)

    def rule(
        self, node: Mapping[str, Any], path: list[str | int], kind: str, doc: Mapping[str, Any]
    ) -> Rule | None:
        pointer = original_pointer(self.original, path)
        action = node["action"]
        cons = [
            self.constraint(c, [*path, "constraint", i], kind)
            for i, c in enumerate(node.get("constraint", []))
        ]
        duties = [self.duty(d, [*path, "duty", i]) for i, d in enumerate(node.get("duty", []))]
        if any(c is None for c in cons) or any(d is None for d in duties):
            return None
        if kind == "permission":
            covered = frozenset(a for a in ACTIONS if action_includes(action, a))
        else:
            covered = frozenset(
                a for a in ACTIONS if action_includes(action, a) or action_includes(a, action)
            )
        return Rule(
            kind=kind,
            pointer=pointer,
            uid=node.get("@id") or node.get("uid"),
            action=action,
            covered_actions=covered,
            target=node.get("target", doc.get("target")),
            assignee=node.get("assignee", doc.get("assignee")),
            constraints=tuple(c for c in cons if c is not None),
            duties=tuple(d for d in duties if d is not None),
            label=f"{kind} {pointer} ({action})",
        )


def check_policy(doc: Any) -> list[Problem]:
    """Every way `doc` breaks the health ODRL profile (empty when it conforms)."""
    try:
        compile_policy(doc)
    except PolicyError as exc:
        return list(exc.problems)
    return []


def compile_policy(doc: Any) -> CompiledPolicy:
    """Validate `doc` against the profile and compile it. Raises PolicyError listing every problem, each
    with a JSON pointer into `doc` as written."""
    if not isinstance(doc, dict):
        raise PolicyError([Problem("", f"a policy is a JSON object, not {type(doc).__name__}")])
    problems = schema_problems(doc)
    if problems:
        raise PolicyError(problems)
    norm, _ = normalise(doc)
    c = _Compiler(doc)
    perms = [
        c.rule(r, ["permission", i], "permission", norm) for i, r in enumerate(norm.get("permission", []))
    ]
    prohibs = [
        c.rule(r, ["prohibition", i], "prohibition", norm) for i, r in enumerate(norm.get("prohibition", []))
    ]
    obligations = [c.duty(d, ["obligation", i]) for i, d in enumerate(norm.get("obligation", []))]
    if c.problems:
        raise PolicyError(c.problems)
    return CompiledPolicy(
        uid=norm["@id"],
        type=norm["@type"],
        target=norm.get("target"),
        assigner=norm.get("assigner"),
        assignee=norm.get("assignee"),
        permissions=tuple(r for r in perms if r is not None),
        prohibitions=tuple(r for r in prohibs if r is not None),
        obligations=tuple(d for d in obligations if d is not None),
        document=norm,
        left_operands=frozenset(c.operands),
    )
