"""A connector that stops between committing a step and delivering its message resumes after restart:
the owed message is delivered once, and a step owed before the stop is taken once."""

from __future__ import annotations

import httpx
import pytest

from healthspace.connector.dsp.manager import DspManager
from healthspace.connector.dsp.service import DatasetCreate, DspService
from healthspace.core.clock import SystemClock
from healthspace.core.db import Database
from healthspace.core.settings import Settings
from healthspace.identity.fastapi import PeerAuth
from healthspace.identity.keys import SigningKey
from healthspace.protocol.messages import Agreement, ContractAgreementMessage, ContractRequestMessage, Offer
from tests.dsp.conftest import HKU, OFFER, TCK
from tests.dsp.tck_peer import TckPeer
from tests.support.space import Space


class _Connector:
    """The DSP core of one connector on a database file: what survives a restart is only the file."""

    def __init__(self, url: str, space: Space) -> None:
        node = space.connectors[HKU]
        key = SigningKey.load(
            node.data_dir / "participant.key", Settings(data_dir=node.data_dir).key_encryption_key()
        )
        credential = (node.data_dir / "credential.jwt").read_text().strip()
        self.db = Database(url, branches=("dsp",))
        self.audit: list[str] = []
        self.service = DspService(
            self.db,
            participant_id=HKU,
            public_url="http://127.0.0.1:9",
            key=key,
            clock=SystemClock(),
            record=lambda actor, action, subject, outcome, reason: self.audit.append(action),
        )
        self.http = httpx.Client()
        self.manager = DspManager(self.service, self.http, lambda peer: PeerAuth(key, credential, HKU, peer))

    def close(self) -> None:
        self.http.close()
        self.db.dispose()


@pytest.fixture
def db_file(db_url: str) -> str:
    """The connector's database: a SQLite file or a PostgreSQL database (each test runs on both)."""
    return db_url


def test_a_request_committed_before_a_crash_is_sent_once_after_restart(
    db_file: str, space: Space, fresh_tck: TckPeer
) -> None:
    before = _Connector(db_file, space)
    started = before.service.start_negotiation(
        "researcher:t", TCK, fresh_tck.url, {**OFFER, "target": "urn:d:1"}
    )
    before.close()  # no manager ever ran: the process died after commit, before delivery

    after = _Connector(db_file, space)
    try:
        after.manager.run_once()
        got = fresh_tck.expect("ContractRequestMessage")
        after.manager.run_once()
        assert isinstance(got.message, ContractRequestMessage)
        assert got.message.consumer_pid == started.id
        assert fresh_tck.inbox.empty()
        assert after.service.negotiation(started.id).provider_pid is not None
    finally:
        after.close()


def test_a_decision_owed_before_a_crash_is_taken_once_after_restart(
    db_file: str, space: Space, fresh_tck: TckPeer
) -> None:
    before = _Connector(db_file, space)
    before.service.publish("steward:t", DatasetCreate(id="urn:d:2", title="Cohort", offer=OFFER))
    request = ContractRequestMessage(
        consumer_pid="urn:uuid:c-restart",
        offer=Offer.model_validate({**OFFER, "target": "urn:d:2"}),
        callback_address=fresh_tck.url,
    )
    ack, _ = before.service.on_contract_request(TCK, request, None)
    before.close()

    after = _Connector(db_file, space)
    try:
        after.manager.run_once()
        got = fresh_tck.expect("ContractAgreementMessage")
        after.manager.run_once()
        assert fresh_tck.inbox.empty()
        assert isinstance(got.message, ContractAgreementMessage)
        state = after.service.negotiation(ack.provider_pid)
        assert (state.state, state.agreement_id) == ("AGREED", got.message.agreement.id)
    finally:
        after.close()


def test_a_peer_unreachable_until_retries_are_spent_ends_the_process_with_the_reason(
    db_file: str, space: Space
) -> None:
    c = _Connector(db_file, space)
    c.manager.max_attempts = 1
    try:
        started = c.service.start_negotiation(
            "researcher:t", TCK, "http://127.0.0.1:9", {**OFFER, "target": "urn:d"}
        )
        c.manager.run_once()
        ended = c.service.negotiation(started.id)
        assert ended.state == "TERMINATED"
        assert "undeliverable" in (ended.terminal_reason or "")
        assert "dsp.negotiation.undeliverable" in c.audit
    finally:
        c.close()


def _agreed(c: _Connector, tck: TckPeer) -> tuple[str, str]:
    """A consumer-side negotiation with the stand-in, AGREED; returns (our pid, their pid)."""
    started = c.service.start_negotiation(
        "researcher:t", TCK, tck.url, {**OFFER, "target": "urn:d:3"}, auto=False
    )
    c.manager.run_once()
    tck.expect("ContractRequestMessage")
    theirs = c.service.negotiation(started.id).provider_pid or ""
    agreement = Agreement.model_validate(
        {**OFFER, "@id": f"urn:agreement:{started.id}", "target": "urn:d:3", "assigner": TCK, "assignee": HKU}
    )
    msg = ContractAgreementMessage(provider_pid=theirs, consumer_pid=started.id, agreement=agreement)
    c.service.on_negotiation_message(TCK, started.id, msg)
    return started.id, theirs


# VERIFIED: it got the message before we could record that; FINALIZED: it also finalized meanwhile.
@pytest.mark.parametrize("where", ["VERIFIED", "FINALIZED"])
def test_a_repeat_refused_by_a_peer_in_or_past_our_state_counts_as_delivered(
    db_file: str, space: Space, fresh_tck: TckPeer, where: str
) -> None:
    c = _Connector(db_file, space)
    try:
        ours, theirs = _agreed(c, fresh_tck)
        fresh_tck.refuse.add("/agreement/verification")
        fresh_tck.states[theirs] = where
        c.service.negotiation_action("researcher:t", None, ours, "verify")
        c.manager.run_once()
        fresh_tck.expect("ContractAgreementVerificationMessage")
        assert c.service.negotiation(ours).state == "VERIFIED"
    finally:
        c.close()


# TERMINATED: it walked away; AGREED: it is behind us, so it refused our message for another reason.
@pytest.mark.parametrize("where", ["TERMINATED", "AGREED"])
def test_a_refusal_by_a_peer_elsewhere_ends_our_process(
    db_file: str, space: Space, fresh_tck: TckPeer, where: str
) -> None:
    c = _Connector(db_file, space)
    try:
        ours, theirs = _agreed(c, fresh_tck)
        fresh_tck.refuse.add("/agreement/verification")
        fresh_tck.states[theirs] = where
        c.service.negotiation_action("researcher:t", None, ours, "verify")
        c.manager.run_once()
        fresh_tck.expect("ContractAgreementVerificationMessage")
        ended = c.service.negotiation(ours)
        assert (ended.state, "HTTP 400" in (ended.terminal_reason or "")) == ("TERMINATED", True)
    finally:
        c.close()
