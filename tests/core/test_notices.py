"""Change notices between a connector's processes (PostgreSQL LISTEN/NOTIFY)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import psycopg
import pytest

from healthspace.core.db import Database
from healthspace.core.notices import ChangeNotices, parse, payloads

pytestmark = pytest.mark.postgres


def test_payloads_carry_the_sender_and_every_key_within_the_size_limit() -> None:
    keys = [f"urn:uuid:{i:036d}" for i in range(600)]  # ≈ 27 kB of keys: four notices
    out = payloads("host:1:ab", keys)
    assert len(out) > 1
    assert all(len(p.encode()) <= 7900 for p in out)
    parsed = [parse(p) for p in out]
    assert {sender for sender, _ in parsed} == {"host:1:ab"}
    assert set().union(*(k for _, k in parsed)) == set(keys)


def test_a_key_too_long_for_any_notice_is_dropped_not_sent_broken() -> None:
    assert payloads("me", ["x" * 8000, "ok"]) == ["me\nok"]


def test_notices_need_postgresql(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    try:
        with pytest.raises(ValueError, match="PostgreSQL"):
            ChangeNotices(db, "me", lambda _: None)
    finally:
        db.dispose()


def _received(inbox: queue.SimpleQueue[set[str]], timeout_s: float) -> set[str] | None:
    try:
        return inbox.get(timeout=timeout_s)
    except queue.Empty:
        return None


@pytest.fixture
def pair(postgres_url: str) -> Iterator[tuple[ChangeNotices, ChangeNotices, queue.SimpleQueue[set[str]]]]:
    inbox_a: queue.SimpleQueue[set[str]] = queue.SimpleQueue()
    inbox_b: queue.SimpleQueue[set[str]] = queue.SimpleQueue()
    db_a, db_b = Database(postgres_url), Database(postgres_url)  # two processes: a pool each
    a = ChangeNotices(db_a, "a", inbox_a.put)
    b = ChangeNotices(db_b, "b", inbox_b.put)
    a.start()
    b.start()
    try:
        yield a, b, inbox_b
        assert _received(inbox_a, 0.2) is None  # a never hears its own notices
    finally:
        a.stop()
        b.stop()
        db_a.dispose()
        db_b.dispose()


def test_a_process_hears_what_another_changed_and_never_its_own(
    pair: tuple[ChangeNotices, ChangeNotices, queue.SimpleQueue[set[str]]],
) -> None:
    a, _, inbox_b = pair
    a.others_alive = True
    a.publish({"urn:p:1", "urn:p:2"})
    got: set[str] = set()
    deadline = time.monotonic() + 10
    while got != {"urn:p:1", "urn:p:2"} and time.monotonic() < deadline:
        got |= _received(inbox_b, 1.0) or set()
    assert got == {"urn:p:1", "urn:p:2"}


def test_a_process_alone_sends_nothing(
    pair: tuple[ChangeNotices, ChangeNotices, queue.SimpleQueue[set[str]]],
) -> None:
    a, _, inbox_b = pair
    a.publish({"urn:p:1"})  # others_alive is False until the heartbeat says otherwise
    a.others_alive = True
    a.publish({"urn:p:2"})
    assert _received(inbox_b, 10) == {"urn:p:2"}


def test_listening_resumes_after_the_connection_is_cut(
    postgres_url: str, pair: tuple[ChangeNotices, ChangeNotices, queue.SimpleQueue[set[str]]]
) -> None:
    a, _, inbox_b = pair
    a.others_alive = True
    libpq = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, autocommit=True) as admin:
        cut = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert cut is not None
    assert cut[0] >= 1
    # Sending reconnects on its next notice; listening within its retry interval.
    deadline = time.monotonic() + 15
    got: set[str] | None = None
    while got is None and time.monotonic() < deadline:
        a.publish({"urn:p:after"})
        got = _received(inbox_b, 1.0)
    assert got == {"urn:p:after"}
