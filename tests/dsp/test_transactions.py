"""What one DSP transaction leaves behind: the manager's hints, and nothing of a step that failed.

The service reads process rows detached and writes back what changed (no ORM unit of work), so the
hints it hands the manager come from what it saved and queued. Checked on SQLite and PostgreSQL
against the rows themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event, select

from healthspace.audit.models import Outcome
from healthspace.connector.dsp.manager import DspManager
from healthspace.connector.dsp.service import DatasetCreate, DspService, Work
from healthspace.connector.dsp.store import Outgoing
from healthspace.connector.dsp.tables import AgreementRow, NegotiationRow, OutboxRow
from healthspace.core.clock import SystemClock
from healthspace.core.db import Database
from healthspace.core.errors import ConflictError
from healthspace.core.notices import ChangeNotices
from healthspace.identity.keys import SigningKey
from healthspace.protocol.messages import (
    Agreement,
    ContractAgreementMessage,
    ContractAgreementVerificationMessage,
    ContractNegotiation,
    ContractNegotiationTerminationMessage,
    ContractRequestMessage,
    Offer,
)
from healthspace.protocol.states import NegotiationState

ME, PEER = "gz-hospital", "hk-university"
OFFER: dict[str, Any] = {"@id": "urn:offer:1", "permission": [{"action": "use"}]}
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

Audited = list[tuple[str, str, str, Outcome, str]]


@pytest.fixture
def db(make_db: Callable[..., Database]) -> Database:
    return make_db("dsp")


def _service(
    db: Database, audited: Audited, hints: list[Work], cls: type[DspService] = DspService
) -> DspService:
    def record(actor: str, action: str, subject: str, outcome: Outcome, reason: str) -> None:
        audited.append((actor, action, subject, outcome, reason))

    def record_many(entries: Sequence[tuple[str, str, str, Outcome, str]]) -> None:
        audited.extend(entries)

    service = cls(
        db,
        participant_id=ME,
        public_url="http://127.0.0.1:9",
        key=SigningKey.generate(),
        clock=SystemClock(),
        record=record,
        record_many=record_many,
    )
    service.on_work(hints.extend)
    service.publish("steward:t", DatasetCreate(id="urn:d:1", title="Cohort", offer=OFFER))
    return service


def _outbox(db: Database, pid: str) -> list[OutboxRow]:
    with db.session() as s:
        return list(s.scalars(select(OutboxRow).where(OutboxRow.process_id == pid)))


def test_a_request_received_hints_the_decision_it_leaves_owed(db: Database) -> None:
    hints: list[Work] = []
    service = _service(db, [], hints)
    msg = ContractRequestMessage(
        consumer_pid="urn:uuid:c-1",
        offer=Offer.model_validate({**OFFER, "target": "urn:d:1"}),
        callback_address="http://127.0.0.1:8",
    )
    ack, created = service.on_contract_request(PEER, msg, None)

    assert created
    stored = service.negotiation(ack.provider_pid)
    assert (stored.state, stored.pending, stored.consumer_pid) == ("REQUESTED", "decide", "urn:uuid:c-1")
    assert ("step", "negotiation", ack.provider_pid) in hints
    assert _outbox(db, ack.provider_pid) == []  # nothing is sent before the decision

    hints.clear()  # the same request again answers the same process and owes nothing new
    again, created_again = service.on_contract_request(PEER, msg, None)
    assert (again.provider_pid, created_again, hints) == (ack.provider_pid, False, [])


def test_a_request_sent_hints_the_message_waiting_in_the_outbox(db: Database) -> None:
    hints: list[Work] = []
    audited: Audited = []
    service = _service(db, audited, hints)
    started = service.start_negotiation(
        "researcher:t", PEER, "http://127.0.0.1:8", {**OFFER, "target": "urn:d:1"}
    )

    (queued,) = _outbox(db, started.id)
    assert (queued.status, queued.lease_until, queued.message_type) == (
        "pending",
        None,
        "ContractRequestMessage",
    )
    assert ("send", "negotiation", started.id) in hints
    assert ("researcher:t", "dsp.negotiation.request", started.id) in [a[:3] for a in audited]


def test_a_step_that_fails_is_undone_except_that_it_is_no_longer_owed(db: Database) -> None:
    """A provider cannot agree in OFFERED: the agreement the step made before finding that out, its
    message and its change to the row are all rolled back; the failure is audited."""
    hints: list[Work] = []
    audited: Audited = []
    service = _service(db, audited, hints)
    with db.session() as s:
        service.store.create_negotiation(
            s,
            NegotiationRow(
                id="urn:n:1",
                role="provider",
                provider_pid="urn:n:1",
                consumer_pid="urn:c:1",
                state="OFFERED",
                counterparty_id=PEER,
                counterparty_address="http://127.0.0.1:8",
                dataset_id="urn:d:1",
                offer={**OFFER, "target": "urn:d:1"},
                agreement_id=None,
                auto=True,
                pending="decide",
                terminal_reason=None,
                created_at=T0,
                updated_at=T0,
            ),
        )

    step = service.run_pending("negotiation", "urn:n:1")

    assert step.sent == []
    with db.session() as s:
        row = s.get(NegotiationRow, "urn:n:1")
        assert row is not None
        assert (row.state, row.pending, row.agreement_id, row.updated_at) == ("OFFERED", None, None, T0)
        assert list(s.scalars(select(AgreementRow))) == []
    assert _outbox(db, "urn:n:1") == []
    failures = [a for a in audited if a[3] is Outcome.FAILURE]
    assert [(a[1], a[2]) for a in failures] == [("dsp.negotiation.decide", "urn:n:1")]
    assert not [h for h in hints if h[2] == "urn:n:1"]  # nothing owed any more, nothing queued


# --- with a manager taking hand-offs: steps in the transaction that leaves them owed ----------------

LEASE = timedelta(seconds=30)


def _request(consumer_pid: str = "urn:uuid:c-1") -> ContractRequestMessage:
    return ContractRequestMessage(
        consumer_pid=consumer_pid,
        offer=Offer.model_validate({**OFFER, "target": "urn:d:1"}),
        callback_address="http://127.0.0.1:8",
    )


def test_a_request_received_is_decided_in_its_own_transaction_and_the_agreement_handed_over(
    db: Database,
) -> None:
    hints: list[Work] = []
    audited: Audited = []
    handed: list[list[Outgoing]] = []
    service = _service(db, audited, hints)
    service.hand_off(handed.append, LEASE)
    before = datetime.now(UTC)

    ack, created = service.on_contract_request(PEER, _request(), None)

    assert created
    assert ack.state == "REQUESTED"
    stored = service.negotiation(ack.provider_pid)
    assert (stored.state, stored.pending) == ("AGREED", None)
    (queued,) = _outbox(db, ack.provider_pid)
    assert (queued.message_type, queued.status, queued.attempts) == ("ContractAgreementMessage", "pending", 1)
    assert queued.lease_until is not None
    assert queued.lease_until >= before + LEASE
    assert [[(o.seq, o.message_type) for o in batch] for batch in handed] == [
        [(queued.seq, "ContractAgreementMessage")]
    ]
    assert [h for h in hints if h[2] == ack.provider_pid] == []  # no worker has anything to take
    with db.session() as s:
        (agreement,) = s.scalars(select(AgreementRow))
    assert agreement.id == stored.agreement_id
    assert [a[1] for a in audited if a[2] == ack.provider_pid] == [
        "dsp.negotiation.requested",
        "dsp.negotiation.agreed",
    ]


def test_a_step_taken_inside_a_request_needs_no_savepoint(db: Database) -> None:
    # The step's inserts wait until it has succeeded, so undoing a failed step writes nothing back;
    # on PostgreSQL a savepoint and its release would cost two round trips per step.
    handed: list[list[Outgoing]] = []
    service = _service(db, [], [])
    service.hand_off(handed.append, LEASE)
    savepoints: list[str] = []

    def savepoint(conn: Any, name: str) -> None:
        savepoints.append(name)

    event.listen(db.engine, "savepoint", savepoint)
    try:
        ack, _ = service.on_contract_request(PEER, _request(), None)
    finally:
        event.remove(db.engine, "savepoint", savepoint)
    assert service.negotiation(ack.provider_pid).state == "AGREED"  # the step was taken inline
    assert savepoints == []
    assert len(_outbox(db, ack.provider_pid)) == 1


class _FailingDecision(DspService):
    """Decides, writes what deciding writes, then fails: what a step that goes wrong looks like."""

    def _decide(self, tx: Any, row: NegotiationRow, actor: str) -> None:
        super()._decide(tx, row, actor)
        raise ConflictError("the decision could not be taken")


def test_a_step_failing_inside_a_request_is_undone_and_left_to_a_worker(db: Database) -> None:
    hints: list[Work] = []
    audited: Audited = []
    handed: list[list[Outgoing]] = []
    service = _service(db, audited, hints, cls=_FailingDecision)
    service.hand_off(handed.append, LEASE)

    ack, created = service.on_contract_request(PEER, _request(), None)

    assert created  # the request itself is accepted and committed
    stored = service.negotiation(ack.provider_pid)
    assert (stored.state, stored.pending, stored.agreement_id) == ("REQUESTED", "decide", None)
    with db.session() as s:
        assert list(s.scalars(select(AgreementRow))) == []
    assert _outbox(db, ack.provider_pid) == []
    assert handed == []
    assert ("step", "negotiation", ack.provider_pid) in hints
    assert [a[1] for a in audited] == ["dsp.dataset.published", "dsp.negotiation.requested"]

    step = service.run_pending("negotiation", ack.provider_pid)  # the worker: fails and says so
    assert step.sent == []
    assert service.negotiation(ack.provider_pid).pending is None
    assert audited[-1][1:4] == ("dsp.negotiation.decide", ack.provider_pid, Outcome.FAILURE)


def test_a_request_started_is_handed_over_leased(db: Database) -> None:
    hints: list[Work] = []
    handed: list[list[Outgoing]] = []
    service = _service(db, [], hints)
    service.hand_off(handed.append, LEASE)

    started = service.start_negotiation(
        "researcher:t", PEER, "http://127.0.0.1:8", {**OFFER, "target": "urn:d:1"}
    )

    (queued,) = _outbox(db, started.id)
    assert (queued.status, queued.attempts, queued.lease_until is not None) == ("pending", 1, True)
    assert [[o.seq for o in batch] for batch in handed] == [[queued.seq]]
    assert ("send", "negotiation", started.id) not in hints  # no worker needs to claim it

    service.hand_off(None, LEASE)  # withdrawn: the next message waits unleased for a claim
    again = service.start_negotiation(
        "researcher:t", PEER, "http://127.0.0.1:8", {**OFFER, "target": "urn:d:1"}
    )
    (waiting,) = _outbox(db, again.id)
    assert (waiting.lease_until, len(handed)) == (None, 1)
    assert ("send", "negotiation", again.id) in hints


def test_a_manager_stopping_gives_back_the_leases_of_messages_it_did_not_take(db: Database) -> None:
    service = _service(db, [], [])
    with httpx.Client() as http:
        manager = DspManager(service, http, lambda _: httpx.BasicAuth("u", "p"), workers=1)
        # Registered as `start` does, with no worker running: the hand-off stays in the queue.
        service.hand_off(manager.handed, LEASE)
        started = service.start_negotiation(
            "researcher:t", PEER, "http://127.0.0.1:8", {**OFFER, "target": "urn:d:1"}
        )
        (queued,) = _outbox(db, started.id)
        assert queued.lease_until is not None
        manager.stop()
    (released,) = _outbox(db, started.id)
    assert (released.status, released.lease_until) == ("pending", None)  # the next pass sends it
    assert service.store.claim_next(started.id, datetime.now(UTC), LEASE) is not None


def test_an_agreement_naming_the_providers_pid_settles_our_request_still_in_flight(db: Database) -> None:
    """The provider's agreement can overtake the ACK of our request: it proves the request arrived,
    so the request is settled in the agreement's transaction and our verification leaves at once."""
    hints: list[Work] = []
    handed: list[list[Outgoing]] = []
    service = _service(db, [], hints)
    service.hand_off(handed.append, LEASE)
    started = service.start_negotiation(
        "researcher:t", PEER, "http://127.0.0.1:8", {**OFFER, "target": "urn:d:1"}
    )
    (request,) = _outbox(db, started.id)  # leased to a worker, its ACK not yet settled
    agreement = Agreement.model_validate(
        {**OFFER, "@id": "urn:agreement:1", "target": "urn:d:1", "assigner": PEER, "assignee": ME}
    )
    msg = ContractAgreementMessage(provider_pid="urn:p:1", consumer_pid=started.id, agreement=agreement)

    service.on_negotiation_message(PEER, started.id, msg)

    rows = {o.message_type: o for o in _outbox(db, started.id)}
    sent = rows["ContractRequestMessage"]
    assert (sent.status, sent.lease_until) == ("sent", None)
    verification = rows["ContractAgreementVerificationMessage"]
    assert (verification.status, verification.attempts) == ("pending", 1)
    assert [o.seq for o in handed[-1]] == [verification.seq]
    assert ("send", "negotiation", started.id) not in hints
    stored = service.negotiation(started.id)
    assert (stored.state, stored.provider_pid) == ("VERIFIED", "urn:p:1")

    # The request's deliverer settles afterwards (its ACK, or a lost answer it would retry): the
    # request stays sent and is never delivered again.
    service.store.settle_delivered(request.seq, "negotiation", started.id, "urn:p:1", started.id)
    service.store.settle_outbox(request.seq, sent=False, error="ReadTimeout", retry_at=datetime.now(UTC))
    assert {o.seq: o.status for o in _outbox(db, started.id)} == {
        request.seq: "sent",
        verification.seq: "pending",
    }
    assert service.negotiation(started.id).provider_pid == "urn:p:1"


class _CountedReads(DspService):
    """Counts the reads a long poll makes of a negotiation."""

    reads = 0

    def negotiation(self, pid: str) -> Any:
        self.reads += 1
        return super().negotiation(pid)


def test_a_long_poll_for_a_later_state_does_not_re_read_after_the_acknowledgement(db: Database) -> None:
    """Settling the request's ACK reports the state it leaves (REQUESTED): a waiter for FINALIZED
    knows without reading that it is not there yet."""
    service = _service(db, [], [], cls=_CountedReads)
    assert isinstance(service, _CountedReads)
    service.wait_poll_s = 60.0  # only notifications make it read here
    started = service.start_negotiation(
        "researcher:t", PEER, "http://127.0.0.1:8", {**OFFER, "target": "urn:d:1"}
    )
    (request,) = _outbox(db, started.id)
    found: list[Any] = []
    waiter = threading.Thread(
        target=lambda: found.append(service.wait_negotiation(started.id, {NegotiationState.FINALIZED}, 10.0))
    )
    waiter.start()
    try:
        deadline = time.monotonic() + 5
        while service.reads < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        ack = ContractNegotiation(provider_pid="urn:p:1", consumer_pid=started.id, state="REQUESTED")
        service.delivered(request.seq, "negotiation", started.id, ack)
        time.sleep(0.2)  # a waiter that re-reads does so at once
        assert service.reads == 1
    finally:
        ended = ContractNegotiationTerminationMessage(provider_pid="urn:p:1", consumer_pid=started.id)
        service.on_negotiation_message(PEER, started.id, ended)
        waiter.join(10)
    assert [f.state for f in found] == ["TERMINATED"]
    assert service.reads == 2


def _second_process(db: Database) -> DspService:
    """The same connector's service in another process: its own `Database` on the same database, so
    no in-process notification is shared."""
    return DspService(
        db,
        participant_id=ME,
        public_url="http://127.0.0.1:9",
        key=SigningKey.generate(),
        clock=SystemClock(),
        record=lambda *_: None,
    )


def test_a_waiter_sees_a_change_committed_by_another_process(make_db: Callable[..., Database]) -> None:
    """A second service on the same database (as a second worker process would be) notifies nobody
    here: the waiter reads the row again after `wait_poll_s` without a notification."""
    db = make_db("dsp")
    here = _service(db, [], [])
    here.wait_poll_s = 0.1
    started = here.start_negotiation(
        "researcher:t", PEER, "http://127.0.0.1:8", {**OFFER, "target": "urn:d:1"}
    )
    elsewhere = _second_process(make_db("dsp"))
    ended = ContractNegotiationTerminationMessage(provider_pid="urn:p:1", consumer_pid=started.id)
    found: list[Any] = []
    waiter = threading.Thread(
        target=lambda: found.append(here.wait_negotiation(started.id, {NegotiationState.FINALIZED}, 20.0))
    )
    t0 = time.monotonic()
    waiter.start()
    time.sleep(0.2)
    elsewhere.on_negotiation_message(PEER, started.id, ended)
    waiter.join(20)
    assert [f.state for f in found] == ["TERMINATED"]
    assert time.monotonic() - t0 < 10  # seen within a poll, not at the 20 s timeout


def test_a_request_decided_in_its_transaction_writes_its_process_once(db: Database) -> None:
    """The new process is inserted as the decision left it: one INSERT, no UPDATE after it."""
    handed: list[list[Outgoing]] = []
    service = _service(db, [], [])
    service.hand_off(handed.append, LEASE)
    statements: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement.split("(")[0].strip())

    event.listen(db.engine, "before_cursor_execute", note)
    try:
        ack, _ = service.on_contract_request(PEER, _request(), None)
    finally:
        event.remove(db.engine, "before_cursor_execute", note)
    writes = [q for q in statements if "dsp_negotiations" in q and not q.startswith("SELECT")]
    assert writes == ["INSERT INTO dsp_negotiations"]
    stored = service.negotiation(ack.provider_pid)
    assert (stored.state, stored.pending, stored.agreement_id is not None) == ("AGREED", None, True)


def test_a_verification_settles_our_agreement_still_in_flight_and_the_finalization_leaves_at_once(
    db: Database,
) -> None:
    hints: list[Work] = []
    handed: list[list[Outgoing]] = []
    service = _service(db, [], hints)
    service.hand_off(handed.append, LEASE)
    ack, _ = service.on_contract_request(PEER, _request(), None)
    (agreement,) = _outbox(db, ack.provider_pid)  # leased to a worker, not yet settled
    assert (agreement.message_type, agreement.status) == ("ContractAgreementMessage", "pending")

    verification = ContractAgreementVerificationMessage(
        provider_pid=ack.provider_pid, consumer_pid="urn:uuid:c-1"
    )
    service.on_negotiation_message(PEER, ack.provider_pid, verification)

    rows = {o.message_type: o for o in _outbox(db, ack.provider_pid)}
    assert rows["ContractAgreementMessage"].status == "sent"
    event_row = rows["ContractNegotiationEventMessage:FINALIZED"]
    assert (event_row.status, event_row.attempts) == ("pending", 1)
    assert [o.seq for o in handed[-1]] == [event_row.seq]
    assert ("send", "negotiation", ack.provider_pid) not in hints
    assert service.negotiation(ack.provider_pid).state == "FINALIZED"


def test_idle_workers_make_one_pass_per_idle_period_between_them(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker waking idle used to sweep: four workers, four passes a second, each a few queries,
    in every process of every connector doing nothing."""
    service = _service(db, [], [])
    with httpx.Client() as http:
        manager = DspManager(service, http, lambda _: httpx.BasicAuth("u", "p"), workers=4, idle_s=0.1)
        passes: list[float] = []
        run_once = manager.run_once

        def counted() -> int:
            passes.append(time.monotonic())
            return run_once()

        monkeypatch.setattr(manager, "run_once", counted)
        manager.start()
        time.sleep(1.5)
        manager.stop()
    # One at start, then about one per 0.1 s: at most 17 in 1.5 s (four workers each sweeping: ~60).
    assert 5 <= len(passes) <= 17


@pytest.mark.postgres
def test_a_waiter_hears_at_once_of_a_change_another_process_committed(postgres_url: str) -> None:
    """With change notices (PostgreSQL), a waiter does not wait for its next poll to see what a second
    process of the connector committed."""
    here_db, elsewhere_db = Database(postgres_url, branches=["dsp"]), Database(postgres_url)
    here = _service(here_db, [], [])
    here.wait_poll_s = 60.0  # only a notice makes it read again within this test
    elsewhere = _second_process(elsewhere_db)
    notices_here = ChangeNotices(here_db, "here", here.changed_elsewhere)
    notices_elsewhere = ChangeNotices(elsewhere_db, "elsewhere", elsewhere.changed_elsewhere)
    elsewhere.broadcast = notices_elsewhere.publish
    notices_elsewhere.others_alive = True
    notices_here.start()
    notices_elsewhere.start()
    try:
        started = here.start_negotiation(
            "researcher:t", PEER, "http://127.0.0.1:8", {**OFFER, "target": "urn:d:1"}
        )
        found: list[Any] = []
        waiter = threading.Thread(
            target=lambda: found.append(here.wait_negotiation(started.id, {NegotiationState.FINALIZED}, 30.0))
        )
        waiter.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        ended = ContractNegotiationTerminationMessage(provider_pid="urn:p:1", consumer_pid=started.id)
        elsewhere.on_negotiation_message(PEER, started.id, ended)
        waiter.join(30)
        assert [f.state for f in found] == ["TERMINATED"]
        assert time.monotonic() - t0 < 5  # a notice, not the 60 s poll nor the 30 s timeout
    finally:
        notices_here.stop()
        notices_elsewhere.stop()
        here_db.dispose()
        elsewhere_db.dispose()
