"""The connector's policy gate: an agreement's policy plus the cross-border rules, decided for one use.

Pure. The connector calls `decide_use` when it agrees to a contract (phase NEGOTIATION) and when it
starts a transfer (phase TRANSFER); the data plane calls it per job (phase JOB, with the job's own
output type and parameters). Before JOB the output type is not known yet, so every output type is
tried: the use may go ahead when at least one output type is allowed by both the policy and the
cross-border rules (each job is then checked for its own). The scenario is the policy's `purpose`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from healthspace.policy.compiler import CompiledPolicy, Constraint, compile_policy
from healthspace.policy.crossborder import (
    ExportApproval,
    JurisdictionRules,
    cross_border_fact,
    decide_transfer,
)
from healthspace.policy.evaluator import evaluate
from healthspace.policy.models import Decision, Facts, Phase, Request
from healthspace.policy.schema import PolicyError
from healthspace.policy.vocabulary import OUTPUT_TYPES

__all__ = ["UseDecision", "decide_use", "scenarios_of"]


@dataclass(frozen=True, slots=True)
class UseDecision:
    """The gate's answer: the decision, the scenario it was taken for, and the output types it allows."""

    decision: Decision
    scenario_id: str | None
    output_types: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


def _purposes(constraints: Iterable[Constraint]) -> set[str]:
    out: set[str] = set()
    for c in constraints:
        if c.kind == "atomic" and c.operand is not None and c.operand.name == "purpose":
            if c.operator == "eq" and isinstance(c.right, str):
                out.add(c.right)
            elif c.operator == "isAnyOf" and isinstance(c.right, list | tuple | frozenset):
                out.update(str(v) for v in c.right)
        out |= _purposes(c.children)
    return out


def scenarios_of(policy: CompiledPolicy | Mapping[str, Any]) -> frozenset[str]:
    """The scenarios the permissions of `policy` name as their purpose (empty: none named)."""
    compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)
    return frozenset(s for rule in compiled.permissions for s in _purposes(rule.constraints))


def decide_use(
    policy: CompiledPolicy | Mapping[str, Any],
    request: Request,
    facts: Facts,
    *,
    provider_jurisdiction: str,
    rules: Mapping[str, JurisdictionRules],
    approvals: Iterable[ExportApproval],
    now: datetime,
) -> UseDecision:
    """Decide `request` under `policy` with the cross-border rules as a fact; fail closed.

    `request.purpose` defaults to the policy's one scenario; a policy naming none or several, with no
    purpose in the request, is denied. `request.target` is the dataset the approvals are matched on.
    With `request.output_type` unset before JOB, each output type is tried (see the module docstring).
    """
    try:
        compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)
    except PolicyError as exc:
        return UseDecision(Decision(False, tuple(f"policy rejected: {p}" for p in exc.problems)), None)
    scenario = request.purpose
    if scenario is None:
        named = scenarios_of(compiled)
        if len(named) != 1:
            why = (
                "names no scenario" if not named else f"names several scenarios ({', '.join(sorted(named))})"
            )
            return UseDecision(Decision(False, (f"the policy {why}; a use is bound to exactly one",)), None)
        (scenario,) = named
        request = replace(request, purpose=scenario)
    if request.consumer_jurisdiction is None or request.consumer_id is None or request.target is None:
        return UseDecision(
            Decision(False, ("cross-border: consumer, its jurisdiction and the dataset must be known",)),
            scenario,
        )
    approvals = tuple(approvals)
    candidates = (request.output_type,) if request.output_type is not None else tuple(sorted(OUTPUT_TYPES))
    if request.output_type is None and request.phase is Phase.JOB:
        return UseDecision(Decision(False, ("a job must name its output type",)), scenario)
    allowed: list[tuple[str, Decision]] = []
    refused: list[str] = []
    for output in candidates:
        border = decide_transfer(
            rules,
            provider_jurisdiction,
            request.consumer_jurisdiction,
            output,
            request.target,
            request.consumer_id,
            scenario,
            approvals,
            now,
        )
        d = evaluate(
            compiled,
            replace(request, output_type=output),
            replace(facts, cross_border=cross_border_fact(border)),
            now,
        )
        if d.allowed:
            allowed.append((output, Decision(True, d.reasons + border.reasons, d.duties)))
        else:
            refused.append(f"{output}: " + "; ".join(d.reasons))
    if not allowed:
        return UseDecision(Decision(False, tuple(refused)), scenario)
    outputs = tuple(o for o, _ in allowed)
    reasons = tuple(f"{o}: " + "; ".join(d.reasons) for o, d in allowed)
    # One duty per place in the policy, whichever output types it came with.
    duties = tuple({(duty.source, duty.action): duty for _, d in allowed for duty in d.duties}.values())
    return UseDecision(Decision(True, reasons, duties), scenario, outputs)
