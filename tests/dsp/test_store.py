"""The DSP store's contract (see `healthspace.connector.dsp.store`), on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, select

from healthspace.connector.dsp.store import DspStore, Outgoing
from healthspace.connector.dsp.tables import DatasetRow, NegotiationRow, OutboxRow, TransferRow
from healthspace.core.db import Database
from healthspace.core.errors import ConflictError, InvalidTransitionError, NotFoundError
from healthspace.protocol.states import NegotiationState, TransferState
from tests.support.db import in_transaction_after_each, waits_for_wal_flush_after_each

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def store(make_db: Callable[..., Database]) -> DspStore:
    return DspStore(make_db("dsp"))


def _negotiation(pid: str = "urn:n:1", state: str = "REQUESTED", cpid: str = "urn:c:1") -> NegotiationRow:
    return NegotiationRow(
        id=pid,
        role="provider",
        provider_pid=pid,
        consumer_pid=cpid,
        state=state,
        counterparty_id="hk-university",
        counterparty_address="http://127.0.0.1:1",
        dataset_id="urn:dataset:1",
        offer={"@id": "urn:offer:1"},
        agreement_id=None,
        auto=True,
        pending=None,
        terminal_reason=None,
        created_at=T0,
        updated_at=T0,
    )


def _transfer(pid: str = "urn:t:1", state: str = "REQUESTED") -> TransferRow:
    return TransferRow(
        id=pid,
        role="provider",
        provider_pid=pid,
        consumer_pid="urn:c:t1",
        state=state,
        counterparty_id="hk-university",
        counterparty_address="http://127.0.0.1:1",
        agreement_id="urn:agreement:1",
        format="HttpData-PULL",
        data_address=None,
        auto=True,
        pending=None,
        terminal_reason=None,
        created_at=T0,
        updated_at=T0,
    )


def test_a_negotiation_cannot_begin_agreed(store: DspStore) -> None:
    with pytest.raises(InvalidTransitionError), store.db.session() as s:
        store.create_negotiation(s, _negotiation(state="AGREED"))


def test_a_transfer_cannot_begin_started(store: DspStore) -> None:
    with pytest.raises(InvalidTransitionError), store.db.session() as s:
        store.create_transfer(s, _transfer(state="STARTED"))


def test_a_second_process_with_the_same_peer_and_consumer_pid_is_a_conflict(store: DspStore) -> None:
    with store.db.session() as s:
        store.create_negotiation(s, _negotiation("urn:n:1"))
    with pytest.raises(ConflictError), store.db.session() as s:
        store.create_negotiation(s, _negotiation("urn:n:2"))


def test_a_move_the_machine_forbids_fails_and_leaves_the_row_unchanged(store: DspStore) -> None:
    with store.db.session() as s:
        store.create_negotiation(s, _negotiation())
    with pytest.raises(InvalidTransitionError), store.db.session() as s:
        store.move_negotiation(store.negotiation(s, "urn:n:1"), NegotiationState.FINALIZED, T0)
    with store.db.session() as s:
        assert store.negotiation(s, "urn:n:1").state == "REQUESTED"


def test_a_final_state_is_never_left(store: DspStore) -> None:
    with store.db.session() as s:
        store.create_transfer(s, _transfer())
        row = store.transfer(s, "urn:t:1")
        store.move_transfer(row, TransferState.TERMINATED, T0, "stopped")
    with pytest.raises(InvalidTransitionError), store.db.session() as s:
        store.move_transfer(store.transfer(s, "urn:t:1"), TransferState.STARTED, T0)


def test_a_terminal_move_keeps_its_reason(store: DspStore) -> None:
    with store.db.session() as s:
        store.create_negotiation(s, _negotiation())
        store.move_negotiation(store.negotiation(s, "urn:n:1"), NegotiationState.TERMINATED, T0, "no consent")
    with store.db.session() as s:
        row = store.negotiation(s, "urn:n:1")
        assert (row.state, row.terminal_reason) == ("TERMINATED", "no consent")


def test_reading_an_unknown_process_is_not_found(store: DspStore) -> None:
    with pytest.raises(NotFoundError), store.db.session() as s:
        store.negotiation(s, "urn:n:nope")


def test_timestamps_come_back_timezone_aware(store: DspStore) -> None:
    with store.db.session() as s:
        store.create_negotiation(s, _negotiation())
    with store.db.session() as s:
        assert store.negotiation(s, "urn:n:1").created_at == T0


def _enqueue(store: DspStore, process_id: str, n: int) -> None:
    with store.db.session() as s:
        for i in range(n):
            store.enqueue(
                s,
                process_id=process_id,
                kind="negotiation",
                peer_id="hk-university",
                url=f"http://127.0.0.1:1/{i}",
                message_type="X",
                body=b"{}",
                now=T0,
            )


def test_a_leased_message_is_not_claimed_again_until_its_lease_ends(store: DspStore) -> None:
    _enqueue(store, "urn:n:1", 1)
    first = store.claim_outbox(T0, timedelta(seconds=30))
    again = store.claim_outbox(T0 + timedelta(seconds=10), timedelta(seconds=30))
    after = store.claim_outbox(T0 + timedelta(seconds=31), timedelta(seconds=30))
    assert ([r.seq for r in first], again, [r.seq for r in after]) == ([first[0].seq], [], [first[0].seq])


def test_messages_of_one_process_are_handed_out_one_at_a_time_in_order(store: DspStore) -> None:
    _enqueue(store, "urn:n:1", 2)
    _enqueue(store, "urn:n:2", 1)
    first = store.claim_outbox(T0, timedelta(seconds=30))
    assert sorted((r.process_id, r.url) for r in first) == [
        ("urn:n:1", "http://127.0.0.1:1/0"),
        ("urn:n:2", "http://127.0.0.1:1/0"),
    ]
    store.settle_outbox(first[0].seq, sent=True, error=None, retry_at=None)
    store.settle_outbox(first[1].seq, sent=True, error=None, retry_at=None)
    second = store.claim_outbox(T0, timedelta(seconds=30))
    assert [(r.process_id, r.url) for r in second] == [("urn:n:1", "http://127.0.0.1:1/1")]


def test_a_message_given_up_on_is_never_claimed(store: DspStore) -> None:
    _enqueue(store, "urn:n:1", 1)
    (row,) = store.claim_outbox(T0, timedelta(seconds=30))
    store.settle_outbox(row.seq, sent=False, error="HTTP 400", retry_at=None)
    assert store.claim_outbox(T0 + timedelta(hours=1), timedelta(seconds=30)) == []


def test_claim_next_leases_the_oldest_due_message_of_one_process_once(store: DspStore) -> None:
    _enqueue(store, "urn:n:1", 2)
    _enqueue(store, "urn:n:2", 1)
    lease = timedelta(seconds=30)
    first = store.claim_next("urn:n:1", T0, lease)
    assert first is not None
    assert (first.url, first.attempts) == ("http://127.0.0.1:1/0", 1)
    assert store.claim_next("urn:n:1", T0, lease) is None  # leased, and the next waits for it
    store.settle_outbox(first.seq, sent=True, error=None, retry_at=None)
    second = store.claim_next("urn:n:1", T0, lease)
    assert second is not None
    assert second.url == "http://127.0.0.1:1/1"
    assert store.claim_next("urn:n:3", T0, lease) is None


def test_a_message_queued_leased_waits_its_turn_behind_an_earlier_pending_one(store: DspStore) -> None:
    until = T0 + timedelta(seconds=30)

    def leased(process_id: str, i: int) -> tuple[int, bool]:
        with store.db.session() as s:
            out = store.enqueue(
                s,
                process_id=process_id,
                kind="negotiation",
                peer_id="hk-university",
                url=f"http://127.0.0.1:1/{i}",
                message_type="X",
                body=b"{}",
                now=T0,
                lease_until=until,
            )
        with store.db.session() as s:
            row = s.get(OutboxRow, out.seq)
            assert row is not None
            assert (row.attempts, row.lease_until) == ((1, until) if out.attempts else (0, None))
        return out.attempts, row.lease_until is not None

    # Nothing of the process waits: leased at once. Its own lease keeps it pending, so the next
    # message of the same process is queued unleased; another process's is leased.
    assert leased("urn:n:1", 0) == (1, True)
    assert leased("urn:n:1", 1) == (0, False)
    assert leased("urn:n:2", 0) == (1, True)
    first = store.claim_next("urn:n:1", T0 + timedelta(seconds=31), timedelta(seconds=30))
    assert first is not None
    assert first.url == "http://127.0.0.1:1/0"  # after the lease ran out, the oldest goes first
    store.settle_outbox(first.seq, sent=True, error=None, retry_at=None)
    assert leased("urn:n:1", 2) == (0, False)  # /1 is still pending
    second = store.claim_next("urn:n:1", T0, timedelta(seconds=30))
    assert second is not None
    assert second.url == "http://127.0.0.1:1/1"


def test_claim_next_does_not_take_a_message_settled_while_it_waited(store: DspStore) -> None:
    """A worker that finds the oldest message locked by the worker settling it must not send it again."""
    _enqueue(store, "urn:n:1", 1)
    (row,) = store.claim_outbox(T0, timedelta(seconds=1))
    later = T0 + timedelta(seconds=5)  # the first lease has run out by then
    claimed: list[object] = []
    with store.writing() as s:
        if store.db.dialect == "postgresql":
            s.execute(select(OutboxRow).where(OutboxRow.seq == row.seq).with_for_update())
        waiter = threading.Thread(
            target=lambda: claimed.append(store.claim_next("urn:n:1", later, timedelta(seconds=30)))
        )
        waiter.start()
        time.sleep(0.3)  # the waiter is now blocked on the row lock (PostgreSQL) or the write lock
        settled = s.get(OutboxRow, row.seq)
        assert settled is not None
        settled.status, settled.lease_until = "sent", None
    waiter.join(10)
    assert claimed == [None]


def _dataset(did: str = "urn:dataset:1") -> DatasetRow:
    return DatasetRow(
        id=did,
        title="Cohort",
        description="",
        keywords=["diabetes"],
        metadata_json={},
        offer={"@id": "urn:offer:1", "permission": [{"action": "use"}]},
        approval="auto",
        created_at=T0,
    )


def test_a_committed_dataset_is_read_from_the_database_once(store: DspStore) -> None:
    with store.db.session() as s:
        store.put_dataset(s, _dataset())
    statements: list[str] = []
    listener = lambda *a: statements.append(a[2])  # noqa: E731 - (conn, cursor, statement, ...)
    event.listen(store.db.engine, "before_cursor_execute", listener)
    try:
        with store.db.session() as s:
            first = store.dataset(s, "urn:dataset:1")
            first.offer["permission"] = []  # a caller changing its copy
        with store.db.session() as s:
            second = store.dataset(s, "urn:dataset:1")
    finally:
        event.remove(store.db.engine, "before_cursor_execute", listener)
    assert len([q for q in statements if "dsp_datasets" in q]) == 1
    assert second.offer == {"@id": "urn:offer:1", "permission": [{"action": "use"}]}
    assert second is not first


def test_a_dataset_read_in_the_transaction_that_inserts_it_is_not_kept(store: DspStore) -> None:
    """That transaction may still roll back: then the dataset never existed."""

    def publish_then_fail() -> None:
        with store.db.session() as s:
            store.put_dataset(s, _dataset("urn:dataset:gone"))
            assert store.dataset(s, "urn:dataset:gone").id == "urn:dataset:gone"
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        publish_then_fail()
    with store.db.session() as s, pytest.raises(NotFoundError):
        store.dataset(s, "urn:dataset:gone")


def test_a_process_is_read_without_a_transaction_around_the_statement(store: DspStore) -> None:
    # Waiters read a process's state over and over: on PostgreSQL a transaction around that one
    # SELECT costs a BEGIN and a ROLLBACK round trip each time. The read must see no open transaction.
    with store.db.session() as s:
        store.create_negotiation(s, _negotiation())
    read: list[dict[str, object]] = []
    fetch = lambda: read.append(store.process_values("negotiation", "urn:n:1"))  # noqa: E731
    assert in_transaction_after_each(store.db, fetch) == [False]
    assert read[0]["state"] == "REQUESTED"


def test_the_outbox_s_one_statement_writes_commit_by_themselves(store: DspStore) -> None:
    # Leasing, settling and releasing a message are one statement each, made for every message: in a
    # transaction of their own they cost a BEGIN and a COMMIT round trip more on PostgreSQL.
    _enqueue(store, "urn:n:1", 2)
    lease = timedelta(seconds=30)
    claimed: list[Outgoing | None] = []
    claim = lambda: claimed.append(store.claim_next("urn:n:1", T0, lease))  # noqa: E731
    assert in_transaction_after_each(store.db, claim) == [False]
    first = claimed[0]
    assert first is not None
    assert first.attempts == 1
    seq = first.seq
    assert in_transaction_after_each(store.db, lambda: store.release_lease(seq)) == [False]
    assert store.claim_next("urn:n:1", T0, lease) is not None  # released, so claimable again
    settle = lambda: store.settle_outbox(seq, sent=True, error=None, retry_at=None)  # noqa: E731
    assert in_transaction_after_each(store.db, settle) == [False]
    with store.db.session() as s:  # committed, and seen by another connection
        assert s.get(OutboxRow, seq).status == "sent"  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):
        store.settle_outbox(10_000, sent=True, error=None, retry_at=None)


def test_an_acknowledgement_is_settled_in_two_statements_that_each_commit(store: DspStore) -> None:
    # The process's pids from the ACK, then the message marked sent: both idempotent, so no
    # transaction is needed around them (a crash between leaves the message leased: it is delivered
    # again and settled again); on PostgreSQL that spares a BEGIN and a COMMIT round trip.
    ours = _negotiation("urn:c:9", cpid="urn:c:9")
    ours.role, ours.provider_pid = "consumer", None
    with store.db.session() as s:
        store.create_negotiation(s, ours)
    _enqueue(store, "urn:c:9", 1)
    claimed = store.claim_next("urn:c:9", T0, timedelta(seconds=30))
    assert claimed is not None
    states: list[str] = []
    settle = lambda: states.append(  # noqa: E731
        store.settle_delivered(claimed.seq, "negotiation", "urn:c:9", "urn:p:9", "urn:c:9")
    )
    assert in_transaction_after_each(store.db, settle) == [False, False]
    assert states == ["REQUESTED"]
    with store.db.session() as s:
        assert store.negotiation(s, "urn:c:9").provider_pid == "urn:p:9"
        assert s.get(OutboxRow, claimed.seq).status == "sent"  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):  # an unknown message: the pids stand, nothing else changes
        store.settle_delivered(10_000, "negotiation", "urn:c:9", "urn:p:other", "urn:c:9")
    with pytest.raises(NotFoundError):
        store.settle_delivered(claimed.seq, "negotiation", "urn:c:unknown", "urn:p:9", "urn:c:9")
    with store.db.session() as s:
        assert store.negotiation(s, "urn:c:9").provider_pid == "urn:p:9"  # a known pid is kept


def test_outbox_bookkeeping_does_not_wait_for_the_wal_flush_on_postgresql(store: DspStore) -> None:
    # A lease, a settlement or a released lease lost with a crash of PostgreSQL itself is recovered
    # from (the message is sent again and a repeat is recognised), so those commits do not wait for
    # the disk; what the handlers commit does (docs/dsp.md, session 7).
    with store.db.writing() as s:
        store.create_negotiation(s, _negotiation())
    _enqueue(store, "urn:n:1", 1)
    postgres = store.db.dialect == "postgresql"
    lease = timedelta(seconds=30)
    taken: list[Outgoing | None] = []
    claim = lambda: taken.append(store.claim_next("urn:n:1", T0, lease))  # noqa: E731
    assert waits_for_wal_flush_after_each(store.db, claim) == [not postgres]
    seq = taken[0].seq if taken[0] is not None else -1
    release = lambda: store.release_lease(seq)  # noqa: E731
    assert waits_for_wal_flush_after_each(store.db, release) == [not postgres]
    settle = lambda: store.settle_delivered(seq, "negotiation", "urn:n:1", "urn:p:1", None)  # noqa: E731
    assert waits_for_wal_flush_after_each(store.db, settle) == [not postgres] * 2
    with store.db.writing() as s:  # a handler's transaction waits, whatever the backend
        assert waits_for_wal_flush_after_each(store.db, lambda: store.fetch(s, NegotiationRow, "urn:n:1"))
