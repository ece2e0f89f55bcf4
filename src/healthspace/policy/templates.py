"""Named policy templates for stewards: a few parameters in, a profile-conforming ODRL policy out."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from healthspace.core.errors import ValidationError
from healthspace.policy.compiler import compile_policy

__all__ = ["TEMPLATES", "template"]

_NS = uuid.UUID("5b0c3a52-4c1f-4f57-9d0e-3f1e2a7c9b11")


def _c(left: str, op: str, right: str | list[str]) -> dict[str, Any]:
    return {"leftOperand": left, "operator": op, "rightOperand": right}


def _common(scenario: str, valid_for_days: int, jurisdictions: list[str] | None) -> list[dict[str, Any]]:
    out = [
        _c("purpose", "eq", scenario),
        _c("elapsedTime", "lteq", f"P{valid_for_days}D"),
        _c("crossBorderRules", "eq", "satisfied"),
    ]
    if jurisdictions:
        out.append(_c("jurisdiction", "isAnyOf", jurisdictions))
    return out


def _aggregate_research(
    *,
    scenario: str,
    k: int = 10,
    epsilon: float = 3.0,
    valid_for_days: int = 365,
    max_uses: int | None = None,
    jurisdictions: list[str] | None = None,
) -> dict[str, Any]:
    """Aggregates only, cells below `k` suppressed, total privacy budget `epsilon`, for `valid_for_days`
    from the agreement's start; each use logged."""
    cons = [
        *_common(scenario, valid_for_days, jurisdictions),
        _c("outputType", "eq", "aggregate"),
        _c("minCellSize", "gteq", str(k)),
        _c("privacyBudget", "lteq", f"{epsilon:g}"),
        _c("executionLocation", "eq", "provider"),
    ]
    if max_uses is not None:
        cons.append(_c("count", "lteq", str(max_uses)))
    return {
        "permission": [{"action": "use", "constraint": cons, "duty": [{"action": "log"}]}],
        "prohibition": [{"action": "transfer"}],
    }


def _deidentified_extract(
    *,
    scenario: str,
    k: int = 5,
    valid_for_days: int = 180,
    jurisdictions: list[str] | None = None,
) -> dict[str, Any]:
    """A de-identified record-level extract with k-anonymity ≥ `k`, deleted `valid_for_days` after the
    agreement's start; consent must have been obtained; each use logged."""
    cons = [
        *_common(scenario, valid_for_days, jurisdictions),
        _c("outputType", "eq", "deidentified-extract"),
        _c("kAnonymity", "gteq", str(k)),
    ]
    return {
        "permission": [
            {
                "action": "use",
                "constraint": cons,
                "duty": [
                    {"action": "obtainConsent"},
                    {"action": "log"},
                    {"action": "delete", "constraint": [_c("elapsedTime", "lteq", f"P{valid_for_days}D")]},
                ],
            }
        ],
        "prohibition": [{"action": "transfer"}],
    }


def _federated_model(
    *,
    scenario: str,
    epsilon: float | None = 1.0,
    valid_for_days: int = 365,
    non_commercial: bool = True,
    jurisdictions: list[str] | None = None,
) -> dict[str, Any]:
    """A model trained where the data lives with privacy budget `epsilon`; optionally non-commercial
    consumers only; each use logged and the provider informed.

    `epsilon=None` sets no privacy budget: models without a DP release (the federated GLM) may then
    run, under the provider's disclosure checks instead (minimum rows, parameters per row, no empty
    outcome cell); under a budget only analyses with a DP release may run."""
    cons = [
        *_common(scenario, valid_for_days, jurisdictions),
        _c("outputType", "isAnyOf", ["model", "aggregate"]),
        _c("executionLocation", "eq", "provider"),
    ]
    if epsilon is not None:
        cons.insert(-1, _c("privacyBudget", "lteq", f"{epsilon:g}"))
    if non_commercial:
        cons.append(_c("participantType", "isA", "non-commercial"))
    return {
        "permission": [
            {"action": "use", "constraint": cons, "duty": [{"action": "log"}, {"action": "inform"}]}
        ],
        "prohibition": [{"action": "transfer"}],
    }


TEMPLATES: dict[str, Callable[..., dict[str, Any]]] = {
    "aggregate-research": _aggregate_research,
    "deidentified-extract": _deidentified_extract,
    "federated-model": _federated_model,
}


def _check_params(params: dict[str, Any]) -> None:
    for name, low in (("k", 1), ("valid_for_days", 1), ("max_uses", 1)):
        v = params.get(name)
        if v is not None and (type(v) is not int or v < low):
            raise ValidationError(f"template parameter {name} must be an integer ≥ {low}, not {v!r}")
    eps = params.get("epsilon")
    if eps is not None and (type(eps) not in (int, float) or not 0 < eps < float("inf")):
        raise ValidationError(f"template parameter epsilon must be a positive number, not {eps!r}")
    if not isinstance(params.get("scenario"), str) or not params["scenario"]:
        raise ValidationError("template parameter scenario (a registered scenario id) is required")


def template(
    name: str,
    *,
    policy_type: str = "Offer",
    uid: str | None = None,
    target: str | None = None,
    assigner: str | None = None,
    assignee: str | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Build the policy of template `name` (see TEMPLATES) as compact JSON, ready for a DSP message.

    An Agreement needs `target`, `assigner` and `assignee` (DSP 2025-1). `uid` defaults to a name-based
    UUID of the template and its parameters, so the same call gives the same policy.
    Raises ValidationError for an unknown template or parameter, or a result that does not conform to the
    profile."""
    build = TEMPLATES.get(name)
    if build is None:
        raise ValidationError(f"unknown policy template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    _check_params(params)
    try:
        body = build(**params)
    except TypeError as exc:
        raise ValidationError(f"template {name!r}: {exc}") from exc
    key = name + repr(sorted(params.items()))
    policy: dict[str, Any] = {"@id": uid or f"urn:uuid:{uuid.uuid5(_NS, key)}", "@type": policy_type}
    for k, v in (("target", target), ("assigner", assigner), ("assignee", assignee)):
        if v is not None:
            policy[k] = v
    policy.update(body)
    compile_policy(policy)
    return policy
