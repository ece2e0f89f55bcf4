"""Policy evaluation speed for a typical agreement, against the same conditions hand-inlined in Python.

The baseline is the fastest honest Python for the same decision: one function with the seven conditions
written out (no reasons, no type checks, no duties). The ratio shows what the compiled, fail-closed,
reason-giving evaluator costs over that floor; the issue's target is 50,000 decisions/s.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial

from healthspace.bench.harness import Figure, rate
from healthspace.policy import Facts, Request, compile_policy, evaluate

__all__ = ["run"]

TARGET = 50_000.0
NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def _agreement() -> dict[str, object]:
    def c(left: str, op: str, right: object) -> dict[str, object]:
        return {"leftOperand": left, "operator": op, "rightOperand": right}

    return {
        "@id": "urn:uuid:bench-agreement",
        "@type": "Agreement",
        "target": "urn:dataset:t2d",
        "assigner": "did:web:hospital",
        "assignee": "did:web:university",
        "permission": [
            {
                "action": "use",
                "constraint": [
                    c("purpose", "eq", "diabetes-outcomes-research"),
                    c("dateTime", "gteq", "2026-01-01T00:00:00Z"),
                    c("dateTime", "lt", "2027-01-01T00:00:00Z"),
                    c("count", "lteq", "1000"),
                    c("outputType", "eq", "aggregate"),
                    c("minCellSize", "gteq", "10"),
                    c("privacyBudget", "lteq", "3"),
                    c("jurisdiction", "isAnyOf", ["CN-GD", "HK", "MO"]),
                ],
                "duty": [{"action": "log"}],
            }
        ],
    }


_LO, _HI = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
_PLACES = frozenset({"CN-GD", "HK", "MO"})


def _inlined(r: Request, f: Facts, now: datetime) -> bool:
    return (
        r.target == "urn:dataset:t2d"
        and r.consumer_id == "did:web:university"
        and r.purpose == "diabetes-outcomes-research"
        and _LO <= now < _HI
        and f.use_count + 1 <= 1000
        and r.output_type == "aggregate"
        and r.cell_size is not None
        and r.cell_size >= 10
        and r.epsilon is not None
        and f.epsilon_spent + r.epsilon <= 3
        and r.consumer_jurisdiction in _PLACES
    )


def run(quick: bool) -> list[Figure]:
    policy = compile_policy(_agreement())
    request = Request(
        action="compute",
        target="urn:dataset:t2d",
        purpose="diabetes-outcomes-research",
        consumer_id="did:web:university",
        consumer_jurisdiction="HK",
        output_type="aggregate",
        epsilon=0.5,
        cell_size=10,
    )
    facts = Facts(use_count=12, epsilon_spent=1.0, agreement_start=NOW - timedelta(days=30))
    over_budget = Facts(use_count=12, epsilon_spent=2.9, agreement_start=facts.agreement_start)
    if (
        not evaluate(policy, request, facts, NOW).allowed
        or evaluate(policy, request, over_budget, NOW).allowed
    ):
        raise RuntimeError("benchmark policy does not decide as intended")
    if not _inlined(request, facts, NOW) or _inlined(request, over_budget, NOW):
        raise RuntimeError("baseline does not decide as intended")
    n = 5_000 if quick else 50_000
    repeat = 3 if quick else 7

    def ours(f: Facts) -> None:
        for _ in range(n):
            evaluate(policy, request, f, NOW)

    def baseline(f: Facts) -> None:
        for _ in range(n):
            _inlined(request, f, NOW)

    figures = []
    for label, f in (("allowed", facts), ("denied (budget exceeded)", over_budget)):
        figures.append(
            Figure(
                name=f"policy decisions/s, typical agreement, {label}",
                unit="decisions/s",
                samples=rate(partial(ours, f), n, repeat=repeat),
                baseline_name="same conditions hand-inlined in Python",
                baseline_samples=rate(partial(baseline, f), n, repeat=repeat),
                target=TARGET,
                note="8 constraints + target + assignee + duty; compiled once, evaluate() per decision",
            )
        )
    return figures
