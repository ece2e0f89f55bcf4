"""Named, expiring leases in the control-plane database, and the housekeeping thread that keeps them.

A connector may run as several processes on one PostgreSQL database (`connector serve --workers N`).
Two things then need to know about the others:

- which processes are alive: a job a process was running when it died must be ended as interrupted,
  but a job another live process is running must not be. Each process holds the lease
  `instance:<id>` and renews it every beat; a process whose lease has run out is gone.
- which process does the work that one process does for all (retention timers, the sweep for
  interrupted jobs): a *duty* runs in the process holding its lease, and passes to another when that
  process stops renewing it.

Leases live in the database rather than in PostgreSQL advisory locks so that one design covers
SQLite (one process) and PostgreSQL, and so that liveness can be read by anyone with a query. A lease
is only as exact as the clocks of the processes: the TTLs here are tens of seconds, far above the
skew of hosts that keep time.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import String, Table, case, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.clock import Clock, SystemClock
from healthspace.core.db import Base, Database, UtcDateTime

__all__ = ["Duty", "Housekeeper", "LeaseRow", "Leases", "new_instance_id"]

log = logging.getLogger(__name__)
INSTANCE_PREFIX = "instance:"
FORGET_AFTER = timedelta(days=1)  # an expired lease is deleted this long after it ran out


class LeaseRow(Base):
    """A lease: `holder` has `name` until `expires_at` unless it renews it (migration branch "leases")."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200), nullable=False)
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


def new_instance_id() -> str:
    """An id for this process, unique across hosts and restarts (host and pid for people reading it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Leases:
    """The lease table of a control-plane database, read and written one statement at a time."""

    def __init__(self, db: Database, clock: Clock | None = None) -> None:
        self.db = db
        self._clock: Clock = clock or SystemClock()
        insert = postgresql.insert if db.dialect == "postgresql" else sqlite.insert
        t = cast(Table, LeaseRow.__table__)
        stmt = insert(t)
        # One statement takes a free or expired lease, or renews our own; another holder's live lease
        # makes the conditional update match nothing (rowcount 0).
        self._hold = stmt.on_conflict_do_update(
            index_elements=[t.c.name],
            set_={
                "holder": stmt.excluded.holder,
                "expires_at": stmt.excluded.expires_at,
                # Kept while renewing: when this holder first took it.
                "acquired_at": case(
                    (t.c.holder == stmt.excluded.holder, t.c.acquired_at), else_=stmt.excluded.acquired_at
                ),
            },
            where=(t.c.holder == stmt.excluded.holder) | (t.c.expires_at < stmt.excluded.acquired_at),
        ).execution_options(preserve_rowcount=True)  # an INSERT's rowcount is not kept otherwise

    def hold(self, name: str, holder: str, ttl: timedelta) -> bool:
        """Take `name` for `holder` until now + `ttl`, or renew it; False while another holds it."""
        if ttl <= timedelta(0):
            raise ValueError("a lease's ttl must be positive")
        now = self._clock.now()
        with self.db.writing_statement() as conn:
            r = conn.execute(
                self._hold, {"name": name, "holder": holder, "acquired_at": now, "expires_at": now + ttl}
            )
        return r.rowcount == 1

    def release(self, name: str, holder: str) -> bool:
        """Give `name` up if `holder` has it (another may take it at once); whether it was held."""
        with self.db.writing_statement() as conn:
            r = conn.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder))
        return r.rowcount == 1

    def forget_expired(self, before: datetime) -> int:
        """Delete the leases that ran out before `before` (a process that died without giving its
        instance lease up leaves one); returns how many."""
        with self.db.writing_statement() as conn:
            r = conn.execute(delete(LeaseRow).where(LeaseRow.expires_at < before))
        return int(r.rowcount)

    def holder(self, name: str) -> str | None:
        """Who holds `name` now (an expired lease is held by nobody)."""
        with self.db.autocommit() as conn:
            return conn.scalar(
                select(LeaseRow.holder).where(LeaseRow.name == name, LeaseRow.expires_at >= self._clock.now())
            )

    def live_instances(self) -> frozenset[str]:
        """The ids of the processes whose instance lease has not run out."""
        with self.db.autocommit() as conn:
            names = conn.scalars(
                select(LeaseRow.name).where(
                    LeaseRow.name.startswith(INSTANCE_PREFIX, autoescape=True),
                    LeaseRow.expires_at >= self._clock.now(),
                )
            )
            return frozenset(n.removeprefix(INSTANCE_PREFIX) for n in names)


@dataclass(frozen=True)
class Duty:
    """Work one process does for all, every `every_s` seconds, in the process holding lease `name`."""

    name: str
    every_s: float
    run: Callable[[], object]


class Housekeeper:
    """Keeps this process's instance lease alive, and runs each duty it holds (or can take) when due.

    Two threads: the heartbeat renews the instance lease every `beat_s` whatever the duties are
    doing (a retention round that shreds large datasets must not make this process look dead); the
    duty thread takes and runs the duties. A duty's lease lasts `max(3 * beat_s, 2 * every_s)` and
    is renewed at every beat by both threads: if its holder dies, another process takes it within
    that time. Errors inside a duty are logged and it is tried again when next due.
    """

    def __init__(
        self,
        leases: Leases,
        instance: str,
        duties: Sequence[Duty] = (),
        *,
        beat_s: float = 10.0,
        clock: Clock | None = None,
        on_live: Callable[[frozenset[str]], object] | None = None,
    ) -> None:
        if beat_s <= 0 or any(d.every_s <= 0 for d in duties):
            raise ValueError("beat_s and every duty's every_s must be positive")
        self.leases = leases
        self.instance = instance
        self._duties = list(duties)
        self._beat = beat_s
        self._clock: Clock = clock or SystemClock()
        self._on_live = on_live
        self._last_run: dict[str, datetime] = {}
        self._held: set[str] = set()  # duties whose lease this process has (set ops are atomic)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def instance_ttl(self) -> timedelta:
        return timedelta(seconds=3 * self._beat)

    def _duty_ttl(self, duty: Duty) -> timedelta:
        return timedelta(seconds=max(3 * self._beat, 2 * duty.every_s))

    def renew(self) -> None:
        """Renew this process's instance lease and the leases of the duties it holds (so a duty that
        runs longer than its lease is not taken up by a second process meanwhile). With `on_live`,
        then hands it the ids of the live processes, this one included."""
        self.leases.hold(INSTANCE_PREFIX + self.instance, self.instance, self.instance_ttl)
        if self._on_live is not None:
            self._on_live(self.leases.live_instances())
        for duty in self._duties:
            if duty.name in self._held and not self.leases.hold(
                duty.name, self.instance, self._duty_ttl(duty)
            ):
                self._held.discard(duty.name)

    def run_due(self) -> list[str]:
        """Run the due duties this process holds or can take; returns the names of those run."""
        ran: list[str] = []
        for duty in self._duties:
            if not self.leases.hold(duty.name, self.instance, self._duty_ttl(duty)):
                self._held.discard(duty.name)
                self._last_run.pop(duty.name, None)  # another process has it: due at once if it passes
                continue
            self._held.add(duty.name)
            now = self._clock.now()
            last = self._last_run.get(duty.name)
            if last is not None and (now - last).total_seconds() < duty.every_s:
                continue
            self._last_run[duty.name] = now
            try:
                duty.run()
            except Exception:  # a database hiccup must not end housekeeping; the next round retries
                log.exception("housekeeping duty %s failed", duty.name)
            ran.append(duty.name)
        return ran

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("housekeeper already started")
        self._stop.clear()
        self.renew()  # before anything reads liveness: this process is alive from its start
        # What crashed processes left (a crash is mostly followed by a start), once per start
        # rather than at every beat of every process.
        self.leases.forget_expired(self._clock.now() - FORGET_AFTER)
        self._threads = [
            threading.Thread(target=self._every_beat, args=(self.renew,), name="heartbeat", daemon=True),
            threading.Thread(target=self._every_beat, args=(self.run_due,), name="duties", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads and give up this process's leases, so its duties pass on at once."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        for duty in self._duties:
            self.leases.release(duty.name, self.instance)
        self.leases.release(INSTANCE_PREFIX + self.instance, self.instance)

    def _every_beat(self, work: Callable[[], object]) -> None:
        while not self._stop.is_set():
            try:
                work()
            except Exception:
                log.exception("housekeeping: %s failed", getattr(work, "__name__", work))
            self._stop.wait(self._beat)
