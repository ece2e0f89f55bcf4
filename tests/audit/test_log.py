"""The audit log store on SQLite and PostgreSQL: appends, heads, proofs, restart, and tampering by SQL."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from healthspace.audit import log as log_module
from healthspace.audit import merkle
from healthspace.audit.log import AuditIntegrityError, AuditLog
from healthspace.audit.models import AuditEntry, Outcome, SignedTreeHead
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from healthspace.core.errors import ValidationError
from tests.audit.conftest import T0, KeySigner, make_entry


def _expected_root(entries: list[AuditEntry]) -> bytes:
    """The root computed independently of the log: RFC 6962 over the entries' canonical bytes."""
    return merkle.tree_root([merkle.leaf_hash(e.canonical_bytes()) for e in entries])


def _sql(db: Database, sql: str, **params: Any) -> list[Any]:
    with db.engine.begin() as conn:
        result = conn.execute(text(sql), params)
        return list(result) if result.returns_rows else []


def _filled(log: AuditLog, n: int) -> tuple[list[AuditEntry], SignedTreeHead]:
    entries = [make_entry(i) for i in range(n)]
    log.append_many(entries)
    return entries, log.tree_head()


def test_appends_get_consecutive_indexes_and_read_back_unchanged(log: AuditLog) -> None:
    entries = [make_entry(i) for i in range(5)]
    receipts = [log.append(e) for e in entries[:2]] + log.append_many(entries[2:])
    assert [r.index for r in receipts] == [0, 1, 2, 3, 4]
    assert [r.leaf_hash for r in receipts] == [merkle.leaf_hash(e.canonical_bytes()).hex() for e in entries]
    assert [x.entry for x in log.entries(0, 10)] == entries


def test_record_stamps_the_entry_with_the_log_clock(log: AuditLog) -> None:
    log.record("steward:1", "dataset.publish", "dataset:7", Outcome.SUCCESS, "published")
    assert log.entries(0, 1)[0].entry.time == T0


def test_tree_head_signs_the_root_of_all_entries(log: AuditLog, signer: KeySigner) -> None:
    entries, head = _filled(log, 10)
    assert head.tree_size == 10
    assert head.root == _expected_root(entries)
    assert head.verify(signer.public_key_b64)


def test_tree_head_is_not_signed_again_while_the_tree_is_unchanged(log: AuditLog, clock: FixedClock) -> None:
    _, head = _filled(log, 3)
    clock.advance(__import__("datetime").timedelta(minutes=5))
    assert log.tree_head() == head
    assert len(log.tree_heads()) == 1


def test_inclusion_proofs_verify_against_signed_heads_across_cached_subtrees(log: AuditLog) -> None:
    entries, head = _filled(log, 700)
    for index in (0, 255, 256, 511, 600, 699):
        p = log.inclusion_proof(index)
        leaf = merkle.leaf_hash(entries[index].canonical_bytes())
        assert p.leaf_hash == leaf.hex()
        assert merkle.verify_inclusion(
            leaf, index, head.tree_size, [bytes.fromhex(h) for h in p.path], head.root
        )


def test_inclusion_proof_in_an_older_tree_verifies_against_the_older_head(log: AuditLog) -> None:
    entries, old = _filled(log, 300)
    log.append_many([make_entry(i) for i in range(300, 650)])
    p = log.inclusion_proof(299, tree_size=300)
    leaf = merkle.leaf_hash(entries[299].canonical_bytes())
    assert merkle.verify_inclusion(leaf, 299, 300, [bytes.fromhex(h) for h in p.path], old.root)


def test_consistency_proofs_link_every_pair_of_heads(log: AuditLog) -> None:
    heads = []
    for n in (1, 5, 256, 300, 700):
        log.append_many([make_entry(i) for i in range(log.size, n)])
        heads.append(log.tree_head())
    for a in heads:
        for b in heads:
            if a.tree_size <= b.tree_size:
                p = log.consistency_proof(a.tree_size, b.tree_size)
                path = [bytes.fromhex(h) for h in p.path]
                assert merkle.verify_consistency(a.tree_size, b.tree_size, a.root, b.root, path)


def test_proofs_refuse_sizes_beyond_the_log(log: AuditLog) -> None:
    _filled(log, 4)
    with pytest.raises(ValidationError):
        log.inclusion_proof(4)
    with pytest.raises(ValidationError):
        log.inclusion_proof(0, tree_size=5)
    with pytest.raises(ValidationError):
        log.consistency_proof(0, 4)
    with pytest.raises(ValidationError):
        log.consistency_proof(2, 5)


def test_an_untouched_log_verifies(log: AuditLog) -> None:
    _filled(log, 300)
    log.append_many([make_entry(i) for i in range(300, 310)])
    report = log.verify()
    assert report.ok, report.reason
    assert (report.entries, report.heads, report.unsigned_entries) == (310, 1, 10)


def test_reopening_rebuilds_the_tree_and_appends_continue_consistently(
    db: Database, signer: KeySigner, clock: FixedClock
) -> None:
    first = AuditLog(db, signer, clock)
    entries, old_head = _filled(first, 270)
    first.close()
    second = AuditLog(db, signer, clock)
    try:
        assert second.size == 270
        more = [make_entry(i) for i in range(270, 300)]
        assert second.append_many(more)[0].index == 270
        head = second.tree_head()
        assert head.root == _expected_root(entries + more)
        p = second.consistency_proof(old_head.tree_size, head.tree_size)
        assert merkle.verify_consistency(
            270, 300, old_head.root, head.root, [bytes.fromhex(h) for h in p.path]
        )
        assert second.verify().ok
    finally:
        second.close()


def test_concurrent_appends_produce_a_gap_free_sequence(log: AuditLog) -> None:
    receipts: list[int] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(40):
            r = log.append(make_entry(t * 1000 + i))
            with lock:
                receipts.append(r.index)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(receipts) == list(range(320))
    assert log.verify().ok


# --- several writers on one database (several processes of one service) -------------------------------


def _stored_entries(db: Database) -> list[AuditEntry]:
    rows = _sql(db, "SELECT data FROM audit_entries ORDER BY seq")
    return [AuditEntry.from_bytes(r[0].encode()) for r in rows]


def test_two_logs_on_one_database_append_concurrently_without_gaps_or_clashes(
    db: Database, signer: KeySigner, clock: FixedClock
) -> None:
    logs = [AuditLog(db, signer, clock), AuditLog(db, signer, clock)]
    try:
        receipts: list[int] = []
        lock = threading.Lock()

        def work(t: int) -> None:
            for i in range(30):
                batch = [make_entry(t * 1000 + i * 2), make_entry(t * 1000 + i * 2 + 1)]
                got = logs[t % 2].append_many(batch)
                assert got[1].index == got[0].index + 1  # a batch stays one contiguous run
                with lock:
                    receipts.extend(r.index for r in got)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(receipts) == list(range(360))
        # Each log reads back the other's entries before it signs: one head, over what is stored.
        head = logs[0].tree_head()
        assert (head.tree_size, head.root) == (360, _expected_root(_stored_entries(db)))
        assert logs[1].tree_head() == head  # the same size: the stored head, not a second one
        assert logs[0].verify().ok
        assert logs[1].verify().ok
    finally:
        for log in logs:
            log.close()


def test_a_log_proves_entries_another_log_appended(
    db: Database, signer: KeySigner, clock: FixedClock
) -> None:
    a, b = AuditLog(db, signer, clock), AuditLog(db, signer, clock)
    try:
        a.append_many([make_entry(i) for i in range(3)])
        first = a.tree_head()
        b.append_many([make_entry(i) for i in range(3, 300)])  # past a cached 256-leaf subtree
        assert a.size == 3  # not yet read back
        proof = a.inclusion_proof(299)
        assert a.size == 300
        head = b.tree_head()
        leaf = merkle.leaf_hash(make_entry(299).canonical_bytes())
        assert merkle.verify_inclusion(leaf, 299, 300, [bytes.fromhex(h) for h in proof.path], head.root)
        later = a.consistency_proof(first.tree_size)
        assert merkle.verify_consistency(
            3, 300, first.root, head.root, [bytes.fromhex(h) for h in later.path]
        )
        assert [e.entry for e in a.entries(297, 300)] == [make_entry(i) for i in range(297, 300)]
    finally:
        a.close()
        b.close()


def _entry_reads(db: Database, run: Callable[[], object]) -> int:
    """How many statements `run` sends to `db` that read the audit entries."""
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        reads = statement.lstrip().upper().startswith("SELECT") and "audit_entries" in statement
        if reads and conn.engine.url == db.engine.url:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", note)
    try:
        run()
    finally:
        event.remove(Engine, "before_cursor_execute", note)
    return len(seen)


def test_writers_taking_turns_do_not_read_each_other_back_until_a_head_is_signed(
    db: Database, signer: KeySigner, clock: FixedClock
) -> None:
    a, b = AuditLog(db, signer, clock), AuditLog(db, signer, clock)
    try:

        def take_turns() -> None:
            for i in range(0, 60, 2):
                a.append(make_entry(i))
                b.append(make_entry(i + 1))

        assert _entry_reads(db, take_turns) == 0
        heads: list[SignedTreeHead] = []
        assert _entry_reads(db, lambda: heads.append(a.tree_head())) == 1  # one read-back, then signed
        expected = _expected_root(_stored_entries(db))
        assert (heads[0].tree_size, heads[0].root) == (60, expected)
        assert b.tree_head() == heads[0]
        assert a.verify().ok
    finally:
        a.close()
        b.close()


def test_a_writer_reads_back_once_it_holds_too_many_leaves_past_a_gap(
    db: Database, signer: KeySigner, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_module, "_MAX_AHEAD", 4)
    a, b = AuditLog(db, signer, clock), AuditLog(db, signer, clock)
    try:
        b.append(make_entry(0))  # a gap in a's tree
        assert _entry_reads(db, lambda: [a.append(make_entry(i)) for i in range(1, 5)]) == 0
        assert a.size == 0
        assert _entry_reads(db, lambda: a.append(make_entry(5))) == 1  # the fifth waiting leaf
        assert a.size == 6
        head = a.tree_head()
        assert (head.tree_size, head.root) == (6, _expected_root(_stored_entries(db)))
    finally:
        a.close()
        b.close()


def test_heads_signed_by_two_logs_never_go_back_in_time(db: Database, signer: KeySigner) -> None:
    late, early = FixedClock(T0 + timedelta(hours=1)), FixedClock(T0)
    a, b = AuditLog(db, signer, late), AuditLog(db, signer, early)
    try:
        a.append(make_entry(0))
        first = a.tree_head()
        b.append(make_entry(1))
        second = b.tree_head()  # b's clock is behind: its head takes the newest head's time
        assert second.timestamp == first.timestamp
        assert b.verify().ok
    finally:
        a.close()
        b.close()


def _append_in_a_process(url: str, start: int, count: int) -> None:
    db = Database(url)
    log = AuditLog(db, KeySigner("other-process"))
    try:
        for i in range(start, start + count):
            log.append(make_entry(i))
    finally:
        log.close()
        db.dispose()


def test_two_processes_appending_to_one_database_leave_one_verifiable_log(
    db: Database, signer: KeySigner, clock: FixedClock
) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_in_a_process, args=(db.url, 1000 * k, 40)) for k in (1, 2)]
    log = AuditLog(db, signer, clock)
    try:
        for p in procs:
            p.start()
        for i in range(40):
            log.append(make_entry(i))
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        head = log.tree_head()
        stored = _stored_entries(db)
        assert head.tree_size == len(stored) == 120
        assert sorted(e.details["n"] for e in stored) == sorted(
            [*range(40), *range(1000, 1040), *range(2000, 2040)]
        )
        assert head.root == _expected_root(stored)
        assert log.verify().ok
    finally:
        log.close()


# --- tampering, done directly with SQL ------------------------------------------------------------------


def test_editing_a_field_of_an_entry_is_detected_at_that_index(log: AuditLog, db: Database) -> None:
    _filled(log, 20)
    (data,) = _sql(db, "SELECT data FROM audit_entries WHERE seq = 7")[0]
    _sql(db, "UPDATE audit_entries SET data = :d WHERE seq = 7", d=data.replace("steward-1", "steward-2"))
    report = log.verify()
    assert not report.ok
    assert report.first_bad_index == 7


def test_editing_an_entry_and_its_leaf_hash_is_caught_by_the_signed_root(log: AuditLog, db: Database) -> None:
    _filled(log, 20)
    (data,) = _sql(db, "SELECT data FROM audit_entries WHERE seq = 7")[0]
    forged = data.replace('"allowed"', '"denied"')
    assert forged != data
    _sql(
        db,
        "UPDATE audit_entries SET data = :d, leaf_hash = :h WHERE seq = 7",
        d=forged,
        h=merkle.leaf_hash(forged.encode()),
    )
    report = log.verify()
    assert not report.ok
    assert "do not match the root signed" in (report.reason or "")


def test_deleting_an_entry_in_the_middle_is_detected(log: AuditLog, db: Database) -> None:
    _filled(log, 20)
    _sql(db, "DELETE FROM audit_entries WHERE seq = 12")
    report = log.verify()
    assert (report.ok, report.first_bad_index) == (False, 12)


def test_deleting_the_last_entry_is_detected(log: AuditLog, db: Database) -> None:
    _filled(log, 20)
    _sql(db, "DELETE FROM audit_entries WHERE seq = 19")
    report = log.verify()
    assert (report.ok, report.first_bad_index) == (False, 19)


def test_deleting_the_last_unsigned_entry_is_detected_by_the_running_log(log: AuditLog, db: Database) -> None:
    _filled(log, 20)
    log.append(make_entry(20))
    _sql(db, "DELETE FROM audit_entries WHERE seq = 20")
    report = log.verify()
    assert (report.ok, report.first_bad_index) == (False, 20)


def test_swapping_two_entries_contents_is_detected(log: AuditLog, db: Database) -> None:
    _filled(log, 20)
    rows = dict(_sql(db, "SELECT seq, data FROM audit_entries WHERE seq IN (3, 9)"))
    _sql(db, "UPDATE audit_entries SET data = :d WHERE seq = 3", d=rows[9])
    _sql(db, "UPDATE audit_entries SET data = :d WHERE seq = 9", d=rows[3])
    report = log.verify()
    assert (report.ok, report.first_bad_index) == (False, 3)


def test_swapping_two_whole_rows_including_leaf_hashes_is_caught_by_the_signed_root(
    log: AuditLog, db: Database
) -> None:
    _filled(log, 20)
    rows = {
        s: (d, h)
        for s, d, h in _sql(db, "SELECT seq, data, leaf_hash FROM audit_entries WHERE seq IN (3, 9)")
    }
    for seq, other in ((3, 9), (9, 3)):
        _sql(
            db,
            "UPDATE audit_entries SET data = :d, leaf_hash = :h WHERE seq = :s",
            d=rows[other][0],
            h=rows[other][1],
            s=seq,
        )
    report = log.verify()
    assert not report.ok
    assert "do not match the root signed" in (report.reason or "")


def test_inserting_a_forged_entry_in_the_middle_is_detected(log: AuditLog, db: Database) -> None:
    _filled(log, 20)
    for seq in range(19, 9, -1):
        _sql(db, "UPDATE audit_entries SET seq = :n WHERE seq = :s", n=seq + 1, s=seq)
    forged = make_entry(99).canonical_bytes()
    _sql(
        db,
        "INSERT INTO audit_entries (seq, data, leaf_hash) VALUES (10, :d, :h)",
        d=forged.decode(),
        h=merkle.leaf_hash(forged),
    )
    report = log.verify()
    assert not report.ok
    assert "do not match the root signed" in (report.reason or "")


def _forge(db: Database, seq: int) -> None:
    """A well-formed entry written at `seq` by SQL, not by the log."""
    forged = make_entry(99).canonical_bytes()
    _sql(
        db,
        "INSERT INTO audit_entries (seq, data, leaf_hash) VALUES (:s, :d, :h)",
        s=seq,
        d=forged.decode(),
        h=merkle.leaf_hash(forged),
    )


def test_a_forged_entry_after_the_end_is_detected_and_blocks_appends(log: AuditLog, db: Database) -> None:
    _filled(log, 20)
    _forge(db, 20)
    report = log.verify()
    assert (report.ok, report.first_bad_index) == (False, 20)
    with pytest.raises(AuditIntegrityError, match="never appended by this log"):
        log.append(make_entry(20))


def test_editing_a_stored_signed_head_is_detected(log: AuditLog, db: Database) -> None:
    _filled(log, 20)
    _sql(
        db, "UPDATE audit_tree_heads SET timestamp = :t WHERE tree_size = 20", t="2030-01-01T00:00:00.000000Z"
    )
    report = log.verify()
    assert not report.ok
    assert "signature" in (report.reason or "")


def test_a_head_whose_root_was_replaced_is_detected(log: AuditLog, db: Database) -> None:
    _filled(log, 20)
    _sql(db, "UPDATE audit_tree_heads SET root_hash = :r WHERE tree_size = 20", r="00" * 32)
    assert not log.verify().ok


def test_editing_only_a_stored_leaf_hash_is_reported_at_that_index(log: AuditLog, db: Database) -> None:
    # The cache is never trusted: verification recomputes, so the edit is harmless to the proofs of the
    # content, and it is still reported because the database was changed behind the log's back.
    _filled(log, 20)
    _sql(db, "UPDATE audit_entries SET leaf_hash = :h WHERE seq = 5", h=b"\x00" * 32)
    report = log.verify()
    assert (report.ok, report.first_bad_index) == (False, 5)


def test_reopening_a_tampered_log_refuses_to_start(
    db: Database, signer: KeySigner, clock: FixedClock
) -> None:
    first = AuditLog(db, signer, clock)
    _filled(first, 20)
    first.close()
    _sql(db, "DELETE FROM audit_entries WHERE seq = 4")
    with pytest.raises(AuditIntegrityError, match="index 4"):
        AuditLog(db, signer, clock)


# Before the counter, an unsigned tail forged or deleted while the log was closed went unseen until a
# head covered it (a limit ADR 0003 stated).
@pytest.mark.parametrize(
    ("tamper", "reported"),
    [
        (lambda db: _forge(db, 5), "never numbered by the log's counter"),
        (lambda db: _sql(db, "DELETE FROM audit_entries WHERE seq = 4"), "entries from 4 on were deleted"),
    ],
    ids=["forged", "deleted"],
)
def test_an_unsigned_tail_tampered_with_while_the_log_was_closed_is_refused_at_open(
    db: Database, signer: KeySigner, clock: FixedClock, tamper: Callable[[Database], object], reported: str
) -> None:
    first = AuditLog(db, signer, clock)
    first.append_many([make_entry(i) for i in range(5)])
    first.close()
    tamper(db)
    with pytest.raises(AuditIntegrityError, match=reported):
        AuditLog(db, signer, clock)


def test_a_counter_set_back_makes_the_next_append_fail_and_append_nothing(
    log: AuditLog, db: Database
) -> None:
    _filled(log, 6)
    _sql(db, "UPDATE audit_counter SET next_seq = 3")
    with pytest.raises(AuditIntegrityError, match="forged row"):
        log.append(make_entry(6))
    assert _count(db) == 6


def test_a_deleted_counter_row_refuses_appends_heads_and_opening(
    log: AuditLog, db: Database, signer: KeySigner, clock: FixedClock
) -> None:
    _filled(log, 4)
    _sql(db, "DELETE FROM audit_counter")
    for attempt in (lambda: log.append(make_entry(4)), log.tree_head, lambda: AuditLog(db, signer, clock)):
        with pytest.raises(AuditIntegrityError, match="counter row is missing"):
            attempt()
    assert _count(db) == 4


def test_reopening_with_a_different_key_needs_the_old_key_as_trusted(
    db: Database, signer: KeySigner, clock: FixedClock
) -> None:
    first = AuditLog(db, signer, clock)
    _filled(first, 5)
    first.close()
    new_signer = KeySigner("test-key-2")
    with pytest.raises(AuditIntegrityError, match="not trusted"):
        AuditLog(db, new_signer, clock)
    reopened = AuditLog(db, new_signer, clock, trusted_keys={signer.key_id: signer.public_key_b64})
    try:
        reopened.append(make_entry(5))
        assert reopened.tree_head().key_id == "test-key-2"
        assert reopened.verify().ok
    finally:
        reopened.close()


def _count(db: Database) -> int:
    return int(_sql(db, "SELECT count(*) FROM audit_entries")[0][0])


@pytest.mark.parametrize("rows_per_statement", [None, 3])
def test_a_batch_with_a_clash_midway_appends_nothing(
    log: AuditLog, db: Database, rows_per_statement: int | None
) -> None:
    # A batch is one multi-row INSERT when it fits one statement (all rows or none: one statement is
    # one transaction), else an explicit transaction; either way a row that cannot be written takes
    # the whole batch with it.
    if rows_per_statement is not None:
        log.max_rows_per_statement = rows_per_statement  # a 10-row batch then needs the transaction
    _filled(log, 5)
    _forge(db, 12)
    with pytest.raises(AuditIntegrityError, match="never appended by this log"):
        log.append_many([make_entry(i) for i in range(5, 15)])  # seq 5..14 clashes at 12
    assert _count(db) == 6  # the five appended before and the forged row: none of the batch
    assert log.size == 5


@pytest.mark.parametrize("rows_per_statement", [None, 3])
def test_batches_in_one_statement_or_in_a_transaction_read_back_the_same(
    log: AuditLog, db: Database, rows_per_statement: int | None
) -> None:
    if rows_per_statement is not None:
        log.max_rows_per_statement = rows_per_statement
    entries = [make_entry(i) for i in range(10)]
    log.append_many(entries[:1])
    log.append_many(entries[1:])
    assert _count(db) == 10
    assert [e.entry for e in log.entries(0, 10)] == entries
    assert log.verify().ok


def test_the_writer_connection_goes_back_to_the_pool_out_of_autocommit(db: Database, log: AuditLog) -> None:
    # The writer appends in autocommit mode; a connection handed back so would make every later
    # user of it commit statement by statement.
    _filled(log, 3)
    log.close()
    with db.engine.connect() as conn:
        dbapi: Any = conn.connection.dbapi_connection
        if db.dialect == "sqlite":
            assert dbapi.isolation_level is not None
        else:
            assert dbapi.autocommit is False
