"""FHIR R4 Consent <-> consent records, by hand: map the fields we use, refuse what we cannot honour.

One Consent resource is one decision of one patient on one scenario: `provision.type` (permit/deny),
`provision.period`, `provision.purpose` (the scenario id, in SCENARIO_CODE_SYSTEM), `provision.class`
(data classes, as FHIR resource types), `provision.actor` (the hospital as custodian), `dateTime`
(when the patient decided). Anything that could widen a use if ignored (nested provisions, an
inactive permit with no end, several scenarios in one resource) is refused with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from healthspace.consent.models import (
    FHIR_RESOURCE_OF_CLASS,
    ConsentRecord,
    DecisionKind,
    Source,
)
from healthspace.core.errors import ValidationError
from healthspace.core.ids import person_id_for

__all__ = [
    "CLASS_SYSTEM",
    "SCENARIO_CODE_SYSTEM",
    "ImportReport",
    "PatientRefs",
    "Rejection",
    "format_fhir_time",
    "from_fhir",
    "parse_ndjson",
    "to_fhir",
]

SCENARIO_CODE_SYSTEM = "https://healthspace.dev/fhir/CodeSystem/usage-scenario"
CLASS_SYSTEM = "http://hl7.org/fhir/resource-types"
_TERMINOLOGY = "http://terminology.hl7.org/CodeSystem"
_LOINC = "http://loinc.org"
_PARTICIPANT_SYSTEM = "https://healthspace.dev/participant"
_CLASS_OF_RESOURCE = {v: k for k, v in FHIR_RESOURCE_OF_CLASS.items()}
# Consent.scope by scenario (required in R4); scenarios not listed are privacy consents.
_SCOPE = {
    "diabetes-outcomes-research": "research",
    "drug-safety-surveillance": "research",
    "imaging-triage-ai-training": "research",
}
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_IN_FORCE = frozenset({"active", "inactive"})
MAX_LINE = 64 * 1024
MAX_REJECTIONS_LISTED = 100


class PatientRefs:
    """FHIR patient references, the hospital's Patient ids, and the person ids they stand for.

    The person id of `Patient/<id>` is `core.ids.person_id_for(<id>)`, the key the clinical store gives
    that patient at ingestion, so the registry's cohorts join the store without a lookup table. With a
    `prefix` (e.g. `gz-pat-`), ids of other sites are refused.
    """

    def __init__(self, prefix: str = "") -> None:
        if not _FHIR_ID.fullmatch(prefix + "0"):
            raise ValidationError(f"patient id prefix {prefix!r} does not make FHIR ids")
        self.prefix = prefix

    def patient_id(self, patient_id: str) -> str:
        """`patient_id` if it is a FHIR id of this hospital, else `ValidationError`."""
        if not isinstance(patient_id, str) or not _FHIR_ID.fullmatch(patient_id):
            raise ValidationError("a patient id must be a FHIR id (letters, digits, '-', '.'; at most 64)")
        if not patient_id.startswith(self.prefix) or patient_id == self.prefix:
            raise ValidationError(f"patient id is not {self.prefix}<id>: {patient_id[:80]!r}")
        return patient_id

    def from_reference(self, reference: str) -> str:
        """The Patient id of a reference `Patient/<id>`."""
        if not isinstance(reference, str) or not reference.startswith("Patient/"):
            raise ValidationError("patient.reference must be 'Patient/<id>'")
        return self.patient_id(reference[len("Patient/") :])

    def reference(self, patient_id: str) -> str:
        return f"Patient/{self.patient_id(patient_id)}"

    def person_id(self, patient_id: str) -> int:
        """The clinical store's person id of this patient."""
        return person_id_for(self.patient_id(patient_id))


def format_fhir_time(t: datetime) -> str:
    """A FHIR instant in UTC with 'Z'; fractional seconds only when there are any (exact round trip)."""
    t = t.astimezone(UTC)
    spec = "microseconds" if t.microsecond else "seconds"
    return t.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _time(value: object, where: str) -> datetime:
    if not isinstance(value, str) or "T" not in value:
        raise ValidationError(f"{where} must be a FHIR dateTime with a time and a zone")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(f"{where} is not a valid dateTime: {value[:40]!r}") from None
    if t.tzinfo is None:
        raise ValidationError(f"{where} has no time zone")
    return t.astimezone(UTC)


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(f"{where} must be an object")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValidationError(f"{where} must be an array")
    return value


def _scenario(provision: Mapping[str, Any]) -> str:
    purposes = _list(provision.get("purpose"), "provision.purpose")
    codes = []
    for p in purposes:
        p = _obj(p, "provision.purpose[]")
        if p.get("system") == SCENARIO_CODE_SYSTEM:
            code = p.get("code")
            if not isinstance(code, str) or not (0 < len(code) <= 200):
                raise ValidationError("provision.purpose code must be a scenario id")
            codes.append(code)
    if not codes:
        raise ValidationError(f"provision.purpose names no usage scenario (system {SCENARIO_CODE_SYSTEM})")
    if len(set(codes)) > 1:
        raise ValidationError("one Consent must name exactly one usage scenario")
    return codes[0]


def _classes(provision: Mapping[str, Any]) -> frozenset[str] | None:
    if "class" not in provision:
        return None
    out = set()
    for c in _list(provision["class"], "provision.class"):
        c = _obj(c, "provision.class[]")
        if c.get("system") != CLASS_SYSTEM:
            raise ValidationError(f"provision.class must use the system {CLASS_SYSTEM}")
        cls = _CLASS_OF_RESOURCE.get(str(c.get("code")))
        if cls is None:
            raise ValidationError(
                f"provision.class code {str(c.get('code'))[:40]!r} is not a known data class"
            )
        out.add(cls)
    if not out:
        raise ValidationError("provision.class is empty")
    return frozenset(out)


def from_fhir(resource: object, refs: PatientRefs) -> ConsentRecord:
    """The decision a FHIR R4 Consent states, or `ValidationError` with the reason it cannot be used.

    The record carries the resource id as `fhir_id`; it has no decision id or recording time yet.
    """
    r = _obj(resource, "the resource")
    if r.get("resourceType") != "Consent":
        raise ValidationError("resourceType is not Consent")
    rid = r.get("id")
    if not isinstance(rid, str) or not _FHIR_ID.fullmatch(rid):
        raise ValidationError("id is missing or not a FHIR id")
    status = r.get("status")
    if status not in _IN_FORCE:
        raise ValidationError(f"status {status!r} is not a decision (only active or inactive are recorded)")
    patient_id = refs.from_reference(_obj(r.get("patient"), "patient").get("reference"))  # type: ignore[arg-type]
    provision = _obj(r.get("provision"), "provision")
    if "provision" in provision:
        raise ValidationError("nested provisions (exceptions) are not supported")
    kind = provision.get("type")
    if kind not in ("permit", "deny"):
        raise ValidationError("provision.type must be permit or deny")
    period = _obj(provision.get("period", {}), "provision.period")
    decided = r.get("dateTime", period.get("start"))
    decided_at = _time(decided, "dateTime")
    valid_from = _time(period["start"], "provision.period.start") if "start" in period else decided_at
    valid_until = _time(period["end"], "provision.period.end") if "end" in period else None
    if status == "inactive" and kind == "permit" and valid_until is None:
        raise ValidationError("an inactive permit without provision.period.end: cannot tell when it stopped")
    if "actor" in provision:
        for a in _list(provision["actor"], "provision.actor"):
            _obj(_obj(a, "provision.actor[]").get("reference"), "provision.actor[].reference")
    classes = _classes(provision)
    return ConsentRecord(
        person_id=person_id_for(patient_id),
        scenario_id=_scenario(provision),
        decision=DecisionKind(kind),
        decided_at=decided_at,
        valid_from=valid_from,
        valid_until=valid_until,
        data_classes=classes,
        source=Source.IMPORT,
        fhir_id=rid,
        patient_id=patient_id,
    )


def to_fhir(
    record: ConsentRecord, refs: PatientRefs, now: datetime, custodian: str | None = None
) -> dict[str, Any]:
    """The FHIR R4 Consent of a record. `status` is inactive once its period has ended at `now`.

    A record without its FHIR Patient id (recorded before migration consent_0002) cannot be exported."""
    if record.patient_id is None:
        raise ValidationError(f"decision {record.decision_id} has no FHIR patient id; re-import it")
    ended = record.valid_until is not None and record.valid_until <= now
    permit = record.decision is DecisionKind.PERMIT
    period = {"start": format_fhir_time(record.valid_from)}
    if record.valid_until is not None:
        period["end"] = format_fhir_time(record.valid_until)
    provision: dict[str, Any] = {"type": record.decision.value, "period": period}
    if custodian:
        provision["actor"] = [
            {
                "role": {"coding": [{"system": f"{_TERMINOLOGY}/v3-ParticipationType", "code": "CST"}]},
                "reference": {"identifier": {"system": _PARTICIPANT_SYSTEM, "value": custodian}},
            }
        ]
    provision["purpose"] = [{"system": SCENARIO_CODE_SYSTEM, "code": record.scenario_id}]
    if record.data_classes is not None:
        provision["class"] = [
            {"system": CLASS_SYSTEM, "code": FHIR_RESOURCE_OF_CLASS[c]} for c in sorted(record.data_classes)
        ]
    scope = _SCOPE.get(record.scenario_id, "patient-privacy")
    return {
        "resourceType": "Consent",
        "id": record.fhir_id or record.decision_id,
        "status": "inactive" if ended else "active",
        "scope": {"coding": [{"system": f"{_TERMINOLOGY}/consentscope", "code": scope}]},
        "category": [{"coding": [{"system": _LOINC, "code": "59284-0", "display": "Patient Consent"}]}],
        "patient": {"reference": refs.reference(record.patient_id)},
        "dateTime": format_fhir_time(record.decided_at),
        "policyRule": {
            "coding": [{"system": f"{_TERMINOLOGY}/v3-ActCode", "code": "OPTIN" if permit else "OPTOUT"}]
        },
        "provision": provision,
    }


@dataclass(frozen=True, slots=True)
class Rejection:
    """A resource that was not imported: its line (1-based), its id if readable, and why."""

    line: int
    resource_id: str | None
    reason: str


@dataclass
class ImportReport:
    """What a bulk import did. Only the first MAX_REJECTIONS_LISTED rejections are listed."""

    lines: int = 0
    imported: int = 0
    unchanged: int = 0
    conflicts: int = 0
    rejected: int = 0
    rejections: list[Rejection] = field(default_factory=list)

    def reject(self, line: int, resource_id: str | None, reason: str) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_REJECTIONS_LISTED:
            self.rejections.append(Rejection(line, resource_id, reason))

    def to_json(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "imported": self.imported,
            "unchanged": self.unchanged,
            "conflicts": self.conflicts,
            "rejected": self.rejected,
            "rejections": [
                {"line": r.line, "id": r.resource_id, "reason": r.reason} for r in self.rejections
            ],
        }


def parse_ndjson(
    lines: Iterable[bytes], refs: PatientRefs, report: ImportReport
) -> Iterator[tuple[int, ConsentRecord]]:
    """Stream (line number, record) from NDJSON lines; bad lines go to `report` and are skipped."""
    for n, raw in enumerate(lines, start=1):
        report.lines = n
        line = raw.strip()
        if not line:
            continue
        if len(line) > MAX_LINE:
            report.reject(n, None, f"line longer than {MAX_LINE} bytes")
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            report.reject(n, None, "not JSON")
            continue
        rid = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
        try:
            yield n, from_fhir(obj, refs)
        except ValidationError as exc:
            report.reject(n, rid[:64] if rid else None, exc.detail)
