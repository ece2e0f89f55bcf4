"""The 67 mandatory DSP TCK scenarios, driven against our connector in the role each names.

The scenario text (`../shared/conformance/dsp-tck-scenarios.md`, parsed by `tests/protocol/tck.py`) is
the script: a `TCK->>CUT` line is sent by the stand-in peer (`tck_peer.py`) and the connector's answer
must be what the next line names (status, and a body valid against its schema); a `CUT->>TCK` line is
triggered through the management API (datasets are `stepwise`, consumer processes `auto=false`, so
the connector sends nothing unasked) and the stand-in must receive exactly that message.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from healthspace.core.apikeys import Role
from healthspace.protocol.messages import (
    MESSAGE_MODELS,
    Agreement,
    CatalogRequestMessage,
    ContractAgreementMessage,
    ContractAgreementVerificationMessage,
    ContractNegotiationEventMessage,
    ContractNegotiationTerminationMessage,
    ContractOfferMessage,
    ContractRequestMessage,
    DataAddress,
    DspMessage,
    Offer,
    TransferCompletionMessage,
    TransferRequestMessage,
    TransferStartMessage,
    TransferSuspensionMessage,
    TransferTerminationMessage,
    VersionResponse,
    agreement_timestamp,
    parse_as,
)
from healthspace.protocol.states import EVENT_ACCEPTED, EVENT_FINALIZED
from tests.conftest import CONFORMANCE
from tests.dsp.conftest import GZ, HKU, OFFER, TCK, Staff
from tests.dsp.tck_peer import TckPeer
from tests.protocol.tck import ERROR, OK, Scenario, Step, load_scenarios
from tests.support.space import Space

SCENARIOS = {s.id: s for s in load_scenarios(CONFORMANCE / "dsp-tck-scenarios.md")}

PROVIDER_ACTIONS = {
    "ContractOfferMessage": "offer",
    "ContractAgreementMessage": "approve",
    EVENT_FINALIZED: "finalize",
    "ContractNegotiationTerminationMessage": "terminate",
}
CONSUMER_ACTIONS = {
    EVENT_ACCEPTED: "accept",
    "ContractAgreementVerificationMessage": "verify",
    "ContractRequestMessage": "request",
    "ContractNegotiationTerminationMessage": "terminate",
}
TRANSFER_ACTIONS = {
    "TransferStartMessage": "start",
    "TransferCompletionMessage": "complete",
    "TransferSuspensionMessage": "suspend",
    "TransferTerminationMessage": "terminate",
}


class Driver:
    """Plays one scenario. `cut_pid` is the connector's own id of the process under test."""

    def __init__(self, space: Space, staff: Staff, tck: TckPeer, scenario: Scenario) -> None:
        self.scenario = scenario
        self.tck = tck
        self.provider = scenario.cut_role == "provider"
        self.cut = space.connectors[GZ if self.provider else HKU]
        self.person = staff(self.cut.id, Role.STEWARD if self.provider else Role.RESEARCHER)
        self.dataset_id = f"urn:dataset:tck:{uuid.uuid4().hex[:8]}"
        self.ppid: str | None = None
        self.cpid: str | None = None
        self.cut_pid: str | None = None
        self.agreement_id: str | None = None
        self.last: httpx.Response | None = None

    # --- helpers ---------------------------------------------------------------------------------

    def offer(self) -> Offer:
        return Offer.model_validate({**OFFER, "target": self.dataset_id})

    def publish(self) -> None:
        r = self.person.post(
            "/management/datasets",
            json={"id": self.dataset_id, "title": "TCK dataset", "offer": OFFER, "approval": "stepwise"},
        )
        assert r.status_code == 201, r.text

    def manage(self, kind: str, action: str) -> dict[str, Any]:
        r = self.person.post(f"/management/{kind}/{self.cut_pid}/{action}", json={"reason": "tck"})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def acknowledged(self, kind: str) -> dict[str, Any]:
        r = self.person.get(
            f"/management/{kind}/{self.cut_pid}", params={"acknowledged": "true", "timeout_s": 10}
        )
        assert r.status_code == 200, r.text
        assert r.json()["provider_pid"], "the provider's acknowledgement never arrived"
        return dict(r.json())

    # --- negotiation set-up for transfers --------------------------------------------------------

    def finalized_agreement_as_provider(self) -> None:
        self.publish()
        self.tck_negotiation("ContractRequestMessage")
        self.check(Step("CUT", "TCK", "ContractNegotiation", True))
        self.cut_action("ContractAgreementMessage")
        self.tck_negotiation("ContractAgreementVerificationMessage")
        self.check(Step("CUT", "TCK", OK, True))
        self.cut_action(EVENT_FINALIZED)
        self.ppid = self.cpid = self.cut_pid = None

    def finalized_agreement_as_consumer(self) -> None:
        self.signal_negotiation(auto=True)
        self.cut_action("ContractRequestMessage")
        self.tck_negotiation("ContractAgreementMessage")
        self.check(Step("CUT", "TCK", OK, True))
        self.tck.expect("ContractAgreementVerificationMessage")
        self.tck_negotiation(EVENT_FINALIZED)
        self.check(Step("CUT", "TCK", OK, True))
        self.ppid = self.cpid = self.cut_pid = None

    # --- steps -----------------------------------------------------------------------------------

    def signal_negotiation(self, auto: bool = False) -> None:
        r = self.person.post(
            "/management/negotiations",
            json={
                "provider_url": self.tck.url,
                "provider_id": TCK,
                "offer": self.offer().model_dump(mode="json", exclude_none=True),
                "auto": auto,
            },
        )
        assert r.status_code == 201, r.text
        self.cut_pid = self.cpid = r.json()["id"]

    def signal_transfer(self) -> None:
        r = self.person.post("/management/transfers", json={"agreement_id": self.agreement_id})
        assert r.status_code == 201, r.text
        self.cut_pid = self.cpid = r.json()["id"]

    def cut_action(self, key: str) -> None:
        """Make the connector send `key`, then receive it at the stand-in."""
        if key in ("ContractRequestMessage", "TransferRequestMessage") and self.ppid is None:
            self.tck.expect(key)  # the signal already made the connector send it
            self.ppid = self.acknowledged("negotiations" if key.startswith("Contract") else "transfers")[
                "provider_pid"
            ]
            return
        if key in TRANSFER_ACTIONS:
            self.manage("transfers", TRANSFER_ACTIONS[key])
        else:
            actions = PROVIDER_ACTIONS if self.provider else CONSUMER_ACTIONS
            self.manage("negotiations", actions[key])
        got = self.tck.expect(key)
        if isinstance(got.message, ContractAgreementMessage):
            self.agreement_id = got.message.agreement.id
        assert (got.authorization or "").startswith("Bearer "), "sent without a request token"

    def tck_negotiation(self, key: str) -> None:
        msg: DspMessage
        if key == "ContractRequestMessage" and self.ppid is None:
            self.cpid = f"urn:uuid:{uuid.uuid4()}"
            msg = ContractRequestMessage(
                consumer_pid=self.cpid, offer=self.offer(), callback_address=self.tck.url
            )
            self.last = self.tck.send(self.cut, "POST", "/negotiations/request", msg)
            if self.last.status_code in (200, 201):
                self.ppid = self.cut_pid = self.last.json()["providerPid"]
            return
        ppid, cpid = self.ppid or "", self.cpid or ""
        own = ppid if self.provider else cpid
        if key == "ContractRequestMessage":
            msg, path = (
                ContractRequestMessage(provider_pid=ppid, consumer_pid=cpid, offer=self.offer()),
                "request",
            )
        elif key == "ContractOfferMessage":
            msg, path = (
                ContractOfferMessage(provider_pid=ppid, consumer_pid=cpid, offer=self.offer()),
                "offers",
            )
        elif key == "ContractAgreementMessage":
            agreement = Agreement.model_validate(
                {
                    "@id": f"urn:uuid:{uuid.uuid4()}",
                    "target": self.dataset_id,
                    "assigner": TCK,
                    "assignee": self.cut.id,
                    "timestamp": agreement_timestamp(datetime.now(UTC)),
                    "permission": OFFER["permission"],
                }
            )
            self.agreement_id = agreement.id
            msg, path = (
                ContractAgreementMessage(provider_pid=ppid, consumer_pid=cpid, agreement=agreement),
                "agreement",
            )
        elif key in (EVENT_ACCEPTED, EVENT_FINALIZED):
            event = key.split(":")[1]
            msg, path = (
                ContractNegotiationEventMessage(provider_pid=ppid, consumer_pid=cpid, event_type=event),
                "events",
            )
        elif key == "ContractAgreementVerificationMessage":
            msg, path = (
                ContractAgreementVerificationMessage(provider_pid=ppid, consumer_pid=cpid),
                "agreement/verification",
            )
        elif key == "ContractNegotiationTerminationMessage":
            msg = ContractNegotiationTerminationMessage(
                provider_pid=ppid, consumer_pid=cpid, code="tck", reason=["tck"]
            )
            path = "termination"
        else:
            raise AssertionError(f"no driver for {key}")
        self.last = self.tck.send(self.cut, "POST", f"/negotiations/{own}/{path}", msg)

    def tck_transfer(self, key: str) -> None:
        msg: DspMessage
        if key == "TransferRequestMessage":
            self.cpid = f"urn:uuid:{uuid.uuid4()}"
            msg = TransferRequestMessage(
                consumer_pid=self.cpid,
                agreement_id=self.agreement_id or "",
                format="HttpData-PULL",
                callback_address=self.tck.url,
            )
            self.last = self.tck.send(self.cut, "POST", "/transfers/request", msg)
            if self.last.status_code in (200, 201):
                self.ppid = self.cut_pid = self.last.json()["providerPid"]
            return
        ppid, cpid = self.ppid or "", self.cpid or ""
        own = ppid if self.provider else cpid
        if key == "TransferStartMessage":
            address = DataAddress(
                endpoint_type="https://w3id.org/idsa/v4.1/HTTP", endpoint=f"{self.tck.url}/data"
            )
            msg = TransferStartMessage(
                provider_pid=ppid, consumer_pid=cpid, data_address=None if self.provider else address
            )
            path = "start"
        elif key == "TransferSuspensionMessage":
            msg, path = TransferSuspensionMessage(provider_pid=ppid, consumer_pid=cpid), "suspension"
        elif key == "TransferCompletionMessage":
            msg, path = TransferCompletionMessage(provider_pid=ppid, consumer_pid=cpid), "completion"
        elif key == "TransferTerminationMessage":
            msg, path = TransferTerminationMessage(provider_pid=ppid, consumer_pid=cpid), "termination"
        else:
            raise AssertionError(f"no driver for {key}")
        self.last = self.tck.send(self.cut, "POST", f"/transfers/{own}/{path}", msg)

    def tck_catalog(self, key: str) -> None:
        if key == "CatalogRequestMessage":
            self.last = self.tck.send(self.cut, "POST", "/catalog/request", CatalogRequestMessage())
        elif key == "DatasetRequestMessage":
            wanted = self.dataset_id if self.scenario.id != "CAT:01-03" else "urn:dataset:does-not-exist"
            self.last = self.tck.send(self.cut, "GET", f"/catalog/datasets/{wanted}")
        else:
            raise AssertionError(f"no driver for {key}")

    def check(self, step: Step) -> None:
        """The connector's answer to the message just sent must be what `step` names."""
        r = self.last
        assert r is not None, f"nothing was sent before {step}"
        if step.name == OK:
            assert r.status_code == 200, r.text
            return
        if step.name == ERROR:
            assert 400 <= r.status_code < 500, r.text
            error = {"negotiation": "ContractNegotiationError", "transfer": "TransferError"}
            parse_as(r.content, MESSAGE_MODELS[error.get(self.scenario.protocol, "CatalogError")])
            return
        if step.name == "VersionResponse":
            assert r.status_code == 200, r.text
            parse_as(r.content, VersionResponse)
            return
        model = MESSAGE_MODELS[step.name]
        if step.name == "CatalogError":
            assert r.status_code == 404, r.text
        else:
            assert r.status_code in (200, 201), r.text
        parse_as(r.content, model)

    def run(self) -> None:
        s = self.scenario
        if s.protocol == "catalog":
            self.publish()
        if s.protocol == "transfer":
            if self.provider:
                self.finalized_agreement_as_provider()
            else:
                self.finalized_agreement_as_consumer()
        elif s.protocol == "negotiation" and self.provider:
            self.publish()
        for step in s.steps:
            if step.sender == "TCK" and step.is_response:
                continue  # the stand-in's own answer to what the connector sent
            if step.is_response:
                self.check(step)
            elif step.name == "Signal to start negotiation":
                self.signal_negotiation()
            elif step.name == "Signal to start transfer":
                self.signal_transfer()
            elif step.name == "MetadataRequest":
                self.last = httpx.get(f"{self.cut.url}/.well-known/dspace-version", timeout=10.0)
            elif step.sender == "CUT":
                self.cut_action(step.name)
            elif s.protocol == "negotiation":
                self.tck_negotiation(step.name)
            elif s.protocol == "transfer":
                self.tck_transfer(step.name)
            else:
                self.tck_catalog(step.name)


@pytest.mark.parametrize("scenario_id", sorted(SCENARIOS))
def test_tck_scenario(scenario_id: str, space: Space, staff: Staff, fresh_tck: TckPeer) -> None:
    tck = fresh_tck
    Driver(space, staff, tck, SCENARIOS[scenario_id]).run()
    assert tck.invalid == [], "the connector sent messages its peers' schemas reject"
    assert tck.inbox.empty(), f"the connector sent more than the scenario asks: {tck.inbox.get_nowait()}"


def test_all_67_scenarios_are_driven() -> None:
    assert len(SCENARIOS) == 67
