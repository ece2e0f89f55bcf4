"""End to end between two healthspace connectors on loopback: catalog, negotiation, agreement, transfer."""

from __future__ import annotations

import uuid
from typing import Any

from healthspace.core.apikeys import Role
from healthspace.policy import template
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


def test_a_provider_offers_first_and_the_consumer_accepts_to_an_agreement(space: Space, staff: Staff) -> None:
    dataset_id = _publish(staff)
    r = staff(GZ, Role.STEWARD).post(
        "/management/negotiations/offers",
        json={"consumer_url": space.connectors[HKU].url, "dataset_id": dataset_id},
    )
    assert r.status_code == 201, r.text
    offered = r.json()
    assert (offered["role"], offered["state"], offered["consumer_pid"]) == ("provider", "OFFERED", None)
    # The consumer's ACK names its process; an unsolicited offer then waits for a researcher.
    r = staff(GZ, Role.ADMIN).get(
        f"/management/negotiations/{offered['id']}", params={"acknowledged": True, "timeout_s": 10}
    )
    consumer_pid = r.json()["consumer_pid"]
    assert consumer_pid is not None
    theirs = staff(HKU, Role.RESEARCHER).get(f"/management/negotiations/{consumer_pid}").json()
    assert (theirs["state"], theirs["provider_pid"], theirs["dataset_id"]) == (
        "OFFERED",
        offered["id"],
        dataset_id,
    )
    accepted = staff(HKU, Role.RESEARCHER).post(f"/management/negotiations/{consumer_pid}/accept", json={})
    assert accepted.status_code == 200, accepted.text
    # Unsolicited, so manual to the end: the researcher also verifies the agreement.
    agreed = _wait(staff, HKU, "negotiations", consumer_pid, "AGREED")
    assert agreed["state"] == "AGREED"
    verified = staff(HKU, Role.RESEARCHER).post(f"/management/negotiations/{consumer_pid}/verify", json={})
    assert verified.status_code == 200, verified.text
    consumer_side = _wait(staff, HKU, "negotiations", consumer_pid, "FINALIZED")
    provider_side = _wait(staff, GZ, "negotiations", offered["id"], "FINALIZED")
    assert consumer_side["state"] == provider_side["state"] == "FINALIZED"
    assert consumer_side["agreement_id"] == provider_side["agreement_id"] is not None


def test_a_provider_offer_broader_than_the_dataset_s_or_for_an_unknown_dataset_is_refused(
    space: Space, staff: Staff
) -> None:
    scenario = "diabetes-outcomes-research"
    dataset_id = _publish(staff, offer=template("aggregate-research", scenario=scenario, epsilon=1.0))
    steward = staff(GZ, Role.STEWARD)
    url = space.connectors[HKU].url
    wider = template("aggregate-research", scenario=scenario, epsilon=5.0)
    broader = steward.post(
        "/management/negotiations/offers",
        json={"consumer_url": url, "dataset_id": dataset_id, "offer": wider},
    )
    assert broader.status_code == 422, broader.text
    assert "at least as restrictive" in broader.json()["detail"]
    unknown = steward.post(
        "/management/negotiations/offers", json={"consumer_url": url, "dataset_id": "urn:dataset:none"}
    )
    assert unknown.status_code == 404, unknown.text
    researcher = staff(GZ, Role.RESEARCHER).post(
        "/management/negotiations/offers", json={"consumer_url": url, "dataset_id": dataset_id}
    )
    assert researcher.status_code == 403, researcher.text
