"""What the policy evaluator reads (Request, Facts) and what it answers (Decision, Duty)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import Any

__all__ = ["CrossBorderFact", "Decision", "Duty", "DutyState", "Facts", "Phase", "Request"]


class Phase(IntEnum):
    """When the policy is evaluated. Before JOB, job parameters (ε, k, cell size, output type, execution
    location) may be left unset: their constraints are then deferred, never waived (JOB checks them all)."""

    CATALOG = 1
    NEGOTIATION = 2
    TRANSFER = 3
    JOB = 4


class DutyState(Enum):
    """The recorded state of a duty, keyed by the duty's `@id` in `Facts.duty_states`."""

    NOT_SET = "not-set"
    FULFILLED = "fulfilled"
    VIOLATED = "violated"


@dataclass(frozen=True, slots=True)
class Request:
    """One attempted use. `epsilon` is the privacy budget this request would spend; `cell_size` the
    minimum cell size the job's disclosure control applies; `k` the k-anonymity an extract will have."""

    action: str = "use"
    target: str | None = None
    purpose: str | None = None
    consumer_id: str | None = None
    consumer_type: str | None = None
    consumer_roles: frozenset[str] = frozenset()
    consumer_jurisdiction: str | None = None
    output_type: str | None = None
    epsilon: float | None = None
    k: int | None = None
    cell_size: int | None = None
    execution_location: str | None = None
    phase: Phase = Phase.JOB


@dataclass(frozen=True, slots=True)
class CrossBorderFact:
    """The outcome of `crossborder.decide_transfer` for this request, as the evaluator sees it."""

    allowed: bool
    reason: str


_NO_DUTIES: Mapping[str, DutyState] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Facts:
    """The state of the world the provider knows: counters, budgets, times, approvals.

    `use_count` counts completed uses under the agreement (this request would be use `use_count + 1`);
    `epsilon_spent` is the ε already spent by this consumer under the agreement.
    """

    use_count: int = 0
    epsilon_spent: float = 0.0
    agreement_start: datetime | None = None
    consent_obtained: bool = False
    duty_states: Mapping[str, DutyState] = field(default_factory=lambda: _NO_DUTIES)
    party_collections: frozenset[str] = frozenset()
    """Collections (PartyCollection ids) the consumer belongs to."""
    asset_collections: frozenset[str] = frozenset()
    """Collections (AssetCollection ids) the requested target belongs to."""
    cross_border: CrossBorderFact | None = None


@dataclass(frozen=True, slots=True)
class Duty:
    """A duty the caller must carry out (or has carried out) for the use to stay lawful.

    `due` is the deadline when the duty's constraints give one (dateTime lt/lteq, or elapsedTime lt/lteq
    counted from the agreement start); `source` is the JSON pointer of the duty in the policy.
    """

    action: str
    uid: str | None
    source: str
    due: datetime | None = None
    constraints: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy decision: `allowed` with human-readable `reasons`, and the duties that come with it."""

    allowed: bool
    reasons: tuple[str, ...] = ()
    duties: tuple[Duty, ...] = ()
