"""End to end between two healthspace connectors on loopback: catalog, negotiation, agreement, transfer."""

from __future__ import annotations

import uuid
from typing import Any

from healthspace.core.apikeys import Role
from tests.dsp.conftest import GZ, HKU, OFFER, Staff
from tests.support.space import Space


def _publish(staff: Staff, approval: str = "auto", offer: dict[str, Any] | None = None) -> str:
    dataset_id = f"urn:dataset:t2d:{uuid.uuid4().hex[:8]}"
    r = staff(GZ, Role.STEWARD).post(
        "/management/datasets",
        json={
            "id": dataset_id,
            "title": "Type 2 diabetes cohort",
            "description": "Adults with T2D, Guangzhou",
            "keywords": ["diabetes", "cohort"],
            "offer": offer or OFFER,
            "approval": approval,
        },
    )
    assert r.status_code == 201, r.text
    return dataset_id


def _negotiate(space: Space, staff: Staff, dataset_id: str, **extra: Any) -> dict[str, Any]:
    r = staff(HKU, Role.RESEARCHER).post(
        "/management/negotiations",
        json={"provider_url": space.connectors[GZ].url, "offer": {**OFFER, "target": dataset_id}, **extra},
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def _wait(staff: Staff, who: str, kind: str, pid: str, *states: str) -> dict[str, Any]:
    r = staff(who, Role.ADMIN).get(
        f"/management/{kind}/{pid}", params={"wait_for": list(states), "timeout_s": 10}
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_catalog_negotiation_and_transfer_complete_between_two_connectors(space: Space, staff: Staff) -> None:
    dataset_id = _publish(staff)
    catalog = staff(HKU, Role.RESEARCHER).post(
        "/management/catalog/query", json={"url": space.connectors[GZ].url, "filter": [{"id": dataset_id}]}
    )
    assert [d["@id"] for d in catalog.json()["dataset"]] == [dataset_id]

    started = _negotiate(space, staff, dataset_id)
    consumer_side = _wait(staff, HKU, "negotiations", started["id"], "FINALIZED")
    assert consumer_side["state"] == "FINALIZED"
    provider_side = _wait(staff, GZ, "negotiations", consumer_side["provider_pid"], "FINALIZED")
    assert provider_side["state"] == "FINALIZED"
    assert consumer_side["agreement_id"] == provider_side["agreement_id"] is not None

    t = staff(HKU, Role.RESEARCHER).post(
        "/management/transfers", json={"agreement_id": consumer_side["agreement_id"]}
    )
    assert t.status_code == 201, t.text
    transfer = _wait(staff, HKU, "transfers", t.json()["id"], "STARTED")
    assert transfer["state"] == "STARTED"
    address = transfer["data_address"]
    props = {p["name"]: p["value"] for p in address["endpointProperties"]}
    assert address["endpoint"] == f"{space.connectors[GZ].url}/dataplane"
    assert props["agreementId"] == consumer_side["agreement_id"]

    done = staff(HKU, Role.RESEARCHER).post(f"/management/transfers/{transfer['id']}/complete", json={})
    assert done.status_code == 200, done.text
    provider_transfer = _wait(staff, GZ, "transfers", transfer["provider_pid"], "COMPLETED")
    assert provider_transfer["state"] == "COMPLETED"
