"""A hospital connector serves its consent registry: steward import, cohort counts, patient withdrawal."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest

from healthspace.authority.seed import DEMO_SCENARIOS
from healthspace.core.apikeys import Role
from healthspace.synth.generate import generate
from tests.support.space import PARTICIPANTS, Space, running_space

GZ, HKU = "gz-hospital", "hk-university"
SCENARIO = "diabetes-outcomes-research"


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gz-synth")
    generate("gz", 400, 7, out, progress=False)
    return out


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Space]:
    with running_space(tmp_path_factory.mktemp("space"), PARTICIPANTS, patient_prefixes={GZ: "gz-pat-"}) as s:
        with s.admin() as admin:
            for scenario in DEMO_SCENARIOS:
                admin.register_scenario(scenario.model_dump(mode="json"))
        yield s


def _staff(space: Space, role: Role) -> httpx.Client:
    node = space.connectors[GZ]
    return httpx.Client(base_url=node.url, headers={"X-API-Key": node.keys[role]}, timeout=30)


def _cohort(space: Space) -> int:
    with _staff(space, Role.STEWARD) as c:
        r = c.get("/management/consent/cohort", params={"scenario_id": SCENARIO, "data_class": "laboratory"})
    assert r.status_code == 200, r.text
    return int(r.json()["patients"])


def test_imported_consents_give_the_cohort_the_generator_made(space: Space, population: Path) -> None:
    with _staff(space, Role.STEWARD) as c:
        r = c.post(
            "/management/consent/import", content=(population / "fhir" / "Consent.ndjson").read_bytes()
        )
    assert r.status_code == 200, r.text
    truth = pd.read_parquet(population / "omop" / "consent.parquet")
    consenting = truth[
        (truth.scenario_id == SCENARIO) & (truth.decision == "permit") & truth.withdrawn_at.isna()
    ]
    assert _cohort(space) == consenting.person_id.nunique() > 0


def test_a_patient_withdrawal_leaves_the_next_cohort_at_once(space: Space, population: Path) -> None:
    truth = pd.read_parquet(population / "omop" / "consent.parquet")
    person = int(
        truth[
            (truth.scenario_id == SCENARIO) & (truth.decision == "permit") & truth.withdrawn_at.isna()
        ].person_id.iloc[0]
    )
    before = _cohort(space)
    with _staff(space, Role.STEWARD) as c:
        token = c.post(f"/management/consent/patients/gz-pat-{person}/tokens", json={"ttl_days": 1}).json()[
            "token"
        ]
    node = space.connectors[GZ]
    with httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {token}"}) as patient:
        mine = {s["scenario_id"]: s for s in patient.get("/consent/patient/scenarios").json()}
        assert set(mine) == {s.id for s in DEMO_SCENARIOS}  # the authority's registry, as the patient sees it
        r = patient.post("/consent/patient/withdrawals", json={"scenario_id": SCENARIO})
        assert r.status_code == 201, r.text
    assert _cohort(space) == before - 1


def test_consent_administration_is_for_stewards(space: Space) -> None:
    with _staff(space, Role.RESEARCHER) as c:
        assert c.post("/management/consent/import", content=b"").status_code == 403


def test_a_connector_without_patients_has_no_consent_api(space: Space) -> None:
    assert httpx.get(f"{space.connectors[HKU].url}/consent/patient/scenarios").status_code == 404
