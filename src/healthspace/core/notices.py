"""Change notices between the processes of one connector, over PostgreSQL `LISTEN`/`NOTIFY`.

A management long poll waits in one process for a change that a message received by another process
of the same connector commits (`connector serve --workers N`). Without a notice the waiter sees it at
its next re-read, up to `DspService.wait_poll_s` (1 s) later. With one, at once.

Notices are sent only while another process of the connector is alive (`others_alive`, kept by the
housekeeper's heartbeat): a connector of one process pays nothing. Sending is off the request's path
(a thread of its own, through `Database.writing_statement(durable=False)`: it need not wait for the
WAL flush); a lost notice costs a waiter its poll interval, nothing more, so failures are logged and
retried, never raised. Listening holds a connection of its own (a `LISTEN` belongs to a session).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable

from sqlalchemy import text
from sqlalchemy.engine import make_url

from healthspace.core.db import Database

__all__ = ["ChangeNotices"]

log = logging.getLogger(__name__)
_MAX_PAYLOAD = 7900  # bytes; PostgreSQL's limit is 8000
_RETRY_S = 1.0
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")


def _conninfo(url: str) -> str:
    """A libpq URL from a SQLAlchemy one (`postgresql+psycopg://...` → `postgresql://...`)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def payloads(instance: str, keys: Iterable[str]) -> list[str]:
    """`keys` as notice payloads of at most `_MAX_PAYLOAD` bytes: the sender's instance id, then one key
    per line (ids hold no newline). A key too long for a notice of its own is dropped (logged): its
    waiters see it at their next re-read."""
    head = instance + "\n"
    empty = len(head.encode())
    out: list[str] = []
    body: list[str] = []
    size = empty
    for key in keys:
        n = len(key.encode()) + 1
        if empty + n > _MAX_PAYLOAD:
            log.warning("change notice for %.60s... dropped: too long for a notice", key)
            continue
        if size + n > _MAX_PAYLOAD:
            out.append(head + "\n".join(body))
            body, size = [], empty
        body.append(key)
        size += n
    if body:
        out.append(head + "\n".join(body))
    return out


def parse(payload: str) -> tuple[str, set[str]]:
    """(sender's instance id, keys) of a payload made by `payloads`."""
    instance, _, rest = payload.partition("\n")
    return instance, {k for k in rest.split("\n") if k}


class ChangeNotices:
    """Publish the keys a commit changed to the connector's other processes; hand theirs to `deliver`."""

    def __init__(
        self,
        db: Database,
        instance: str,
        deliver: Callable[[set[str]], None],
        *,
        channel: str = "healthspace_changes",
    ) -> None:
        if db.dialect != "postgresql":
            raise ValueError("change notices need PostgreSQL")
        if not channel.isidentifier():
            raise ValueError("a channel name is a plain identifier")
        self._db = db
        self._conninfo = _conninfo(db.url)
        self.instance = instance
        self._deliver = deliver
        self._channel = channel
        self.others_alive = False
        self._outgoing: queue.SimpleQueue[set[str] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listening = threading.Event()

    def publish(self, keys: Iterable[str]) -> None:
        """Tell the other processes these keys changed (a no-op while this process is alone)."""
        if self.others_alive and not self._stop.is_set():
            self._outgoing.put(set(keys))

    def start(self, timeout_s: float = 10.0) -> None:
        """Start listening and sending; returns once listening (or after `timeout_s`, logged)."""
        if self._threads:
            raise RuntimeError("change notices already started")
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._listen, name="notices-in", daemon=True),
            threading.Thread(target=self._send, name="notices-out", daemon=True),
        ]
        for t in self._threads:
            t.start()
        if not self._listening.wait(timeout_s):
            log.warning("change notices: not listening yet; waiters poll until they are")

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._outgoing.put(None)
        for t in self._threads:
            t.join(timeout_s)
        self._threads = []

    def _listen(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    self._listening.set()
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=0.5):
                            sender, keys = parse(notice.payload)
                            if sender != self.instance and keys:
                                self._deliver(keys)
            except Exception:  # the database went away, or a delivery failed: listen again
                self._listening.clear()
                log.exception("change notices: listening failed; again in %.0f s", _RETRY_S)
                self._stop.wait(_RETRY_S)

    def _send(self) -> None:
        while True:
            keys = self._outgoing.get()
            if keys is None:
                return
            while True:  # whatever queued meanwhile goes in the same notices
                try:
                    more = self._outgoing.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._outgoing.put(None)
                    break
                keys |= more
            try:
                with self._db.writing_statement(durable=False) as conn:
                    for payload in payloads(self.instance, sorted(keys)):
                        conn.execute(_NOTIFY, {"channel": self._channel, "payload": payload})
            except Exception:  # lost notices cost waiters their poll interval, nothing more
                log.exception("change notices: sending failed")
                self._stop.wait(_RETRY_S)
