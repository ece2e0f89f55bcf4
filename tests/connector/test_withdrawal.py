"""A consent withdrawal takes effect at once: agreements it leaves unable to hold are retired, their
transfers terminated on both sides, and the provider's audit log says why."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from healthspace.authority.seed import DEMO_SCENARIOS
from healthspace.consent.fhir import SCENARIO_CODE_SYSTEM
from healthspace.core.apikeys import Role
from healthspace.policy import template
from tests.connector.helpers import audit_entries
from tests.support.space import Space, running_space

GZ, GDU = "gz-hospital", "gd-university"
PARTICIPANTS = {
    GZ: ("Guangzhou Test Hospital", "hospital", "CN-GD", ["data-provider"]),
    GDU: ("Guangdong Test University", "university", "CN-GD", ["data-consumer"]),
}
DIABETES, DRUGS, QUALITY = (
    "diabetes-outcomes-research",
    "drug-safety-surveillance",
    "hospital-quality-improvement",
)


def _consent(patient: str, scenario: str) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "Consent",
            "id": f"c-{uuid.uuid4().hex[:12]}",
            "status": "active",
            "patient": {"reference": f"Patient/{patient}"},
            "dateTime": "2025-01-01T00:00:00Z",
            "provision": {
                "type": "permit",
                "period": {"start": "2025-01-01T00:00:00Z"},
                "purpose": [{"system": SCENARIO_CODE_SYSTEM, "code": scenario}],
            },
        }
    )


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Space]:
    with running_space(
        tmp_path_factory.mktemp("withdrawal"), PARTICIPANTS, patient_prefixes={GZ: "gz-pat-"}
    ) as s:
        with s.admin() as admin:
            for scenario in DEMO_SCENARIOS:
                admin.register_scenario(scenario.model_dump(mode="json"))
        consents = [_consent(f"gz-pat-{n}", sc) for sc in (DIABETES, DRUGS, QUALITY) for n in (1, 2, 3)]
        with _client(s, GZ, Role.STEWARD) as c:
            r = c.post("/management/consent/import", content=b"\n".join(consents))
            assert r.json()["imported"] == 9, r.text
        yield s


def _client(space: Space, who: str, role: Role) -> httpx.Client:
    node = space.connectors[who]
    return httpx.Client(base_url=node.url, headers={"X-API-Key": node.keys[role]}, timeout=20)


def _agreement_with_transfer(space: Space, offer: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Publish `offer` at the hospital, let the university agree to it and start a transfer."""
    dataset_id = f"urn:dataset:gz:{uuid.uuid4().hex[:8]}"
    with _client(space, GZ, Role.STEWARD) as c:
        r = c.post("/management/datasets", json={"id": dataset_id, "title": "cohort", "offer": offer})
        assert r.status_code == 201, r.text
    with _client(space, GDU, Role.RESEARCHER) as c:
        r = c.post(
            "/management/negotiations",
            json={"provider_url": space.connectors[GZ].url, "offer": {**offer, "target": dataset_id}},
        )
        n = c.get(
            f"/management/negotiations/{r.json()['id']}", params={"wait_for": "FINALIZED", "timeout_s": 15}
        )
        assert n.json()["state"] == "FINALIZED", n.text
        agreement_id = n.json()["agreement_id"]
        t = c.post("/management/transfers", json={"agreement_id": agreement_id})
        started = c.get(
            f"/management/transfers/{t.json()['id']}", params={"wait_for": "STARTED", "timeout_s": 15}
        )
        assert started.json()["state"] == "STARTED", started.text
    return agreement_id, started.json()


def _withdraw(space: Space, patient: str, scenario: str) -> None:
    with _client(space, GZ, Role.STEWARD) as c:
        token = c.post(f"/management/consent/patients/{patient}/tokens", json={}).json()["token"]
    with httpx.Client(base_url=space.connectors[GZ].url, headers={"Authorization": f"Bearer {token}"}) as p:
        r = p.post("/consent/patient/withdrawals", json={"scenario_id": scenario})
        assert r.status_code == 201, r.text


def _retired(space: Space, agreement_id: str) -> str | None:
    with _client(space, GZ, Role.STEWARD) as c:
        reason: str | None = c.get(f"/management/agreements/{agreement_id}").json()["retired_reason"]
    return reason


def test_a_withdrawal_retires_an_agreement_that_requires_consent_and_ends_its_transfer(space: Space) -> None:
    agreement_id, transfer = _agreement_with_transfer(
        space, template("deidentified-extract", scenario=DIABETES)
    )
    _withdraw(space, "gz-pat-1", DIABETES)
    # The retirement happened inside the withdrawal request: no waiting on the provider side.
    assert "consent withdrawn" in (_retired(space, agreement_id) or "")
    with _client(space, GZ, Role.ADMIN) as c:
        provider_side = c.get(f"/management/transfers/{transfer['provider_pid']}").json()
    assert provider_side["state"] == "TERMINATED"
    with _client(space, GDU, Role.ADMIN) as c:
        consumer_side = c.get(
            f"/management/transfers/{transfer['id']}", params={"wait_for": "TERMINATED", "timeout_s": 15}
        ).json()
    assert consumer_side["state"] == "TERMINATED"
    retired = [e for e in audit_entries(space, GZ) if e["action"] == "dsp.agreement.retired"]
    assert any(e["subject"] == agreement_id and "consent withdrawn" in e["reason"] for e in retired)


def test_an_aggregate_agreement_is_retired_only_once_the_cohort_falls_below_its_cell_size(
    space: Space,
) -> None:
    agreement_id, _ = _agreement_with_transfer(space, template("aggregate-research", scenario=DRUGS, k=2))
    _withdraw(space, "gz-pat-1", DRUGS)
    assert _retired(space, agreement_id) is None  # 2 patients still consent: cells of 2 can be released
    _withdraw(space, "gz-pat-2", DRUGS)
    assert "below the agreement's minimum cell size 2" in (_retired(space, agreement_id) or "")


def test_a_withdrawal_from_another_scenario_leaves_the_agreement_alone(space: Space) -> None:
    agreement_id, _ = _agreement_with_transfer(space, template("deidentified-extract", scenario=DIABETES))
    _withdraw(space, "gz-pat-3", QUALITY)
    assert _retired(space, agreement_id) is None
