"""Negotiation beyond a verbatim offer: counter-offers both ways, restrictive acceptance, early retirement."""

from __future__ import annotations

import uuid
from typing import Any

from healthspace.core.apikeys import Role
from healthspace.policy import template
from tests.dsp.conftest import GZ, HKU, Staff
from tests.support.space import Space

SCENARIO = "diabetes-outcomes-research"


def _policy(epsilon: float) -> dict[str, Any]:
    return template("aggregate-research", scenario=SCENARIO, epsilon=epsilon)


def _budget(policy: dict[str, Any]) -> str:
    (c,) = [c for c in policy["permission"][0]["constraint"] if c["leftOperand"] == "privacyBudget"]
    return str(c["rightOperand"])


def _publish(staff: Staff, approval: str, epsilon: float = 3.0) -> str:
    dataset_id = f"urn:dataset:counter:{uuid.uuid4().hex[:8]}"
    r = staff(GZ, Role.STEWARD).post(
        "/management/datasets",
        json={"id": dataset_id, "title": "T2D cohort", "offer": _policy(epsilon), "approval": approval},
    )
    assert r.status_code == 201, r.text
    return dataset_id


def _request(space: Space, staff: Staff, dataset_id: str, epsilon: float = 3.0, auto: bool = True) -> str:
    r = staff(HKU, Role.RESEARCHER).post(
        "/management/negotiations",
        json={
            "provider_url": space.connectors[GZ].url,
            "offer": {**_policy(epsilon), "target": dataset_id},
            "auto": auto,
        },
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _wait(staff: Staff, who: str, kind: str, pid: str, *states: str, ack: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {"wait_for": list(states), "timeout_s": 10, "acknowledged": ack}
    r = staff(who, Role.ADMIN).get(f"/management/{kind}/{pid}", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _awaiting_steward(space: Space, staff: Staff, epsilon: float = 3.0) -> tuple[str, str, str]:
    """A request to a manual dataset, acknowledged: (dataset, consumer pid, provider pid)."""
    dataset_id = _publish(staff, "manual")
    consumer_pid = _request(space, staff, dataset_id, epsilon)
    consumer = _wait(staff, HKU, "negotiations", consumer_pid, ack=True)
    assert consumer["provider_pid"] is not None
    return dataset_id, consumer_pid, consumer["provider_pid"]


def _counter_offer(staff: Staff, provider_pid: str, offer: dict[str, Any]) -> dict[str, Any]:
    r = staff(GZ, Role.STEWARD).post(f"/management/negotiations/{provider_pid}/offer", json={"offer": offer})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _agreement(staff: Staff, who: str, agreement_id: str) -> dict[str, Any]:
    r = staff(who, Role.ADMIN).get(f"/management/agreements/{agreement_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


# --- provider counter-offers ---------------------------------------------------------------------------


def test_a_narrower_counter_offer_is_accepted_by_an_auto_consumer(space: Space, staff: Staff) -> None:
    _, consumer_pid, provider_pid = _awaiting_steward(space, staff)
    assert _counter_offer(staff, provider_pid, _policy(1.0))["state"] == "OFFERED"

    consumer = _wait(staff, HKU, "negotiations", consumer_pid, "FINALIZED")
    assert consumer["state"] == "FINALIZED"
    assert _budget(_agreement(staff, HKU, consumer["agreement_id"])["policy"]) == "1"


def test_a_broader_counter_offer_waits_for_the_researcher(space: Space, staff: Staff) -> None:
    _, consumer_pid, provider_pid = _awaiting_steward(space, staff)
    _counter_offer(staff, provider_pid, _policy(5.0))

    consumer = _wait(staff, HKU, "negotiations", consumer_pid, "OFFERED")
    # No step is owed (`pending`), so the manager will not accept it by itself.
    assert (consumer["state"], consumer["pending"]) == ("OFFERED", None)


def test_the_researcher_may_accept_a_broader_counter_offer(space: Space, staff: Staff) -> None:
    _, consumer_pid, provider_pid = _awaiting_steward(space, staff)
    _counter_offer(staff, provider_pid, _policy(5.0))
    _wait(staff, HKU, "negotiations", consumer_pid, "OFFERED")

    r = staff(HKU, Role.RESEARCHER).post(f"/management/negotiations/{consumer_pid}/accept", json={})
    assert r.status_code == 200, r.text
    consumer = _wait(staff, HKU, "negotiations", consumer_pid, "FINALIZED")
    assert consumer["state"] == "FINALIZED"
    assert _budget(_agreement(staff, GZ, consumer["agreement_id"])["policy"]) == "5"


def test_a_counter_offer_for_another_dataset_is_refused_by_the_consumer(space: Space, staff: Staff) -> None:
    _, consumer_pid, provider_pid = _awaiting_steward(space, staff)
    other = _publish(staff, "manual")
    _counter_offer(staff, provider_pid, {**_policy(1.0), "target": other})

    provider = _wait(staff, GZ, "negotiations", provider_pid, "TERMINATED")
    assert provider["state"] == "TERMINATED"
    assert "HTTP 400" in provider["terminal_reason"]
    assert _wait(staff, HKU, "negotiations", consumer_pid)["state"] == "REQUESTED"


# --- consumer counter-requests -------------------------------------------------------------------------


def test_a_counter_request_reaches_the_steward_and_its_policy_is_agreed(space: Space, staff: Staff) -> None:
    _, consumer_pid, provider_pid = _awaiting_steward(space, staff)
    _counter_offer(staff, provider_pid, _policy(5.0))
    _wait(staff, HKU, "negotiations", consumer_pid, "OFFERED")

    r = staff(HKU, Role.RESEARCHER).post(
        f"/management/negotiations/{consumer_pid}/request", json={"offer": _policy(2.0)}
    )
    assert r.status_code == 200, r.text
    provider = _wait(staff, GZ, "negotiations", provider_pid, "REQUESTED")
    assert provider["state"] == "REQUESTED"
    assert _budget(provider["offer"]) == "2"

    r = staff(GZ, Role.STEWARD).post(f"/management/negotiations/{provider_pid}/approve", json={})
    assert r.status_code == 200, r.text
    consumer = _wait(staff, HKU, "negotiations", consumer_pid, "FINALIZED")
    assert consumer["state"] == "FINALIZED"
    assert _budget(_agreement(staff, HKU, consumer["agreement_id"])["policy"]) == "2"


def test_an_auto_provider_agrees_to_a_counter_request_narrower_than_its_catalog(
    space: Space, staff: Staff
) -> None:
    dataset_id = _publish(staff, "auto", epsilon=3.0)
    consumer_pid = _request(space, staff, dataset_id, epsilon=2.0)

    consumer = _wait(staff, HKU, "negotiations", consumer_pid, "FINALIZED")
    assert consumer["state"] == "FINALIZED"
    assert _budget(_agreement(staff, GZ, consumer["agreement_id"])["policy"]) == "2"


def test_an_auto_provider_rejects_a_request_broader_than_its_catalog(space: Space, staff: Staff) -> None:
    dataset_id = _publish(staff, "auto", epsilon=3.0)
    consumer_pid = _request(space, staff, dataset_id, epsilon=4.0)

    consumer = _wait(staff, HKU, "negotiations", consumer_pid, "FINALIZED")
    assert consumer["state"] == "TERMINATED"
    assert "privacy budget" in consumer["terminal_reason"]


# --- early retirement -----------------------------------------------------------------------------------


def _started_transfer(space: Space, staff: Staff) -> tuple[str, dict[str, Any]]:
    dataset_id = _publish(staff, "auto")
    consumer = _wait(staff, HKU, "negotiations", _request(space, staff, dataset_id), "FINALIZED")
    assert consumer["state"] == "FINALIZED"
    r = staff(HKU, Role.RESEARCHER).post(
        "/management/transfers", json={"agreement_id": consumer["agreement_id"]}
    )
    assert r.status_code == 201, r.text
    transfer = _wait(staff, HKU, "transfers", r.json()["id"], "STARTED")
    assert transfer["state"] == "STARTED"
    return str(consumer["agreement_id"]), transfer


def test_a_provider_retirement_retires_the_consumers_copy(space: Space, staff: Staff) -> None:
    agreement_id, transfer = _started_transfer(space, staff)
    r = staff(GZ, Role.STEWARD).post(
        f"/management/agreements/{agreement_id}/retire", json={"reason": "consent withdrawn"}
    )
    assert r.status_code == 200, r.text

    assert _wait(staff, HKU, "transfers", transfer["id"], "TERMINATED")["state"] == "TERMINATED"
    consumer_copy = _agreement(staff, HKU, agreement_id)
    assert consumer_copy["retired_at"] is not None
    assert "consent withdrawn" in consumer_copy["retired_reason"]


def test_a_retired_agreement_starts_no_transfer_on_the_consumer(space: Space, staff: Staff) -> None:
    agreement_id, transfer = _started_transfer(space, staff)
    staff(GZ, Role.STEWARD).post(f"/management/agreements/{agreement_id}/retire", json={"reason": "ended"})
    _wait(staff, HKU, "transfers", transfer["id"], "TERMINATED")

    r = staff(HKU, Role.RESEARCHER).post("/management/transfers", json={"agreement_id": agreement_id})
    assert r.status_code == 409, r.text


def test_a_consumer_retirement_terminates_its_transfers_and_the_providers_copy(
    space: Space, staff: Staff
) -> None:
    agreement_id, transfer = _started_transfer(space, staff)
    r = staff(HKU, Role.RESEARCHER).post(
        f"/management/agreements/{agreement_id}/retire", json={"reason": "study closed"}
    )
    assert r.status_code == 200, r.text
    assert _wait(staff, HKU, "transfers", transfer["id"])["state"] == "TERMINATED"

    provider_transfer = _wait(staff, GZ, "transfers", transfer["provider_pid"], "TERMINATED")
    assert provider_transfer["state"] == "TERMINATED"
    assert _agreement(staff, GZ, agreement_id)["retired_at"] is not None


def test_a_steward_cannot_retire_the_consumers_copy(space: Space, staff: Staff) -> None:
    agreement_id, _ = _started_transfer(space, staff)
    r = staff(HKU, Role.STEWARD).post(f"/management/agreements/{agreement_id}/retire", json={"reason": "x"})
    assert r.status_code == 403, r.text
