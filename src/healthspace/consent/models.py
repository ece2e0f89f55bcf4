"""Consent domain types and the pure consent decision: which recorded decision governs a use, and why."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType

from healthspace.core.errors import ValidationError
from healthspace.core.ids import person_id_for

__all__ = [
    "DATA_CLASSES",
    "DATA_CLASS_BITS",
    "FHIR_RESOURCE_OF_CLASS",
    "OMOP_TABLE_CLASS",
    "ConsentCheck",
    "ConsentRecord",
    "DecisionKind",
    "ScenarioInfo",
    "Source",
    "WithdrawalEvent",
    "aware",
    "check_consent",
    "classes_for_omop_tables",
    "classes_of_mask",
    "governing",
    "mask_of",
]


class DecisionKind(StrEnum):
    """A patient's decision on one scenario (FHIR Consent.provision.type)."""

    PERMIT = "permit"
    DENY = "deny"


class Source(StrEnum):
    """Where a recorded decision came from."""

    PATIENT = "patient"
    STAFF = "staff"
    IMPORT = "import"


# The data classes of the authority's scenario registry. The bit of each class is a storage format
# (the `class_mask` column): never renumber, only append.
DATA_CLASS_BITS: Mapping[str, int] = MappingProxyType(
    {
        "demographics": 1,
        "encounters": 2,
        "conditions": 4,
        "laboratory": 8,
        "medications": 16,
        "procedures": 32,
        "imaging": 64,
    }
)
DATA_CLASSES: frozenset[str] = frozenset(DATA_CLASS_BITS)
# FHIR R4 resource type standing for each class in Consent.provision.class.
FHIR_RESOURCE_OF_CLASS: Mapping[str, str] = MappingProxyType(
    {
        "demographics": "Patient",
        "encounters": "Encounter",
        "conditions": "Condition",
        "laboratory": "Observation",
        "medications": "MedicationRequest",
        "procedures": "Procedure",
        "imaging": "ImagingStudy",
    }
)
# Which class a query on an OMOP table uses.
OMOP_TABLE_CLASS: Mapping[str, str] = MappingProxyType(
    {
        "person": "demographics",
        "death": "demographics",
        "observation_period": "encounters",
        "visit_occurrence": "encounters",
        "condition_occurrence": "conditions",
        "measurement": "laboratory",
        "drug_exposure": "medications",
        "procedure_occurrence": "procedures",
    }
)


def mask_of(classes: Iterable[str]) -> int:
    """The bit mask of a set of data classes; an unknown class is a `ValidationError`."""
    mask = 0
    for c in classes:
        bit = DATA_CLASS_BITS.get(c)
        if bit is None:
            raise ValidationError(
                f"unknown data class {c!r}; known: {', '.join(sorted(DATA_CLASSES))}", data_class=c
            )
        mask |= bit
    return mask


def classes_of_mask(mask: int) -> frozenset[str]:
    return frozenset(c for c, bit in DATA_CLASS_BITS.items() if mask & bit)


def classes_for_omop_tables(tables: Iterable[str]) -> frozenset[str]:
    """The data classes a query over these OMOP tables uses; an unmapped table is a `ValidationError`."""
    out = set()
    for t in tables:
        c = OMOP_TABLE_CLASS.get(t)
        if c is None:
            raise ValidationError(f"OMOP table {t!r} has no data class", table=t)
        out.add(c)
    return frozenset(out)


def aware(t: datetime, name: str = "time") -> datetime:
    """`t` if timezone-aware, else a `ValidationError` (naive times are never guessed at)."""
    if not isinstance(t, datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise ValidationError(f"{name} must be a timezone-aware datetime")
    return t


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """One recorded decision of one patient on one scenario. Records are never changed once stored.

    The record speaks for the interval [valid_from, valid_until) (open-ended when `valid_until` is None).
    At any instant, of the records whose interval holds it, the one decided last (`decided_at`, then
    `seq`, the order of recording) governs. `data_classes` None means "no limit"; a set limits a permit
    to uses of those classes only. A deny carries no classes: it refuses every use of the scenario.
    """

    person_id: int
    scenario_id: str
    decision: DecisionKind
    decided_at: datetime
    valid_from: datetime
    valid_until: datetime | None = None
    data_classes: frozenset[str] | None = None
    decision_id: str = ""
    seq: int = 0
    recorded_at: datetime | None = None
    source: Source = Source.STAFF
    actor: str = ""
    fhir_id: str | None = None
    patient_id: str | None = None
    """The FHIR Patient id (e.g. `gz-pat-17`); `person_id` is then `core.ids.person_id_for(patient_id)`,
    the clinical store's own key, so a cohort joins the store directly."""

    def __post_init__(self) -> None:
        if isinstance(self.person_id, bool) or not isinstance(self.person_id, int) or self.person_id < 0:
            raise ValidationError("person_id must be a non-negative integer")
        if self.patient_id is not None and (
            not isinstance(self.patient_id, str) or person_id_for(self.patient_id) != self.person_id
        ):
            raise ValidationError("person_id is not the clinical store's id of patient_id")
        if not isinstance(self.scenario_id, str) or not (0 < len(self.scenario_id) <= 200):
            raise ValidationError("scenario_id must be a non-empty string of at most 200 characters")
        try:
            object.__setattr__(self, "decision", DecisionKind(self.decision))
            object.__setattr__(self, "source", Source(self.source))
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        aware(self.decided_at, "decided_at")
        aware(self.valid_from, "valid_from")
        if self.valid_until is not None and aware(self.valid_until, "valid_until") <= self.valid_from:
            raise ValidationError("the consent period must end after it starts")
        if self.data_classes is not None:
            classes = frozenset(self.data_classes)
            if self.decision is DecisionKind.DENY:
                raise ValidationError("a deny refuses the whole scenario and takes no data-class limit")
            if not classes:
                raise ValidationError("a data-class limit must name at least one class")
            mask_of(classes)
            object.__setattr__(self, "data_classes", classes)

    @property
    def class_mask(self) -> int | None:
        return None if self.data_classes is None else mask_of(self.data_classes)

    def holds_at(self, at: datetime) -> bool:
        return self.valid_from <= at and (self.valid_until is None or at < self.valid_until)

    def same_decision(self, other: ConsentRecord) -> bool:
        """True when both records state the same thing (ids, seq and bookkeeping aside)."""
        return (
            self.person_id == other.person_id
            and self.scenario_id == other.scenario_id
            and self.decision == other.decision
            and self.decided_at == other.decided_at
            and self.valid_from == other.valid_from
            and self.valid_until == other.valid_until
            and self.data_classes == other.data_classes
        )


@dataclass(frozen=True, slots=True)
class ConsentCheck:
    """The answer to "may this patient's data be used for this scenario, these classes, now?"."""

    allowed: bool
    reasons: tuple[str, ...]
    governing: ConsentRecord | None = None


@dataclass(frozen=True, slots=True)
class ScenarioInfo:
    """A scenario as a patient sees it (from the authority's registry)."""

    scenario_id: str
    title: str
    description: str = ""
    data_classes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WithdrawalEvent:
    """Sent to withdrawal subscribers after a withdrawal is committed (e.g. to retire agreements)."""

    person_id: int
    patient: str
    scenario_id: str
    at: datetime
    decision_id: str
    extra: Mapping[str, str] = field(default_factory=dict)


def governing(records: Sequence[ConsentRecord], at: datetime) -> ConsentRecord | None:
    """The record governing instant `at` among one patient's records on one scenario, or None."""
    aware(at, "at")
    best: ConsentRecord | None = None
    for r in records:
        if r.holds_at(at) and (best is None or (r.decided_at, r.seq) > (best.decided_at, best.seq)):
            best = r
    return best


def check_consent(
    records: Sequence[ConsentRecord], scenario_id: str, at: datetime, data_classes: Iterable[str]
) -> ConsentCheck:
    """The consent decision for one patient: default deny, with the reasons. Pure.

    `records` may hold any of the patient's records; only those on `scenario_id` count. Denies when:
    no record holds at `at` (none, or every period has ended or not begun), the governing record is a
    deny, or it is a permit limited to classes that do not include every one of `data_classes`.
    """
    classes = frozenset(data_classes)
    if not classes:
        raise ValidationError("name the data classes the use reads (at least one)")
    mask_of(classes)
    mine = [r for r in records if r.scenario_id == scenario_id]
    if not mine:
        return ConsentCheck(False, ("no consent recorded for this scenario (default deny)",))
    g = governing(mine, at)
    if g is None:
        return ConsentCheck(False, ("no consent in force at this time (expired or not yet begun)",))
    if g.decision is DecisionKind.DENY:
        return ConsentCheck(
            False, (f"the patient denied or withdrew consent on {g.decided_at.isoformat()}",), g
        )
    if g.data_classes is not None and not classes <= g.data_classes:
        missing = ", ".join(sorted(classes - g.data_classes))
        return ConsentCheck(False, (f"consent does not cover data classes: {missing}",), g)
    return ConsentCheck(True, ("permitted by the patient's consent",), g)
