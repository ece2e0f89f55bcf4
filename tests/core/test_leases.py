"""Leases and housekeeping: which processes of a connector are alive, and which one does a duty."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from healthspace.core.leases import Duty, Housekeeper, LeaseRow, Leases

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
TTL = timedelta(seconds=30)


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def leases(make_db: Callable[..., Database], clock: FixedClock) -> Leases:
    return Leases(make_db("leases"), clock)


def test_a_lease_is_held_by_one_holder_until_it_expires_or_is_released(
    leases: Leases, clock: FixedClock
) -> None:
    assert leases.hold("retention", "a", TTL)
    assert not leases.hold("retention", "b", TTL)
    assert leases.holder("retention") == "a"
    clock.advance(TTL)  # at the expiry instant it is still a's
    assert not leases.hold("retention", "b", TTL)
    clock.advance(timedelta(microseconds=1))
    assert leases.holder("retention") is None
    assert leases.hold("retention", "b", TTL)
    assert not leases.release("retention", "a")  # a no longer has it: nothing to give up
    assert leases.holder("retention") == "b"
    assert leases.release("retention", "b")
    assert leases.hold("retention", "a", TTL)  # free again at once


def test_renewing_moves_the_expiry_and_keeps_when_it_was_taken(leases: Leases, clock: FixedClock) -> None:
    assert leases.hold("retention", "a", TTL)
    clock.advance(timedelta(seconds=20))
    assert leases.hold("retention", "a", TTL)
    clock.advance(timedelta(seconds=20))  # 40 s after taking it: alive only because it was renewed
    assert not leases.hold("retention", "b", TTL)
    with leases.db.session() as s:
        row = s.get(LeaseRow, "retention")
        assert row is not None
        assert (row.acquired_at, row.expires_at) == (T0, T0 + timedelta(seconds=20) + TTL)


def test_a_lease_needs_a_positive_ttl(leases: Leases) -> None:
    with pytest.raises(ValueError, match="ttl"):
        leases.hold("x", "a", timedelta(0))


def test_live_instances_are_those_whose_instance_lease_has_not_run_out(
    leases: Leases, clock: FixedClock
) -> None:
    leases.hold("instance:p1", "p1", TTL)
    leases.hold("instance:p2", "p2", 2 * TTL)
    leases.hold("instance_p3", "p3", TTL)  # not an instance lease: `_` is no wildcard here
    leases.hold("retention", "p1", TTL)
    assert leases.live_instances() == {"p1", "p2"}
    clock.advance(TTL + timedelta(seconds=1))
    assert leases.live_instances() == {"p2"}


def test_of_many_racing_for_a_free_lease_exactly_one_gets_it(make_db: Callable[..., Database]) -> None:
    # Two databases (two pools) and eight threads: as close to two processes racing as a test gets.
    dbs = [make_db("leases"), make_db("leases")]
    start = threading.Barrier(8)
    won: list[str] = []

    def race(i: int) -> None:
        start.wait(10)
        if Leases(dbs[i % 2]).hold("retention", f"h{i}", TTL):
            won.append(f"h{i}")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1
    assert Leases(dbs[0]).holder("retention") == won[0]


def _housekeepers(leases: Leases, clock: FixedClock, runs: list[str]) -> tuple[Housekeeper, Housekeeper]:
    def keeper(instance: str) -> Housekeeper:
        duty = Duty("retention", 60.0, lambda: runs.append(instance))
        return Housekeeper(leases, instance, [duty], beat_s=10.0, clock=clock)

    return keeper("p1"), keeper("p2")


def test_a_duty_runs_in_one_process_when_due_and_passes_on_when_that_one_stops(
    leases: Leases, clock: FixedClock
) -> None:
    runs: list[str] = []
    p1, p2 = _housekeepers(leases, clock, runs)
    assert p1.run_due() == ["retention"]
    assert p2.run_due() == []
    clock.advance(timedelta(seconds=30))
    assert (p1.run_due(), p2.run_due()) == ([], [])  # not due again before 60 s
    clock.advance(timedelta(seconds=30))
    assert (p1.run_due(), p2.run_due()) == (["retention"], [])
    p1.stop()  # gives the duty up: p2 takes it at once
    assert p2.run_due() == ["retention"]
    assert runs == ["p1", "p1", "p2"]


def test_a_dead_process_s_duty_is_taken_once_its_lease_runs_out(leases: Leases, clock: FixedClock) -> None:
    runs: list[str] = []
    p1, p2 = _housekeepers(leases, clock, runs)
    p1.renew()
    p1.run_due()
    # p1 dies: nothing renews its leases. The duty's lease is max(3 beats, 2 periods) = 120 s.
    clock.advance(timedelta(seconds=119))
    assert p2.run_due() == []
    assert leases.live_instances() == set()  # p1's instance lease (30 s) is long gone
    clock.advance(timedelta(seconds=2))
    assert p2.run_due() == ["retention"]
    assert runs == ["p1", "p2"]


def test_the_heartbeat_keeps_a_held_duty_while_it_runs_long(leases: Leases, clock: FixedClock) -> None:
    runs: list[str] = []
    p1, p2 = _housekeepers(leases, clock, runs)
    p1.run_due()
    for _ in range(30):  # five minutes of beats while p1's duty thread is busy
        clock.advance(timedelta(seconds=10))
        p1.renew()
        assert p2.run_due() == []
    assert leases.holder("retention") == "p1"
    assert leases.live_instances() == {"p1"}


def test_a_failing_duty_is_logged_and_tried_again_when_next_due(
    leases: Leases, clock: FixedClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[datetime] = []

    def broken() -> None:
        calls.append(clock.now())
        raise RuntimeError("database hiccup")

    keeper = Housekeeper(leases, "p1", [Duty("retention", 60.0, broken)], clock=clock)
    assert keeper.run_due() == ["retention"]
    assert "housekeeping duty retention failed" in caplog.text
    clock.advance(timedelta(seconds=60))
    assert keeper.run_due() == ["retention"]
    assert calls == [T0, T0 + timedelta(seconds=60)]


def test_a_started_housekeeper_is_alive_at_once_and_gone_once_stopped(leases: Leases) -> None:
    ran = threading.Event()
    keeper = Housekeeper(Leases(leases.db), "p1", [Duty("sweep", 0.05, ran.set)], beat_s=0.05)
    keeper.start()
    try:
        assert Leases(leases.db).live_instances() == {"p1"}
        assert ran.wait(10)
        with pytest.raises(RuntimeError, match="already started"):
            keeper.start()
    finally:
        keeper.stop()
    assert Leases(leases.db).live_instances() == set()
    assert Leases(leases.db).holder("sweep") is None


def test_durations_must_be_positive(leases: Leases) -> None:
    with pytest.raises(ValueError, match="positive"):
        Housekeeper(leases, "p1", beat_s=0)
    with pytest.raises(ValueError, match="positive"):
        Housekeeper(leases, "p1", [Duty("x", 0, lambda: None)])


def test_a_housekeeper_goes_on_after_rounds_that_fail(
    leases: Leases, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = Housekeeper(Leases(leases.db), "p1", beat_s=0.02)
    keeper.start()
    try:
        failures: list[int] = []
        real = keeper.leases.hold

        def flaky(name: str, holder: str, ttl: timedelta) -> bool:
            if len(failures) < 3:
                failures.append(1)
                raise RuntimeError("database hiccup")
            return real(name, holder, ttl)

        def expiry() -> datetime | None:
            with leases.db.session() as s:
                row = s.get(LeaseRow, "instance:p1")
                return None if row is None else row.expires_at

        first = expiry()
        assert first is not None
        monkeypatch.setattr(keeper.leases, "hold", flaky)
        deadline = time.monotonic() + 10
        while ((expiry() or first) <= first or len(failures) < 3) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(failures) == 3
        assert (expiry() or first) > first  # renewed again after the failures
        assert "housekeeping: renew failed" in caplog.text
    finally:
        keeper.stop()


def test_the_heartbeat_tells_who_is_alive(leases: Leases) -> None:
    seen: list[frozenset[str]] = []
    leases.hold("instance:p2", "p2", TTL)
    Housekeeper(leases, "p1", on_live=seen.append).renew()
    assert seen == [{"p1", "p2"}]


def test_leases_long_expired_are_forgotten_when_a_process_starts(leases: Leases, clock: FixedClock) -> None:
    leases.hold("instance:crashed", "crashed", TTL)  # died without giving it up
    leases.hold("data.retention", "crashed", TTL)
    clock.advance(timedelta(days=1))  # ran out 23 h 59 min 30 s ago: kept
    keeper = Housekeeper(leases, "p1", clock=clock, beat_s=3600)
    keeper.start()
    keeper.stop()
    with leases.db.session() as s:
        names = sorted(s.scalars(select(LeaseRow.name)))
    assert names == ["data.retention", "instance:crashed"]
    clock.advance(TTL + timedelta(seconds=1))
    keeper = Housekeeper(leases, "p2", clock=clock, beat_s=3600)
    keeper.start()
    try:
        with leases.db.session() as s:
            names = sorted(s.scalars(select(LeaseRow.name)))
        assert names == ["instance:p2"]  # its own, taken just before
    finally:
        keeper.stop()
