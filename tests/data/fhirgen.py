"""A small, deterministic FHIR R4 population for the data tests, with its row counts known by construction."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

ICD10 = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
ATC = "http://www.whocc.no/atc"
SNOMED = "http://snomed.info/sct"
MRN = "urn:healthspace:mrn"

ENCOUNTERS_PER_PATIENT = 2
OBSERVATIONS_PER_PATIENT = 3
DECEASED_EVERY = 5  # patients 0, 5, 10, ... are deceased


def patient(i: int, **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "Patient",
        "id": f"pat-{i}",
        "identifier": [{"system": MRN, "value": f"HK-MRN-{i:06d}"}],
        "gender": "female" if i % 2 else "male",
        "birthDate": f"{1940 + i % 50}-0{1 + i % 9}-1{i % 10}",
    }
    if i % DECEASED_EVERY == 0:
        r["deceasedDateTime"] = "2023-06-30T12:00:00+08:00"
    r.update(extra)
    return r


def encounter(i: int, k: int, **extra: Any) -> dict[str, Any]:
    r = {
        "resourceType": "Encounter",
        "id": f"enc-{i}-{k}",
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "AMB" if k else "IMP",
        },
        "subject": {"reference": f"Patient/pat-{i}"},
        "period": {"start": f"2021-0{1 + k}-0{1 + i % 9}T09:00:00+08:00", "end": f"2021-0{1 + k}-1{i % 9}"},
    }
    r.update(extra)
    return r


def condition(i: int, **extra: Any) -> dict[str, Any]:
    r = {
        "resourceType": "Condition",
        "id": f"cond-{i}",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"coding": [{"system": ICD10, "code": "E11.9", "display": "Type 2 diabetes mellitus"}]},
        "subject": {"reference": f"Patient/pat-{i}"},
        "encounter": {"reference": f"Encounter/enc-{i}-0"},
        "onsetDateTime": f"2021-01-0{1 + i % 9}",
    }
    r.update(extra)
    return r


def observation(i: int, k: int, **extra: Any) -> dict[str, Any]:
    code, unit, value = [("4548-4", "%", 6.0 + (i % 30) / 10), ("8480-6", "mm[Hg]", 110 + i % 50),
                         ("29463-7", "kg", 50 + i % 40)][k]  # fmt: skip
    r = {
        "resourceType": "Observation",
        "id": f"obs-{i}-{k}",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/pat-{i}"},
        "encounter": {"reference": f"Encounter/enc-{i}-1"},
        "effectiveDateTime": f"2021-02-0{1 + i % 9}T10:30:00+08:00",
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }
    r.update(extra)
    return r


def medication_request(i: int, **extra: Any) -> dict[str, Any]:
    r = {
        "resourceType": "MedicationRequest",
        "id": f"med-{i}",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": ATC, "code": "A10BA02", "display": "metformin"}]},
        "subject": {"reference": f"Patient/pat-{i}"},
        "encounter": {"reference": f"Encounter/enc-{i}-1"},
        "authoredOn": f"2021-02-0{1 + i % 9}",
        "dosageInstruction": [{"text": "500 mg twice daily", "route": {"coding": [{"code": "26643006"}]}}],
        "dispenseRequest": {
            "expectedSupplyDuration": {"value": 90, "unit": "days"},
            "quantity": {"value": 180},
        },
    }
    r.update(extra)
    return r


def procedure(i: int, **extra: Any) -> dict[str, Any]:
    r = {
        "resourceType": "Procedure",
        "id": f"proc-{i}",
        "status": "completed",
        "code": {
            "coding": [{"system": SNOMED, "code": "29303009", "display": "Electrocardiographic procedure"}]
        },
        "subject": {"reference": f"Patient/pat-{i}"},
        "encounter": {"reference": f"Encounter/enc-{i}-0"},
        "performedDateTime": f"2021-01-0{1 + i % 9}T11:00:00+08:00",
    }
    r.update(extra)
    return r


def consent(i: int) -> dict[str, Any]:
    return {"resourceType": "Consent", "id": f"consent-{i}", "status": "active",
            "patient": {"reference": f"Patient/pat-{i}"}}  # fmt: skip


def population(n: int) -> Iterator[dict[str, Any]]:
    """Every resource of `n` patients, patients first (the order of a Bulk Data export by type)."""
    for i in range(n):
        yield patient(i)
    for i in range(n):
        for k in range(ENCOUNTERS_PER_PATIENT):
            yield encounter(i, k)
    for i in range(n):
        yield condition(i)
        for k in range(OBSERVATIONS_PER_PATIENT):
            yield observation(i, k)
        yield medication_request(i)
        yield procedure(i)
        yield consent(i)


def expected_rows(n: int) -> dict[str, int]:
    """Rows each table must hold after `population(n)` is ingested (known from the construction)."""
    return {
        "person": n,
        "observation_period": n,
        "visit_occurrence": n * ENCOUNTERS_PER_PATIENT,
        "condition_occurrence": n,
        "drug_exposure": n,
        "measurement": n * OBSERVATIONS_PER_PATIENT,
        "procedure_occurrence": n,
        "death": len(range(0, n, DECEASED_EVERY)),
    }


def write_ndjson(path: Path, resources: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    return path
