"""Replay guards: one contract, run on memory, SQLite and PostgreSQL, including concurrent presentation."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from healthspace.core.db import Database
from healthspace.identity.errors import Reason, TokenRejectedError
from healthspace.identity.replay import MemoryReplayGuard, ReplayGuard, SqlReplayGuard
from healthspace.identity.tables import SeenTokenRow
from healthspace.identity.tokens import TokenUse, mint_request_token
from tests.support.db import in_transaction_after_each

from .kit import HOSPITAL_ID, START, UNIVERSITY_ID, Space

THREADS = 8
NOW = START
LATER = START + timedelta(seconds=90)


@pytest.fixture
def db(make_db: Callable[..., Database]) -> Database:
    return make_db("identity")


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def guard(request: pytest.FixtureRequest) -> Iterator[ReplayGuard]:
    """Each guard in turn: in memory, and the SQL one on SQLite and on PostgreSQL."""
    if request.param == "memory":
        yield MemoryReplayGuard()
        return
    db = Database(
        request.getfixturevalue(f"{request.param}_url".replace("postgresql", "postgres")),
        branches=["identity"],
    )
    try:
        yield SqlReplayGuard(db)
    finally:
        db.dispose()


def test_first_presentation_passes(guard: ReplayGuard) -> None:
    assert guard.first_use(HOSPITAL_ID, "t1", LATER, NOW)


def test_second_presentation_is_a_replay(guard: ReplayGuard) -> None:
    guard.first_use(HOSPITAL_ID, "t1", LATER, NOW)
    assert not guard.first_use(HOSPITAL_ID, "t1", LATER, NOW + timedelta(seconds=10))


def test_same_token_id_from_another_issuer_is_not_a_replay(guard: ReplayGuard) -> None:
    guard.first_use(HOSPITAL_ID, "t1", LATER, NOW)
    assert guard.first_use(UNIVERSITY_ID, "t1", LATER, NOW)


def test_concurrent_presentations_let_exactly_one_through(guard: ReplayGuard) -> None:
    barrier = threading.Barrier(THREADS)
    results: list[bool] = []
    lock = threading.Lock()

    def present() -> None:
        barrier.wait()
        outcome = guard.first_use(HOSPITAL_ID, "race", LATER, NOW)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=present) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [False] * (THREADS - 1) + [True]


def test_sql_guard_prunes_expired_entries(db: Database) -> None:
    guard = SqlReplayGuard(db, prune_interval=timedelta(seconds=60))
    guard.first_use(HOSPITAL_ID, "old", NOW + timedelta(seconds=60), NOW)
    guard.first_use(HOSPITAL_ID, "new", NOW + timedelta(seconds=600), NOW)
    guard.first_use(HOSPITAL_ID, "trigger", NOW + timedelta(seconds=900), NOW + timedelta(seconds=120))
    with db.session() as s:
        ids = set(s.scalars(select(SeenTokenRow.token_id)))
    assert ids == {"new", "trigger"}


def test_sql_guard_does_not_prune_between_intervals(db: Database) -> None:
    guard = SqlReplayGuard(db, prune_interval=timedelta(seconds=600))
    guard.first_use(HOSPITAL_ID, "old", NOW + timedelta(seconds=60), NOW)
    guard.first_use(HOSPITAL_ID, "next", NOW + timedelta(seconds=900), NOW + timedelta(seconds=120))
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(SeenTokenRow)) == 2


def test_memory_guard_forgets_expired_entries() -> None:
    guard = MemoryReplayGuard(prune_interval=timedelta(seconds=30))
    for i in range(10):
        guard.first_use(HOSPITAL_ID, f"t{i}", NOW + timedelta(seconds=60), NOW)
    guard.first_use(HOSPITAL_ID, "late", NOW + timedelta(seconds=200), NOW + timedelta(seconds=61))
    assert len(guard) == 1


def test_concurrent_replay_of_one_token_through_the_verifier(space: Space, db: Database) -> None:
    verifier = space.verifier(replay=SqlReplayGuard(db))
    header = "Bearer " + mint_request_token(
        space.hospital, space.credentials[HOSPITAL_ID], HOSPITAL_ID, UNIVERSITY_ID, space.clock.now()
    )
    barrier = threading.Barrier(THREADS)
    outcomes: list[str] = []
    lock = threading.Lock()

    def present() -> None:
        barrier.wait()
        try:
            verifier.verify(header)
            outcome = "accepted"
        except Exception as exc:
            outcome = str(getattr(exc, "extra", {}).get("reason", repr(exc)))
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=present) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["accepted"] + [Reason.REPLAYED.value] * (THREADS - 1)


def test_prune_reports_how_many_entries_it_deleted(db: Database) -> None:
    guard = SqlReplayGuard(db, prune_interval=timedelta(days=1))
    for i in range(3):
        guard.first_use(HOSPITAL_ID, f"t{i}", NOW + timedelta(seconds=10 * (i + 1)), NOW)
    assert guard.prune(NOW + timedelta(seconds=25)) == 2


# --- the replay check left to the caller's transaction (`RequestVerifier.verify_deferring_replay`) ----


def _header(space: Space) -> str:
    return "Bearer " + mint_request_token(
        space.hospital, space.credentials[HOSPITAL_ID], HOSPITAL_ID, UNIVERSITY_ID, space.clock.now()
    )


def _record_then_fail(db: Database, use: TokenUse) -> None:
    """A handler's transaction that records the token's use, then fails (and rolls back)."""
    with db.writing_core() as conn:
        use.record_in(conn)
        raise RuntimeError("the handler failed")


def _seen(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(SeenTokenRow)) or 0)


def test_a_use_recorded_in_a_committed_transaction_is_spent(space: Space, db: Database) -> None:
    verifier = space.verifier(replay=SqlReplayGuard(db))
    header = _header(space)
    caller, use = verifier.verify_deferring_replay(header, db)
    assert use is not None
    assert caller.participant_id == HOSPITAL_ID
    with db.writing_core() as conn:
        use.record_in(conn)
    use.committed()
    use.settle()  # nothing left to record
    assert _seen(db) == 1
    with pytest.raises(TokenRejectedError) as replay:
        verifier.verify(header)
    assert replay.value.extra["reason"] == Reason.REPLAYED.value


def test_a_use_recorded_in_a_transaction_that_rolled_back_is_kept_by_settle(
    space: Space, db: Database
) -> None:
    verifier = space.verifier(replay=SqlReplayGuard(db))
    header = _header(space)
    _, use = verifier.verify_deferring_replay(header, db)
    assert use is not None
    with pytest.raises(RuntimeError):
        _record_then_fail(db, use)
    assert _seen(db) == 0  # rolled back with the handler's work ...
    use.settle()
    assert _seen(db) == 1  # ... and recorded on its own
    with pytest.raises(TokenRejectedError):
        verifier.verify(header)


def test_a_use_never_recorded_in_a_transaction_is_recorded_by_settle(space: Space, db: Database) -> None:
    verifier = space.verifier(replay=SqlReplayGuard(db))
    header = _header(space)
    _, use = verifier.verify_deferring_replay(header, db)
    assert use is not None
    use.settle()  # e.g. the message was refused before any transaction
    with pytest.raises(TokenRejectedError):
        verifier.verify(header)


def test_a_deferred_token_already_used_is_refused_in_the_transaction(space: Space, db: Database) -> None:
    verifier = space.verifier(replay=SqlReplayGuard(db))
    header = _header(space)
    verifier.verify(header)
    _, use = verifier.verify_deferring_replay(header, db)  # the check is the transaction's
    assert use is not None
    with pytest.raises(TokenRejectedError) as replay, db.writing_core() as conn:
        use.record_in(conn)
    assert replay.value.extra["reason"] == Reason.REPLAYED.value
    use.settle()  # a refused token owes nothing more
    assert _seen(db) == 1


def test_settle_refuses_a_token_a_concurrent_presentation_used_meanwhile(space: Space, db: Database) -> None:
    verifier = space.verifier(replay=SqlReplayGuard(db))
    header = _header(space)
    _, use = verifier.verify_deferring_replay(header, db)
    assert use is not None
    with pytest.raises(RuntimeError):
        _record_then_fail(db, use)
    verifier.verify(header)  # the twin got in after the rollback
    with pytest.raises(TokenRejectedError) as replay:
        use.settle()
    assert replay.value.extra["reason"] == Reason.REPLAYED.value


@pytest.mark.parametrize("where", ["memory", "another database"])
def test_without_a_sql_guard_on_that_database_the_check_is_made_at_once(
    space: Space, db: Database, sqlite_url: str, where: str
) -> None:
    other = Database(sqlite_url, branches=["identity"]) if where == "another database" else None
    try:
        guard = MemoryReplayGuard() if other is None else SqlReplayGuard(other)
        verifier = space.verifier(replay=guard)
        header = _header(space)
        caller, use = verifier.verify_deferring_replay(header, db)
        assert (caller.participant_id, use) == (HOSPITAL_ID, None)
        with pytest.raises(TokenRejectedError):
            verifier.verify_deferring_replay(header, db)
    finally:
        if other is not None:
            other.dispose()


def test_sql_guard_records_a_use_in_one_statement_outside_a_transaction(db: Database) -> None:
    # Every peer request whose handler does not take the check into its own transaction spends its
    # token here: one INSERT that commits by itself (no BEGIN and COMMIT round trips on PostgreSQL).
    guard = SqlReplayGuard(db)
    guard.prune_if_due(NOW)  # pruning is a statement of its own, once per interval
    outcomes: list[bool] = []

    def twice() -> None:
        outcomes.append(guard.first_use(HOSPITAL_ID, "one", LATER, NOW))
        outcomes.append(guard.first_use(HOSPITAL_ID, "one", LATER, NOW))

    assert in_transaction_after_each(db, twice) == [False, False]
    assert outcomes == [True, False]
