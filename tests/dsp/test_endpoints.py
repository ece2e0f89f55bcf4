"""DSP endpoints between healthspace connectors: approval paths, termination, and every refusal."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from healthspace.client import ConnectorClient
from healthspace.connector.dsp.dataplane import verify_access_token
from healthspace.core.apikeys import Role
from healthspace.core.settings import Settings
from healthspace.identity.keys import SigningKey
from healthspace.protocol.messages import (
    CatalogRequestMessage,
    CatalogResponse,
    ContractNegotiation,
    ContractNegotiationError,
    ContractNegotiationEventMessage,
    ContractNegotiationTerminationMessage,
    ContractRequestMessage,
    Offer,
    TransferError,
    TransferRequestMessage,
    parse_as,
    to_json,
)
from tests.dsp.conftest import GZ, HKU, OFFER, Staff
from tests.dsp.tck_peer import TckPeer
from tests.support.space import Space


def _publish(staff: Staff, approval: str = "auto", offer: dict[str, Any] | None = None, **extra: Any) -> str:
    dataset_id = f"urn:dataset:{uuid.uuid4().hex[:8]}"
    r = staff(GZ, Role.STEWARD).post(
        "/management/datasets",
        json={"id": dataset_id, "title": "Cohort", "offer": offer or OFFER, "approval": approval, **extra},
    )
    assert r.status_code == 201, r.text
    return dataset_id


def _negotiate(space: Space, staff: Staff, dataset_id: str, offer: dict[str, Any] | None = None) -> str:
    r = staff(HKU, Role.RESEARCHER).post(
        "/management/negotiations",
        json={"provider_url": space.connectors[GZ].url, "offer": {**(offer or OFFER), "target": dataset_id}},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _wait(staff: Staff, who: str, kind: str, pid: str, *states: str, ack: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {"wait_for": list(states), "timeout_s": 10, "acknowledged": ack}
    r = staff(who, Role.ADMIN).get(f"/management/{kind}/{pid}", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _finalized(space: Space, staff: Staff, approval: str = "auto") -> tuple[str, dict[str, Any]]:
    dataset_id = _publish(staff, approval)
    consumer = _wait(staff, HKU, "negotiations", _negotiate(space, staff, dataset_id), "FINALIZED")
    assert consumer["state"] == "FINALIZED"
    return dataset_id, consumer


def _initial_request(
    tck: TckPeer, dataset_id: str, consumer_pid: str | None = None
) -> ContractRequestMessage:
    return ContractRequestMessage(
        consumer_pid=consumer_pid or f"urn:uuid:{uuid.uuid4()}",
        offer=Offer.model_validate({**OFFER, "target": dataset_id}),
        callback_address=tck.url,
    )


# --- approval and termination paths ----------------------------------------------------------------


def test_manual_approval_waits_in_requested_until_a_steward_approves(space: Space, staff: Staff) -> None:
    dataset_id = _publish(staff, "manual")
    pid = _negotiate(space, staff, dataset_id)
    provider_pid = _wait(staff, HKU, "negotiations", pid, ack=True)["provider_pid"]
    waiting = _wait(staff, GZ, "negotiations", provider_pid)
    assert (waiting["state"], waiting["pending"]) == ("REQUESTED", None)

    r = staff(GZ, Role.STEWARD).post(f"/management/negotiations/{provider_pid}/approve", json={})
    assert r.status_code == 200, r.text
    assert _wait(staff, HKU, "negotiations", pid, "FINALIZED")["state"] == "FINALIZED"


def test_a_steward_rejection_terminates_both_sides_with_the_reason(space: Space, staff: Staff) -> None:
    dataset_id = _publish(staff, "manual")
    pid = _negotiate(space, staff, dataset_id)
    provider_pid = _wait(staff, HKU, "negotiations", pid, ack=True)["provider_pid"]
    r = staff(GZ, Role.STEWARD).post(
        f"/management/negotiations/{provider_pid}/reject", json={"reason": "scenario not registered"}
    )
    assert r.status_code == 200, r.text
    consumer = _wait(staff, HKU, "negotiations", pid, "TERMINATED")
    assert consumer["state"] == "TERMINATED"
    assert "scenario not registered" in (consumer["terminal_reason"] or "")


def test_a_researcher_cannot_approve_on_the_provider_side(space: Space, staff: Staff) -> None:
    dataset_id = _publish(staff, "manual")
    pid = _negotiate(space, staff, dataset_id)
    provider_pid = _wait(staff, HKU, "negotiations", pid, ack=True)["provider_pid"]
    r = staff(GZ, Role.RESEARCHER).post(f"/management/negotiations/{provider_pid}/approve", json={})
    assert r.status_code == 403


def test_a_broader_request_than_the_offer_is_terminated_automatically(space: Space, staff: Staff) -> None:
    dataset_id = _publish(staff, "auto")
    broader = {"@id": OFFER["@id"], "permission": [{"action": "use"}]}  # drops the purpose constraint
    pid = _negotiate(space, staff, dataset_id, broader)
    consumer = _wait(staff, HKU, "negotiations", pid, "TERMINATED", "FINALIZED")
    assert consumer["state"] == "TERMINATED"


def test_the_consumer_can_terminate_a_requested_negotiation(space: Space, staff: Staff) -> None:
    dataset_id = _publish(staff, "manual")
    pid = _negotiate(space, staff, dataset_id)
    provider_pid = _wait(staff, HKU, "negotiations", pid, ack=True)["provider_pid"]
    r = staff(HKU, Role.RESEARCHER).post(f"/management/negotiations/{pid}/terminate", json={"reason": "done"})
    assert r.status_code == 200, r.text
    assert _wait(staff, GZ, "negotiations", provider_pid, "TERMINATED")["state"] == "TERMINATED"


def test_the_agreement_names_both_parties_and_the_offered_rules(space: Space, staff: Staff) -> None:
    dataset_id, consumer = _finalized(space, staff)
    agreement = staff(HKU, Role.RESEARCHER).get(f"/management/agreements/{consumer['agreement_id']}").json()
    policy = agreement["policy"]
    assert (policy["assigner"], policy["assignee"], policy["target"]) == (GZ, HKU, dataset_id)
    assert policy["permission"] == OFFER["permission"]


# --- transfers -------------------------------------------------------------------------------------


def test_the_data_address_token_is_bound_to_agreement_and_consumer(space: Space, staff: Staff) -> None:
    _, consumer = _finalized(space, staff)
    t = staff(HKU, Role.RESEARCHER).post(
        "/management/transfers", json={"agreement_id": consumer["agreement_id"]}
    )
    transfer = _wait(staff, HKU, "transfers", t.json()["id"], "STARTED")
    props = {p["name"]: p["value"] for p in transfer["data_address"]["endpointProperties"]}
    node = space.connectors[GZ]
    key = SigningKey.load(
        node.data_dir / "participant.key", Settings(data_dir=node.data_dir).key_encryption_key()
    )
    grant = verify_access_token(key, GZ, props["authorization"], datetime.now(UTC))
    assert (grant.consumer, grant.agreement_id, grant.transfer_id) == (
        HKU,
        consumer["agreement_id"],
        transfer["provider_pid"],
    )


def test_retiring_an_agreement_terminates_its_transfers(space: Space, staff: Staff) -> None:
    _, consumer = _finalized(space, staff)
    t = staff(HKU, Role.RESEARCHER).post(
        "/management/transfers", json={"agreement_id": consumer["agreement_id"]}
    )
    transfer = _wait(staff, HKU, "transfers", t.json()["id"], "STARTED")
    r = staff(GZ, Role.STEWARD).post(
        f"/management/agreements/{consumer['agreement_id']}/retire", json={"reason": "consent withdrawn"}
    )
    assert r.status_code == 200, r.text
    assert _wait(staff, HKU, "transfers", transfer["id"], "TERMINATED")["state"] == "TERMINATED"


def test_a_transfer_under_an_unknown_agreement_is_refused(space: Space, fresh_tck: TckPeer) -> None:
    msg = TransferRequestMessage(
        consumer_pid=f"urn:uuid:{uuid.uuid4()}",
        agreement_id="urn:agreement:none",
        format="HttpData-PULL",
        callback_address=fresh_tck.url,
    )
    r = fresh_tck.send(space.connectors[GZ], "POST", "/transfers/request", msg)
    assert r.status_code == 400
    parse_as(r.content, TransferError)


def test_a_transfer_under_someone_elses_agreement_is_refused(
    space: Space, staff: Staff, fresh_tck: TckPeer
) -> None:
    _, consumer = _finalized(space, staff)
    msg = TransferRequestMessage(
        consumer_pid=f"urn:uuid:{uuid.uuid4()}",
        agreement_id=consumer["agreement_id"],
        format="HttpData-PULL",
        callback_address=fresh_tck.url,
    )
    r = fresh_tck.send(space.connectors[GZ], "POST", "/transfers/request", msg)
    assert r.status_code == 400


# --- refusals --------------------------------------------------------------------------------------


def test_the_version_endpoint_needs_no_authentication(space: Space) -> None:
    r = httpx.get(f"{space.connectors[GZ].url}/.well-known/dspace-version")
    assert r.status_code == 200
    assert r.json()["protocolVersions"][0]["version"] == "2025-1"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/catalog/request"),
        ("GET", "/catalog/datasets/x"),
        ("GET", "/negotiations/x"),
        ("POST", "/negotiations/request"),
        ("POST", "/negotiations/x/termination"),
        ("POST", "/transfers/request"),
        ("POST", "/transfers/x/start"),
    ],
)
def test_dsp_calls_without_a_request_token_are_unauthenticated(space: Space, method: str, path: str) -> None:
    r = httpx.request(method, f"{space.connectors[GZ].url}{path}", content=b"{}")
    assert r.status_code == 401


def test_a_negotiation_is_invisible_to_anyone_but_its_counterparty(
    space: Space, staff: Staff, fresh_tck: TckPeer
) -> None:
    _, consumer = _finalized(space, staff)
    r = fresh_tck.send(space.connectors[GZ], "GET", f"/negotiations/{consumer['provider_pid']}")
    assert r.status_code == 404


def test_the_counterparty_sees_its_negotiation(space: Space, staff: Staff, fresh_tck: TckPeer) -> None:
    dataset_id = _publish(staff, "manual")
    sent = fresh_tck.send(
        space.connectors[GZ], "POST", "/negotiations/request", _initial_request(fresh_tck, dataset_id)
    )
    ack = parse_as(sent.content, ContractNegotiation)
    r = fresh_tck.send(space.connectors[GZ], "GET", f"/negotiations/{ack.provider_pid}")
    assert (r.status_code, parse_as(r.content, ContractNegotiation).state) == (200, "REQUESTED")


def test_an_unknown_negotiation_is_not_found(space: Space, fresh_tck: TckPeer) -> None:
    r = fresh_tck.send(space.connectors[GZ], "GET", "/negotiations/urn:uuid:nope")
    assert r.status_code == 404
    parse_as(r.content, ContractNegotiationError)


def test_an_invalid_message_is_a_400_with_a_dsp_error(space: Space, fresh_tck: TckPeer) -> None:
    headers = {"Authorization": f"Bearer {fresh_tck.token_for(GZ)}"}
    bad = {"@context": ["https://w3id.org/dspace/2025/1/context.jsonld"], "@type": "ContractRequestMessage"}
    r = httpx.post(f"{space.connectors[GZ].url}/negotiations/request", json=bad, headers=headers)
    assert r.status_code == 400
    parse_as(r.content, ContractNegotiationError)


def test_a_body_that_is_not_json_is_a_400(space: Space, fresh_tck: TckPeer) -> None:
    headers = {"Authorization": f"Bearer {fresh_tck.token_for(GZ)}"}
    r = httpx.post(f"{space.connectors[GZ].url}/negotiations/request", content=b"{not json", headers=headers)
    assert r.status_code == 400


def test_a_message_the_state_forbids_is_a_400(space: Space, staff: Staff, fresh_tck: TckPeer) -> None:
    dataset_id = _publish(staff, "manual")
    sent = fresh_tck.send(
        space.connectors[GZ], "POST", "/negotiations/request", _initial_request(fresh_tck, dataset_id)
    )
    ack = parse_as(sent.content, ContractNegotiation)
    finalized = ContractNegotiationEventMessage(
        provider_pid=ack.provider_pid, consumer_pid=ack.consumer_pid, event_type="ACCEPTED"
    )
    r = fresh_tck.send(space.connectors[GZ], "POST", f"/negotiations/{ack.provider_pid}/events", finalized)
    assert r.status_code == 400
    assert parse_as(r.content, ContractNegotiationError).code == "dsp-message-not-allowed"


def test_a_request_for_an_unknown_dataset_is_a_400(space: Space, fresh_tck: TckPeer) -> None:
    r = fresh_tck.send(
        space.connectors[GZ], "POST", "/negotiations/request", _initial_request(fresh_tck, "urn:dataset:none")
    )
    assert r.status_code == 400


def test_a_repeated_request_answers_the_existing_negotiation(
    space: Space, staff: Staff, fresh_tck: TckPeer
) -> None:
    dataset_id = _publish(staff, "manual")
    msg = _initial_request(fresh_tck, dataset_id)
    first = fresh_tck.send(space.connectors[GZ], "POST", "/negotiations/request", msg)
    second = fresh_tck.send(space.connectors[GZ], "POST", "/negotiations/request", msg)
    assert (first.status_code, second.status_code) == (201, 200)
    assert (
        parse_as(first.content, ContractNegotiation).provider_pid
        == parse_as(second.content, ContractNegotiation).provider_pid
    )


def test_catalog_pages_are_linked_and_filtered(space: Space, staff: Staff, fresh_tck: TckPeer) -> None:
    tag = uuid.uuid4().hex[:8]
    ids = sorted(_publish(staff, keywords=[tag]) for _ in range(3))
    msg = CatalogRequestMessage(filter=[{"keyword": tag}])
    seen: list[str] = []
    url: str | None = f"{space.connectors[GZ].url}/catalog/request?limit=2"
    pages = 0
    while url is not None:
        headers = {"Authorization": f"Bearer {fresh_tck.token_for(GZ)}", "Content-Type": "application/json"}
        r = httpx.post(url, content=to_json(msg), headers=headers)
        assert r.status_code == 200, r.text
        seen += [d["@id"] for d in r.json()["dataset"]]
        url = r.links.get("next", {}).get("url")
        pages += 1
    assert (sorted(seen), pages) == (ids, 2)


def test_a_catalog_with_nothing_matching_is_a_valid_catalog_without_datasets(
    space: Space, fresh_tck: TckPeer
) -> None:
    msg = CatalogRequestMessage(filter=[{"keyword": f"absent-{uuid.uuid4().hex}"}])
    r = fresh_tck.send(space.connectors[GZ], "POST", "/catalog/request", msg)
    assert r.status_code == 200, r.text
    assert parse_as(r.content, CatalogResponse).dataset is None


def test_an_unsupported_catalog_filter_is_a_400(space: Space, fresh_tck: TckPeer) -> None:
    msg = CatalogRequestMessage(filter=[{"sql": "drop table"}])
    r = fresh_tck.send(space.connectors[GZ], "POST", "/catalog/request", msg)
    assert r.status_code == 400


def test_a_narrower_request_than_the_offer_is_agreed_with_the_narrower_rules(
    space: Space, staff: Staff
) -> None:
    dataset_id = _publish(staff, "auto")
    until = {"leftOperand": "dateTime", "operator": "lt", "rightOperand": "2027-01-01T00:00:00Z"}
    narrower = {
        "@id": OFFER["@id"],
        "permission": [{"action": "use", "constraint": [*OFFER["permission"][0]["constraint"], until]}],
    }
    consumer = _wait(staff, HKU, "negotiations", _negotiate(space, staff, dataset_id, narrower), "FINALIZED")
    assert consumer["state"] == "FINALIZED", consumer["terminal_reason"]
    agreement = staff(HKU, Role.RESEARCHER).get(f"/management/agreements/{consumer['agreement_id']}").json()
    assert agreement["policy"]["permission"] == narrower["permission"]


def test_openapi_describes_the_dsp_and_management_endpoints(space: Space) -> None:
    paths = httpx.get(f"{space.connectors[GZ].url}/openapi.json").json()["paths"]
    expected = {
        "/.well-known/dspace-version",
        "/catalog/request",
        "/negotiations/request",
        "/negotiations/{pid}/agreement/verification",
        "/transfers/{pid}/completion",
        "/management/negotiations",
        "/management/transfers/{pid}/{action}",
    }
    assert expected <= set(paths)


# --- replay: a DSP request token is spent by the transaction of its message, or on its own if that fails


def _send_with(node: Any, token: str, path: str, message: Any = None, raw: bytes = b"") -> Any:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    content = to_json(message) if message is not None else raw
    return httpx.post(f"{node.url}{path}", content=content, headers=headers, timeout=10.0)


def _denials(node: Any) -> list[dict[str, object]]:
    with ConnectorClient(node.url, node.keys[Role.REGULATOR]) as c:
        head = c.tree_head()
        entries = [item["entry"] for item in c.audit_entries(0, head["tree_size"])]
    return [e for e in entries if e["action"] == "peer.authenticate" and e["outcome"] == "denied"]


def _requested(space: Space, staff: Staff, tck: TckPeer) -> ContractNegotiation:
    """A negotiation waiting in REQUESTED for a steward (manual approval), opened by the stand-in peer."""
    dataset_id = _publish(staff, "manual")
    sent = tck.send(space.connectors[GZ], "POST", "/negotiations/request", _initial_request(tck, dataset_id))
    assert sent.status_code == 201, sent.text
    return parse_as(sent.content, ContractNegotiation)


def _termination(ack: ContractNegotiation) -> ContractNegotiationTerminationMessage:
    return ContractNegotiationTerminationMessage(
        provider_pid=ack.provider_pid, consumer_pid=ack.consumer_pid, code="changed-mind"
    )


def test_a_replayed_dsp_message_is_refused_audited_and_changes_nothing(
    space: Space, staff: Staff, fresh_tck: TckPeer
) -> None:
    gz = space.connectors[GZ]
    dataset_id = _publish(staff, "manual")
    token = fresh_tck.token_for(GZ)
    first = _send_with(gz, token, "/negotiations/request", _initial_request(fresh_tck, dataset_id))
    ack = parse_as(first.content, ContractNegotiation)
    again = _send_with(gz, token, f"/negotiations/{ack.provider_pid}/termination", _termination(ack))
    assert (first.status_code, again.status_code, again.json()["reason"]) == (201, 401, "replayed")
    assert _denials(gz)[-1]["reason"] == "replayed"
    assert _wait(staff, GZ, "negotiations", ack.provider_pid)["state"] == "REQUESTED"


def test_a_token_whose_message_the_state_refused_cannot_be_used_again(
    space: Space, staff: Staff, fresh_tck: TckPeer
) -> None:
    """The refusal happens inside the handler's transaction, after the token's use was written there:
    the transaction rolls back, and the use must still be kept."""
    gz = space.connectors[GZ]
    ack = _requested(space, staff, fresh_tck)
    token = fresh_tck.token_for(GZ)
    forbidden = ContractNegotiationEventMessage(
        provider_pid=ack.provider_pid, consumer_pid=ack.consumer_pid, event_type="ACCEPTED"
    )
    refused = _send_with(gz, token, f"/negotiations/{ack.provider_pid}/events", forbidden)
    assert parse_as(refused.content, ContractNegotiationError).code == "dsp-message-not-allowed"
    again = _send_with(gz, token, f"/negotiations/{ack.provider_pid}/termination", _termination(ack))
    assert (again.status_code, again.json()["reason"]) == (401, "replayed")
    assert _wait(staff, GZ, "negotiations", ack.provider_pid)["state"] == "REQUESTED"


def test_a_token_whose_message_was_invalid_cannot_be_used_again(
    space: Space, staff: Staff, fresh_tck: TckPeer
) -> None:
    """Refused before any transaction (the body is not a message): the token is spent all the same."""
    gz = space.connectors[GZ]
    ack = _requested(space, staff, fresh_tck)
    token = fresh_tck.token_for(GZ)
    path = f"/negotiations/{ack.provider_pid}/termination"
    assert _send_with(gz, token, path, raw=b"{not json").status_code == 400
    again = _send_with(gz, token, path, _termination(ack))
    assert (again.status_code, again.json()["reason"]) == (401, "replayed")
    assert _wait(staff, GZ, "negotiations", ack.provider_pid)["state"] == "REQUESTED"


def test_concurrent_presentations_of_one_token_let_exactly_one_message_through(
    space: Space, staff: Staff, fresh_tck: TckPeer
) -> None:
    gz = space.connectors[GZ]
    dataset_id = _publish(staff, "manual")
    token = fresh_tck.token_for(GZ)
    messages = [_initial_request(fresh_tck, dataset_id) for _ in range(6)]
    barrier = threading.Barrier(len(messages), timeout=10)

    def send(message: ContractRequestMessage) -> int:
        barrier.wait()
        return int(_send_with(gz, token, "/negotiations/request", message).status_code)

    with ThreadPoolExecutor(len(messages)) as pool:
        codes = sorted(pool.map(send, messages))
    assert codes == [201] + [401] * (len(messages) - 1)
    listed = staff(GZ, Role.ADMIN).get("/management/negotiations", params={"limit": 1000}).json()
    mine = {m.consumer_pid for m in messages}
    assert len([n for n in listed if n["consumer_pid"] in mine]) == 1
