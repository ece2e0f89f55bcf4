"""FHIR R4 resources to flat staging rows: one tuple per resource, no validation beyond shape.

Each mapped resource type has a fixed list of staging columns (strings and numbers as found); the ingest
pipeline turns a chunk of them into an Arrow table and does typing, validation and the OMOP mapping in
DuckDB, set-based. Extraction stays cheap: plain dict look-ups, no FHIR model library on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

__all__ = [
    "ELEMENTS",
    "FHIR_R4_RESOURCE_TYPES",
    "MAPPERS",
    "NOT_CLINICAL",
    "STAGING",
    "SYSTEMS",
    "reference_id",
]

# Every resource type of FHIR R4 (4.0.1). A type in this set that we do not map is reported as unmapped;
# anything else is not FHIR R4 and is quarantined.
FHIR_R4_RESOURCE_TYPES = frozenset(
    [
        "Account",
        "ActivityDefinition",
        "AdverseEvent",
        "AllergyIntolerance",
        "Appointment",
        "AppointmentResponse",
        "AuditEvent",
        "Basic",
        "Binary",
        "BiologicallyDerivedProduct",
        "BodyStructure",
        "Bundle",
        "CapabilityStatement",
        "CarePlan",
        "CareTeam",
        "CatalogEntry",
        "ChargeItem",
        "ChargeItemDefinition",
        "Claim",
        "ClaimResponse",
        "ClinicalImpression",
        "CodeSystem",
        "Communication",
        "CommunicationRequest",
        "CompartmentDefinition",
        "Composition",
        "ConceptMap",
        "Condition",
        "Consent",
        "Contract",
        "Coverage",
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
        "DetectedIssue",
        "Device",
        "DeviceDefinition",
        "DeviceMetric",
        "DeviceRequest",
        "DeviceUseStatement",
        "DiagnosticReport",
        "DocumentManifest",
        "DocumentReference",
        "EffectEvidenceSynthesis",
        "Encounter",
        "Endpoint",
        "EnrollmentRequest",
        "EnrollmentResponse",
        "EpisodeOfCare",
        "EventDefinition",
        "Evidence",
        "EvidenceVariable",
        "ExampleScenario",
        "ExplanationOfBenefit",
        "FamilyMemberHistory",
        "Flag",
        "Goal",
        "GraphDefinition",
        "Group",
        "GuidanceResponse",
        "HealthcareService",
        "ImagingStudy",
        "Immunization",
        "ImmunizationEvaluation",
        "ImmunizationRecommendation",
        "ImplementationGuide",
        "InsurancePlan",
        "Invoice",
        "Library",
        "Linkage",
        "List",
        "Location",
        "Measure",
        "MeasureReport",
        "Media",
        "Medication",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationKnowledge",
        "MedicationRequest",
        "MedicationStatement",
        "MedicinalProduct",
        "MedicinalProductAuthorization",
        "MedicinalProductContraindication",
        "MedicinalProductIndication",
        "MedicinalProductIngredient",
        "MedicinalProductInteraction",
        "MedicinalProductManufactured",
        "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect",
        "MessageDefinition",
        "MessageHeader",
        "MolecularSequence",
        "NamingSystem",
        "NutritionOrder",
        "Observation",
        "ObservationDefinition",
        "OperationDefinition",
        "OperationOutcome",
        "Organization",
        "OrganizationAffiliation",
        "Parameters",
        "Patient",
        "PaymentNotice",
        "PaymentReconciliation",
        "Person",
        "PlanDefinition",
        "Practitioner",
        "PractitionerRole",
        "Procedure",
        "Provenance",
        "Questionnaire",
        "QuestionnaireResponse",
        "RelatedPerson",
        "RequestGroup",
        "ResearchDefinition",
        "ResearchElementDefinition",
        "ResearchStudy",
        "ResearchSubject",
        "RiskAssessment",
        "RiskEvidenceSynthesis",
        "Schedule",
        "SearchParameter",
        "ServiceRequest",
        "Slot",
        "Specimen",
        "SpecimenDefinition",
        "StructureDefinition",
        "StructureMap",
        "Subscription",
        "Substance",
        "SubstanceNucleicAcid",
        "SubstancePolymer",
        "SubstanceProtein",
        "SubstanceReferenceInformation",
        "SubstanceSourceMaterial",
        "SubstanceSpecification",
        "SupplyDelivery",
        "SupplyRequest",
        "Task",
        "TerminologyCapabilities",
        "TestReport",
        "TestScript",
        "ValueSet",
        "VerificationResult",
        "VisionPrescription",
    ]
)

# Types that are valid here but belong to another part of the connector (the consent registry).
NOT_CLINICAL = frozenset({"Consent"})

# Short vocabulary names (OMOP vocabulary_id style) for the code systems we know by URI.
SYSTEMS: dict[str, str] = {
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://loinc.org": "LOINC",
    "http://www.whocc.no/atc": "ATC",
    "http://snomed.info/sct": "SNOMED",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://www.cms.gov/Medicare/Coding/ICD10": "ICD10PCS",
    "http://unitsofmeasure.org": "UCUM",
}

_S, _F, _I, _B = pa.string(), pa.float64(), pa.int64(), pa.bool_()

# Staging columns per mapped type, in tuple order.
STAGING: dict[str, list[tuple[str, pa.DataType]]] = {
    "Patient": [
        ("id", _S),
        ("gender", _S),
        ("birth_date", _S),
        ("deceased_dt", _S),
        ("deceased_flag", _B),
        ("identifier_system", _S),
        ("identifier_value", _S),
    ],
    "Encounter": [
        ("id", _S),
        ("subject", _S),
        ("status", _S),
        ("class_code", _S),
        ("start", _S),
        ("end", _S),
    ],
    "Condition": [
        ("id", _S),
        ("subject", _S),
        ("encounter", _S),
        ("code_system", _S),
        ("code", _S),
        ("onset", _S),
        ("abatement", _S),
        ("clinical_status", _S),
        ("verification_status", _S),
    ],
    "Observation": [
        ("id", _S),
        ("subject", _S),
        ("encounter", _S),
        ("status", _S),
        ("code_system", _S),
        ("code", _S),
        ("effective", _S),
        ("value_num", _F),
        ("unit", _S),
        ("value_code", _S),
        ("ref_low", _F),
        ("ref_high", _F),
        ("value_bad", _S),
    ],
    "MedicationRequest": [
        ("id", _S),
        ("subject", _S),
        ("encounter", _S),
        ("status", _S),
        ("code_system", _S),
        ("code", _S),
        ("authored", _S),
        ("validity_start", _S),
        ("validity_end", _S),
        ("supply_days", _F),
        ("quantity", _F),
        ("refills", _I),
        ("sig", _S),
        ("route", _S),
    ],
    "Procedure": [
        ("id", _S),
        ("subject", _S),
        ("encounter", _S),
        ("status", _S),
        ("code_system", _S),
        ("code", _S),
        ("performed", _S),
        ("performed_end", _S),
    ],
}

# FHIR element names a standard profile may name (required elements, value sets), and the SQL expression
# over the staging columns that holds each one.
ELEMENTS: dict[str, dict[str, str]] = {
    "Patient": {
        "id": "id",
        "gender": "gender",
        "birthDate": "birth_date",
        "identifier": "identifier_value",
    },
    "Encounter": {
        "id": "id",
        "subject": "subject",
        "status": "status",
        "class": "class_code",
        "period.start": "start",
        "period.end": '"end"',
    },
    "Condition": {
        "id": "id",
        "subject": "subject",
        "encounter": "encounter",
        "code": "code",
        "onset": "onset",
        "clinicalStatus": "clinical_status",
        "verificationStatus": "verification_status",
    },
    "Observation": {
        "id": "id",
        "subject": "subject",
        "encounter": "encounter",
        "status": "status",
        "code": "code",
        "effective": "effective",
        "value": "coalesce(CAST(value_num AS VARCHAR), value_code)",
    },
    "MedicationRequest": {
        "id": "id",
        "subject": "subject",
        "encounter": "encounter",
        "status": "status",
        "medication": "code",
        "authoredOn": "authored",
    },
    "Procedure": {
        "id": "id",
        "subject": "subject",
        "encounter": "encounter",
        "status": "status",
        "code": "code",
        "performed": "performed",
    },
}

Row = tuple[Any, ...]
Mapper = Callable[[Mapping[str, Any], frozenset[str]], Row]


def reference_id(ref: Any) -> str | None:
    """`Type/id` from a reference (relative, absolute or versioned); other forms are returned unchanged."""
    if not isinstance(ref, dict):
        return None
    value = ref.get("reference")
    if not isinstance(value, str):
        return None
    if value.count("/") == 1 and value[:1].isupper():
        return value  # the usual relative form, Type/id
    parts = value.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return f"{parts[-2]}/{parts[-1]}"
    return value


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _coding(cc: Any, allowed: frozenset[str]) -> tuple[str | None, str | None]:
    """(system, code) of the first coding in an allowed system, else of the first coding."""
    if not isinstance(cc, dict):
        return None, None
    codings = cc.get("coding")
    if not isinstance(codings, list) or not codings:
        return None, None
    pick = codings[0]
    for c in codings:
        if isinstance(c, dict) and c.get("system") in allowed:
            pick = c
            break
    if not isinstance(pick, dict):
        return None, None
    return _str(pick.get("system")), _str(pick.get("code"))


def _cc_code(cc: Any) -> str | None:
    if isinstance(cc, dict):
        codings = cc.get("coding")
        if isinstance(codings, list) and codings and isinstance(codings[0], dict):
            return _str(codings[0].get("code"))
    return None


def _period(p: Any) -> tuple[str | None, str | None]:
    if isinstance(p, dict):
        return _str(p.get("start")), _str(p.get("end"))
    return None, None


def _patient(r: Mapping[str, Any], allowed: frozenset[str]) -> Row:
    system = value = None
    ids = r.get("identifier")
    if isinstance(ids, list) and ids and isinstance(ids[0], dict):
        system, value = _str(ids[0].get("system")), _str(ids[0].get("value"))
    flag = r.get("deceasedBoolean")
    return (
        _str(r.get("id")),
        _str(r.get("gender")),
        _str(r.get("birthDate")),
        _str(r.get("deceasedDateTime")),
        flag if isinstance(flag, bool) else None,
        system,
        value,
    )


def _encounter(r: Mapping[str, Any], allowed: frozenset[str]) -> Row:
    cls = r.get("class")
    start, end = _period(r.get("period"))
    return (
        _str(r.get("id")),
        reference_id(r.get("subject")),
        _str(r.get("status")),
        _str(cls.get("code")) if isinstance(cls, dict) else None,
        start,
        end,
    )


def _condition(r: Mapping[str, Any], allowed: frozenset[str]) -> Row:
    system, code = _coding(r.get("code"), allowed)
    onset = _str(r.get("onsetDateTime")) or _period(r.get("onsetPeriod"))[0] or _str(r.get("recordedDate"))
    abatement = _str(r.get("abatementDateTime")) or _period(r.get("abatementPeriod"))[1]
    return (
        _str(r.get("id")),
        reference_id(r.get("subject")),
        reference_id(r.get("encounter")),
        system,
        code,
        onset,
        abatement,
        _cc_code(r.get("clinicalStatus")),
        _cc_code(r.get("verificationStatus")),
    )


def _observation(r: Mapping[str, Any], allowed: frozenset[str]) -> Row:
    system, code = _coding(r.get("code"), allowed)
    effective = (
        _str(r.get("effectiveDateTime")) or _period(r.get("effectivePeriod"))[0] or _str(r.get("issued"))
    )
    q = r.get("valueQuantity")
    value = unit = bad = None
    if isinstance(q, dict):
        value = _num(q.get("value"))
        unit = _str(q.get("code")) or _str(q.get("unit"))
        if value is None and q.get("value") is not None:
            # Kept to be refused by validation: dropping it would store the observation without its value.
            bad = str(q.get("value"))[:100]
    value_code = _cc_code(r.get("valueCodeableConcept")) or _str(r.get("valueString"))
    low = high = None
    rr = r.get("referenceRange")
    if isinstance(rr, list) and rr and isinstance(rr[0], dict):
        lo, hi = rr[0].get("low"), rr[0].get("high")
        low = _num(lo.get("value")) if isinstance(lo, dict) else None
        high = _num(hi.get("value")) if isinstance(hi, dict) else None
    return (
        _str(r.get("id")),
        reference_id(r.get("subject")),
        reference_id(r.get("encounter")),
        _str(r.get("status")),
        system,
        code,
        effective,
        value,
        unit,
        value_code,
        low,
        high,
        bad,
    )


def _medication_request(r: Mapping[str, Any], allowed: frozenset[str]) -> Row:
    system, code = _coding(r.get("medicationCodeableConcept"), allowed)
    vstart = vend = None
    days = qty = None
    refills = None
    dr = r.get("dispenseRequest")
    if isinstance(dr, dict):
        vstart, vend = _period(dr.get("validityPeriod"))
        esd = dr.get("expectedSupplyDuration")
        days = _num(esd.get("value")) if isinstance(esd, dict) else None
        q = dr.get("quantity")
        qty = _num(q.get("value")) if isinstance(q, dict) else None
        n = dr.get("numberOfRepeatsAllowed")
        refills = n if isinstance(n, int) and not isinstance(n, bool) else None
    sig = route = None
    di = r.get("dosageInstruction")
    if isinstance(di, list) and di and isinstance(di[0], dict):
        sig = _str(di[0].get("text"))
        route = _cc_code(di[0].get("route"))
    return (
        _str(r.get("id")),
        reference_id(r.get("subject")),
        reference_id(r.get("encounter")),
        _str(r.get("status")),
        system,
        code,
        _str(r.get("authoredOn")),
        vstart,
        vend,
        days,
        qty,
        refills,
        sig,
        route,
    )


def _procedure(r: Mapping[str, Any], allowed: frozenset[str]) -> Row:
    system, code = _coding(r.get("code"), allowed)
    start, end = _period(r.get("performedPeriod"))
    return (
        _str(r.get("id")),
        reference_id(r.get("subject")),
        reference_id(r.get("encounter")),
        _str(r.get("status")),
        system,
        code,
        _str(r.get("performedDateTime")) or start,
        end,
    )


MAPPERS: dict[str, Mapper] = {
    "Patient": _patient,
    "Encounter": _encounter,
    "Condition": _condition,
    "Observation": _observation,
    "MedicationRequest": _medication_request,
    "Procedure": _procedure,
}
