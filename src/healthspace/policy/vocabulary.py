"""The terms of the health ODRL profile: actions, left operands, operators and their value types."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = [
    "ACTIONS",
    "DUTY_ACTIONS",
    "LEFT_OPERANDS",
    "OPERATORS",
    "OUTPUT_TYPES",
    "PARTICIPANT_TYPES",
    "PARTICIPANT_TYPE_GROUPS",
    "POLICY_TYPES",
    "LeftOperand",
    "ValueType",
    "action_includes",
    "actions_overlap",
    "region_within",
    "type_is_a",
]

ODRL_NS = "http://www.w3.org/ns/odrl/2/"

POLICY_TYPES = frozenset({"Offer", "Agreement", "Set"})

# Action hierarchy (child -> parent), after the ODRL 2.2 Common Vocabulary's `includedIn`. `write` is
# deprecated in ODRL 2.2 in favour of `modify` but kept because published policies still use it; `compute`
# is ours: running an analysis where the data lives (compute-to-data).
_ACTION_PARENT: dict[str, str | None] = {
    "use": None,
    "transfer": None,
    "read": "use",
    "write": "use",
    "modify": "use",
    "display": "use",
    "reproduce": "use",
    "derive": "use",
    "aggregate": "use",
    "anonymize": "use",
    "index": "use",
    "execute": "use",
    "distribute": "use",
    "compute": "use",
    "sell": "transfer",
    "give": "transfer",
}
ACTIONS = frozenset(_ACTION_PARENT)

# Actions a duty may require. `log` is ours (write an audit entry for each use); `reviewOutput` is ours
# (the provider holds each result until two of its reviewers release it; see docs/lab.md); `inform` is
# ODRL's notify-a-party; `obtainConsent` is a precondition (see evaluator), the others are obligations.
DUTY_ACTIONS = frozenset(
    {"delete", "inform", "log", "obtainConsent", "compensate", "anonymize", "attribute", "reviewOutput"}
)

OPERATORS = frozenset(
    {"eq", "neq", "lt", "lteq", "gt", "gteq", "isA", "hasPart", "isPartOf", "isAllOf", "isAnyOf", "isNoneOf"}
)

OUTPUT_TYPES = frozenset({"aggregate", "deidentified-extract", "model"})

# The participant types of identity.credentials.ParticipantType, and groups they belong to for `isA`.
PARTICIPANT_TYPES = frozenset(
    {"hospital", "health_bureau", "university", "company", "service_provider", "regulator"}
)
PARTICIPANT_TYPE_GROUPS: dict[str, frozenset[str]] = {
    "healthcare-provider": frozenset({"hospital"}),
    "public-body": frozenset({"health_bureau", "regulator"}),
    "academic": frozenset({"university"}),
    "commercial": frozenset({"company", "service_provider"}),
    "non-commercial": frozenset({"hospital", "health_bureau", "university", "regulator"}),
}


class ValueType(Enum):
    TERM = "term"
    TERM_SET = "term set"
    DATETIME = "date-time"
    DURATION = "duration"
    INTEGER = "integer"
    DECIMAL = "decimal"


_ORDERED = frozenset({"eq", "neq", "lt", "lteq", "gt", "gteq"})
_TERM = frozenset({"eq", "neq", "isAnyOf", "isNoneOf"})
_SET = frozenset({"hasPart", "isAllOf", "isAnyOf", "isNoneOf"})


@dataclass(frozen=True, slots=True)
class LeftOperand:
    """One left operand: its value type, the operators it accepts and where its value comes from."""

    name: str
    label: str
    type: ValueType
    operators: frozenset[str]
    source: str
    values: frozenset[str] | None = None
    deferrable: bool = False
    """Its value depends on the job (or the agreement): before the job phase it may be unknown."""


LEFT_OPERANDS: dict[str, LeftOperand] = {
    op.name: op
    for op in (
        LeftOperand("purpose", "purpose", ValueType.TERM, _TERM, "request.purpose (a scenario id)"),
        LeftOperand("dateTime", "date-time", ValueType.DATETIME, _ORDERED, "now"),
        LeftOperand(
            "elapsedTime",
            "elapsed time",
            ValueType.DURATION,
            _ORDERED,
            "now - facts.agreement_start",
            deferrable=True,
        ),
        LeftOperand("count", "use count", ValueType.INTEGER, _ORDERED, "facts.use_count + 1 (this use)"),
        LeftOperand(
            "jurisdiction",
            "consumer jurisdiction",
            ValueType.TERM,
            _TERM | {"isPartOf"},
            "request.consumer_jurisdiction",
        ),
        LeftOperand(
            "participantType",
            "consumer participant type",
            ValueType.TERM,
            _TERM | {"isA"},
            "request.consumer_type",
            values=PARTICIPANT_TYPES,
        ),
        LeftOperand("role", "consumer roles", ValueType.TERM_SET, _SET, "request.consumer_roles"),
        LeftOperand(
            "outputType",
            "output type",
            ValueType.TERM,
            _TERM,
            "request.output_type",
            values=OUTPUT_TYPES,
            deferrable=True,
        ),
        LeftOperand(
            "minCellSize",
            "minimum cell size",
            ValueType.INTEGER,
            _ORDERED,
            "request.cell_size",
            deferrable=True,
        ),
        LeftOperand(
            "privacyBudget",
            "privacy budget",
            ValueType.DECIMAL,
            _ORDERED,
            "facts.epsilon_spent + request.epsilon",
            deferrable=True,
        ),
        LeftOperand(
            "kAnonymity",
            "anonymisation level k",
            ValueType.INTEGER,
            _ORDERED,
            "request.k",
            deferrable=True,
        ),
        LeftOperand(
            "executionLocation",
            "execution location",
            ValueType.TERM,
            _TERM | {"isPartOf"},
            "request.execution_location",
            deferrable=True,
        ),
        LeftOperand(
            "crossBorderRules",
            "cross-border rules",
            ValueType.TERM,
            frozenset({"eq"}),
            "facts.cross_border (see policy.crossborder)",
            values=frozenset({"satisfied"}),
            deferrable=True,
        ),
    )
}


def action_includes(broad: str, narrow: str) -> bool:
    """True if `narrow` is `broad` or (transitively) included in it. Unknown actions include nothing."""
    current: str | None = narrow
    while current is not None:
        if current == broad:
            return True
        current = _ACTION_PARENT.get(current)
    return False


def actions_overlap(a: str, b: str) -> bool:
    return action_includes(a, b) or action_includes(b, a)


def region_within(code: str, region: str) -> bool:
    """ISO 3166 containment by code shape: "CN-GD" is within "CN"; "HK" is within "HK" only."""
    return code == region or code.startswith(region + "-")


def type_is_a(participant_type: str, group: str) -> bool:
    if participant_type == group:
        return True
    members = PARTICIPANT_TYPE_GROUPS.get(group)
    return members is not None and participant_type in members
