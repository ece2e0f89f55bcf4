"""Cross-border transfer rules between jurisdictions, as data, and the pure decision they give.

The rule set (see docs/policy/README.md for the legal reading behind it):

- CN-GD (PIPL; the GBA cross-boundary arrangements): record-level output (de-identified extracts and
  trained models, which can memorise records) leaves CN-GD only under a registered export approval for
  that dataset, consumer and scenario, unexpired; aggregates that passed disclosure control may leave.
- HK (PDPO): DPP3 and the s.62 research exemption let record-level data go to researchers elsewhere when
  the output does not identify anyone and the use stays research: allowed with those safeguards as duties.
- MO (PDPA, Law 8/2005 arts. 19-20): record-level data leaves Macao only with an authorisation of the
  data protection office, registered here as an export approval; aggregates may leave.

`provider_jurisdiction` is the jurisdiction whose rules govern the data: where it was collected, and for
a dataset of HK residents held elsewhere, HK. A jurisdiction or output type with no rule is denied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from healthspace.policy.models import CrossBorderFact, Decision
from healthspace.policy.vocabulary import OUTPUT_TYPES, region_within

__all__ = [
    "DEFAULT_RULES",
    "ExportApproval",
    "JurisdictionRules",
    "Treatment",
    "cross_border_fact",
    "decide_transfer",
]


class Treatment(Enum):
    ALLOW = "allow"
    ALLOW_WITH_SAFEGUARDS = "allow-with-safeguards"
    REQUIRE_APPROVAL = "require-approval"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class JurisdictionRules:
    """What leaving `home` means for data governed by it. A consumer within `home` (ISO code containment)
    is domestic and always allowed; abroad, `abroad` gives the treatment per output type."""

    home: str
    abroad: Mapping[str, Treatment]
    basis: str
    safeguards: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ExportApproval:
    """A registered export approval (e.g. a CAC security assessment or standard contract filing, or a
    Macao DSPDP authorisation) for one dataset, consumer and scenario, valid until `expires_at`."""

    reference: str
    dataset_id: str
    consumer_id: str
    scenario_id: str
    expires_at: datetime


_RECORD_LEVEL_NEEDS_APPROVAL = {
    "aggregate": Treatment.ALLOW,
    "deidentified-extract": Treatment.REQUIRE_APPROVAL,
    "model": Treatment.REQUIRE_APPROVAL,
}

DEFAULT_RULES: Mapping[str, JurisdictionRules] = {
    "CN-GD": JurisdictionRules(
        "CN-GD",
        _RECORD_LEVEL_NEEDS_APPROVAL,
        "PIPL art. 38: personal information leaves only under an approved export mechanism",
    ),
    "HK": JurisdictionRules(
        "HK",
        {
            "aggregate": Treatment.ALLOW,
            "deidentified-extract": Treatment.ALLOW_WITH_SAFEGUARDS,
            "model": Treatment.ALLOW_WITH_SAFEGUARDS,
        },
        "PDPO DPP3 and s.62: research use whose results identify no one",
        safeguards=(
            "use for the registered research scenario only",
            "publish no result in a form that identifies a data subject",
        ),
    ),
    "MO": JurisdictionRules(
        "MO",
        _RECORD_LEVEL_NEEDS_APPROVAL,
        "PDPA (Law 8/2005) arts. 19-20: transfer abroad needs an adequate destination or authorisation",
    ),
}


def decide_transfer(
    rules: Mapping[str, JurisdictionRules],
    provider_jurisdiction: str,
    consumer_jurisdiction: str,
    output_type: str,
    dataset_id: str,
    consumer_id: str,
    scenario_id: str,
    approvals: Iterable[ExportApproval],
    now: datetime,
) -> Decision:
    """May output of `output_type` from data governed by `provider_jurisdiction` go to this consumer?

    Pure. The safeguards of an ALLOW_WITH_SAFEGUARDS rule are stated in the reasons. An approval counts
    only if dataset, consumer and scenario all match and it has not expired at `now` (timezone-aware)."""
    if now.tzinfo is None:
        return Decision(False, ("cross-border: now must be timezone-aware",))
    if output_type not in OUTPUT_TYPES:
        return Decision(False, (f"cross-border: unknown output type {output_type!r}",))
    rule = rules.get(provider_jurisdiction)
    if rule is None:
        return Decision(False, (f"cross-border: no rules for data governed by {provider_jurisdiction!r}",))
    route = f"{output_type} from {provider_jurisdiction} to {consumer_jurisdiction}"
    if region_within(consumer_jurisdiction, rule.home):
        return Decision(True, (f"{route}: domestic",))
    treatment = rule.abroad.get(output_type, Treatment.DENY)
    if treatment is Treatment.ALLOW:
        return Decision(True, (f"{route}: allowed ({rule.basis})",))
    if treatment is Treatment.ALLOW_WITH_SAFEGUARDS:
        safeguards = "; ".join(rule.safeguards)
        return Decision(True, (f"{route}: allowed with safeguards ({rule.basis}): {safeguards}",))
    if treatment is Treatment.DENY:
        return Decision(False, (f"{route}: not allowed ({rule.basis})",))
    matching = [
        a
        for a in approvals
        if a.dataset_id == dataset_id and a.consumer_id == consumer_id and a.scenario_id == scenario_id
    ]
    valid = [a for a in matching if now < a.expires_at]
    if valid:
        best = max(valid, key=lambda a: a.expires_at)
        return Decision(
            True, (f"{route}: export approval {best.reference} valid until {best.expires_at.isoformat()}",)
        )
    if matching:
        latest = max(matching, key=lambda a: a.expires_at)
        return Decision(
            False,
            (f"{route}: export approval {latest.reference} expired at {latest.expires_at.isoformat()}",),
        )
    return Decision(
        False,
        (
            f"{route}: needs an export approval for dataset {dataset_id!r}, consumer {consumer_id!r} and "
            f"scenario {scenario_id!r}; none is registered ({rule.basis})",
        ),
    )


def cross_border_fact(decision: Decision) -> CrossBorderFact:
    """The evaluator's view of a transfer decision: put it in `Facts.cross_border`."""
    return CrossBorderFact(decision.allowed, "; ".join(decision.reasons))
