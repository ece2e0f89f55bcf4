"""The FHIR NDJSON is valid R4-shaped JSON, one resource type per file, with resolvable references."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from healthspace.synth.sites import SCENARIO_IDS
from tests.synth._data import Population

TYPES = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Procedure", "Consent")
SYSTEMS = {
    "Condition": "http://hl7.org/fhir/sid/icd-10",
    "Observation": "http://loinc.org",
    "Procedure": "http://snomed.info/sct",
}
ATC = "http://www.whocc.no/atc"
OMOP_OF = {
    "Patient": "person",
    "Encounter": "visit_occurrence",
    "Condition": "condition_occurrence",
    "Observation": "measurement",
    "MedicationRequest": "drug_exposure",
    "Procedure": "procedure_occurrence",
    "Consent": "consent",
}


def _read(pop: Population, rtype: str) -> list[dict[str, Any]]:
    text = (pop.out / "fhir" / f"{rtype}.ndjson").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def resources(small: Population) -> dict[str, list[dict[str, Any]]]:
    return {t: _read(small, t) for t in TYPES}


def test_fhir_directory_holds_one_file_per_resource_type(small: Population) -> None:
    assert sorted(p.name for p in (small.out / "fhir").iterdir()) == sorted(f"{t}.ndjson" for t in TYPES)


@pytest.mark.parametrize("rtype", TYPES)
def test_every_line_is_a_resource_of_the_file_type(
    resources: dict[str, list[dict[str, Any]]], rtype: str
) -> None:
    assert resources[rtype]
    assert all(r["resourceType"] == rtype for r in resources[rtype])


@pytest.mark.parametrize("rtype", TYPES)
def test_ids_are_unique_and_carry_the_site_prefix(
    resources: dict[str, list[dict[str, Any]]], rtype: str
) -> None:
    ids = [r["id"] for r in resources[rtype]]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("gz-") for i in ids)


@pytest.mark.parametrize("rtype", TYPES)
def test_fhir_count_equals_omop_row_count(small: Population, resources: dict[str, Any], rtype: str) -> None:
    assert len(resources[rtype]) == small.omop(OMOP_OF[rtype]).num_rows


def test_subject_references_resolve_to_generated_patients(resources: dict[str, list[dict[str, Any]]]) -> None:
    patients = {f"Patient/{p['id']}" for p in resources["Patient"]}
    for rtype in ("Encounter", "Condition", "Observation", "MedicationRequest", "Procedure"):
        assert {r["subject"]["reference"] for r in resources[rtype]} <= patients, rtype
    assert {r["patient"]["reference"] for r in resources["Consent"]} <= patients


def test_encounter_references_resolve_to_encounters_of_the_same_patient(
    resources: dict[str, list[dict[str, Any]]],
) -> None:
    owner = {f"Encounter/{e['id']}": e["subject"]["reference"] for e in resources["Encounter"]}
    for rtype in ("Condition", "Observation", "MedicationRequest", "Procedure"):
        for r in resources[rtype]:
            if "encounter" in r:
                assert owner[r["encounter"]["reference"]] == r["subject"]["reference"], r["id"]


@pytest.mark.parametrize("rtype", sorted(SYSTEMS))
def test_codes_use_the_declared_code_system(resources: dict[str, list[dict[str, Any]]], rtype: str) -> None:
    assert {r["code"]["coding"][0]["system"] for r in resources[rtype]} == {SYSTEMS[rtype]}


def test_medications_are_atc_coded(resources: dict[str, list[dict[str, Any]]]) -> None:
    codings = [r["medicationCodeableConcept"]["coding"][0] for r in resources["MedicationRequest"]]
    assert {c["system"] for c in codings} == {ATC}
    assert all(len(c["code"]) == 7 for c in codings)  # ATC level 5: e.g. A10BA02


def test_observations_carry_ucum_quantities(resources: dict[str, list[dict[str, Any]]]) -> None:
    for r in resources["Observation"]:
        q = r["valueQuantity"]
        assert isinstance(q["value"], int | float)
        assert q["system"] == "http://unitsofmeasure.org"


def test_patients_have_gender_birth_date_and_some_deaths(resources: dict[str, list[dict[str, Any]]]) -> None:
    patients = resources["Patient"]
    assert {p["gender"] for p in patients} == {"female", "male"}
    assert all(len(p["birthDate"]) == 10 for p in patients)
    assert 0 < sum("deceasedDateTime" in p for p in patients) < len(patients)


def test_consent_resources_have_the_r4_shape(resources: dict[str, list[dict[str, Any]]]) -> None:
    for c in resources["Consent"]:
        assert c["status"] in {"active", "inactive"}
        assert c["scope"]["coding"][0]["code"] in {"research", "patient-privacy"}
        assert c["category"]
        assert c["policyRule"]["coding"][0]["code"] in {"OPTIN", "OPTOUT"}
        assert c["dateTime"].endswith("Z")
        provision = c["provision"]
        assert provision["type"] in {"permit", "deny"}
        assert provision["period"]["start"] == c["dateTime"]
        assert next(p["code"] for p in provision["purpose"]) in SCENARIO_IDS


def test_withdrawn_consents_are_inactive_permits_with_an_end(
    resources: dict[str, list[dict[str, Any]]],
) -> None:
    inactive = [c for c in resources["Consent"] if c["status"] == "inactive"]
    assert inactive
    assert all(c["provision"]["type"] == "permit" for c in inactive)
    assert all(c["provision"]["period"]["end"] > c["provision"]["period"]["start"] for c in inactive)
    active = [c for c in resources["Consent"] if c["status"] == "active"]
    assert all("end" not in c["provision"]["period"] for c in active)


def test_consent_resources_match_the_omop_consent_table(
    small: Population, resources: dict[str, list[dict[str, Any]]]
) -> None:
    table = small.omop("consent").to_pandas()
    omop = Counter(
        (s, d, w)
        for s, d, w in zip(
            table["scenario_id"], table["decision"], table["withdrawn_at"].notna(), strict=True
        )
    )
    fhir = Counter(
        (c["provision"]["purpose"][0]["code"], c["provision"]["type"], c["status"] == "inactive")
        for c in resources["Consent"]
    )
    assert fhir == omop
