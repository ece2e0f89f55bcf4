"""What an agreement's policy and a query spec imply for a job: disclosure rules and consent data classes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from healthspace.compute import DisclosureRules, QuerySpec

__all__ = ["DOMAIN_CLASSES", "data_classes_of", "rules_from_policy"]

# Consent data class behind each event domain of a spec. Person, age, sex and death come from the
# demographics class, which every job reads.
DOMAIN_CLASSES: Mapping[str, str] = {
    "condition": "conditions",
    "drug": "medications",
    "procedure": "procedures",
    "measurement": "laboratory",
    "death": "demographics",
}


def _walk(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def data_classes_of(spec: QuerySpec) -> frozenset[str]:
    """Every consent data class the spec reads: a patient counts only with consent for all of them."""
    out = {"demographics"}
    for d in _walk(spec.model_dump()):
        domain = d.get("domain")
        if isinstance(domain, str):
            out.add(DOMAIN_CLASSES[domain])
        # measurement summaries and histograms and GLM `value` variables read a measurement by code,
        # without a domain
        if d.get("type") in ("measurement_summary", "measurement_histogram") or d.get("kind") == "value":
            out.add("laboratory")
    return frozenset(out)


def _constraints(policy: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for rule in policy.get("permission") or []:
        if not isinstance(rule, Mapping):
            continue
        for c in _walk(rule.get("constraint") or []):
            if "leftOperand" in c:
                yield c


def rules_from_policy(policy: Mapping[str, Any], default_min_cell_size: int = 10) -> DisclosureRules:
    """The disclosure rules an agreement imposes: minCellSize (k), privacyBudget (ε total), outputType.

    Where the agreement names no minimum cell size the provider's default applies; where it names no
    output type only aggregates are allowed (fail closed). Malformed values leave the defaults, and
    the policy evaluator, which runs on the same policy, refuses the job.
    """
    k: int | None = None
    eps: float | None = None
    outputs: set[str] = set()
    for c in _constraints(policy):
        name, op, right = c.get("leftOperand"), c.get("operator"), c.get("rightOperand")
        try:
            if name == "minCellSize" and op in ("gteq", "gt", "eq"):
                v = int(str(right)) + (1 if op == "gt" else 0)
                k = v if k is None else max(k, v)
            elif name == "privacyBudget" and op in ("lteq", "lt"):
                e = float(str(right))
                eps = e if eps is None else min(eps, e)
            elif name == "outputType":
                values = right if isinstance(right, list) else [right]
                outputs.update(str(v) for v in values)
        except ValueError:
            continue
    return DisclosureRules(
        min_cell_size=k if k is not None and k >= 1 else default_min_cell_size,
        epsilon_total=eps if eps is not None and eps > 0 else None,
        output_types=frozenset(outputs) if outputs else frozenset({"aggregate"}),
    )
