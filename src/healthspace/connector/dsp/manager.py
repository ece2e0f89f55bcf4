"""The DSP manager: one background thread per connector that takes owed steps and delivers the outbox.

Design (see docs/dsp.md): handlers and management calls only change rows and write outbox messages in
one transaction; this loop, woken right after each commit, (1) runs steps a process owes (`pending`),
(2) leases due outbox messages and POSTs them to the peer with a signed request token and a bounded
timeout, outside any transaction. 2xx settles a message; a 4xx is final (our process is terminated
with the reason); a network error or 5xx is retried with exponential back-off up to `max_attempts`.
After a restart the loop picks up whatever is still pending, so nothing owed is lost.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from datetime import timedelta

import httpx

from healthspace.connector.dsp.service import DspService
from healthspace.core.errors import HealthspaceError
from healthspace.protocol.messages import ContractNegotiation, DspMessage, TransferProcess, parse_as

__all__ = ["DspManager", "peer_http_client"]

log = logging.getLogger(__name__)

_ACK_OF = {"ContractRequestMessage": ContractNegotiation, "TransferRequestMessage": TransferProcess}


def peer_http_client(timeout_s: float = 10.0) -> httpx.Client:
    """An HTTP client for peer calls with TCP_NODELAY: httpx writes headers and body separately, and
    Nagle's algorithm meeting the peer's delayed ACK would add ~40 ms to every POST."""
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(transport=transport, timeout=timeout_s)


class DspManager:
    def __init__(
        self,
        service: DspService,
        http: httpx.Client,
        auth_for: Callable[[str], httpx.Auth],
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 6,
        lease: timedelta = timedelta(seconds=30),
        idle_s: float = 1.0,
    ) -> None:
        self.service = service
        self.http = http
        self.auth_for = auth_for
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.lease = lease
        self.idle_s = idle_s
        self._event = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        service.on_work(self.wake)

    def wake(self) -> None:
        self._event.set()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="dsp-manager", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._event.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _loop(self) -> None:
        # Every commit that owes work wakes us (`wake`), so a pass runs only when needed; the idle
        # timeout is the safety net for retries due later and for work left by a previous run.
        while not self._stop.is_set():
            self._event.clear()
            try:
                self.run_once()
            except Exception:  # the loop must outlive any single fault; the row stays pending
                log.exception("DSP manager pass failed")
            self._event.wait(self.idle_s)

    def run_once(self) -> int:
        """One pass: owed steps first, then deliveries. Returns how much work was done."""
        done = 0
        with self.service.db.session() as s:
            owed = self.service.store.pending_ids(s)
        for kind, pid in owed:
            self.service.run_pending(kind, pid)
            done += 1
        now = self.service.clock.now()
        for row in self.service.store.claim_outbox(now, self.lease):
            self._deliver(
                row.seq,
                row.kind,
                row.process_id,
                row.peer_id,
                row.url,
                row.message_type,
                row.body,
                row.attempts,
            )
            done += 1
        return done

    def _deliver(
        self, seq: int, kind: str, pid: str, peer: str, url: str, mtype: str, body: str, attempts: int
    ) -> None:
        store = self.service.store
        try:
            r = self.http.post(
                url,
                content=body.encode(),
                headers={"Content-Type": "application/json"},
                auth=self.auth_for(peer),
                timeout=self.timeout_s,
            )
        except httpx.HTTPError as exc:
            self._retry(seq, kind, pid, mtype, f"{type(exc).__name__}", attempts)
            return
        if 200 <= r.status_code < 300:
            answer: DspMessage | None = None
            ack = _ACK_OF.get(mtype)
            if ack is not None:
                try:
                    answer = parse_as(r.content, ack)
                except HealthspaceError as exc:
                    store.settle_outbox(seq, sent=False, error=exc.detail, retry_at=None)
                    self.service.undeliverable(kind, pid, mtype, f"invalid acknowledgement: {exc.detail}")
                    return
            self.service.delivered(seq, kind, pid, answer)
        elif 400 <= r.status_code < 500:
            if self._peer_already_there(kind, pid, peer, url, mtype):
                store.settle_outbox(
                    seq, sent=True, error="repeat delivery; peer already there", retry_at=None
                )
                return
            why = f"HTTP {r.status_code}: {r.text[:300]}"
            store.settle_outbox(seq, sent=False, error=why, retry_at=None)
            self.service.undeliverable(kind, pid, mtype, why)
        else:
            self._retry(seq, kind, pid, mtype, f"HTTP {r.status_code}", attempts)

    def _peer_already_there(self, kind: str, pid: str, peer: str, url: str, mtype: str) -> bool:
        """After a refusal: does the peer's copy of the process already stand where ours does?

        That is the case when we crashed after delivering a message but before settling it, so the
        repeat is refused as "not allowed in this state". Then the message counts as delivered.
        """
        if mtype in _ACK_OF:
            return False  # initial requests are idempotent at the receiver; a refusal is a refusal
        marker = "/negotiations/" if kind == "negotiation" else "/transfers/"
        base, found, rest = url.rpartition(marker)
        if not found or not rest:
            return False
        their_pid = rest.split("/", 1)[0]
        try:
            r = self.http.get(f"{base}{marker}{their_pid}", auth=self.auth_for(peer), timeout=self.timeout_s)
            if r.status_code != 200:
                return False
            theirs: str = (
                parse_as(r.content, ContractNegotiation).state
                if kind == "negotiation"
                else parse_as(r.content, TransferProcess).state
            )
            ours = (
                self.service.negotiation(pid).state
                if kind == "negotiation"
                else self.service.transfer(pid).state
            )
        except (httpx.HTTPError, HealthspaceError):
            return False
        return bool(theirs == ours)

    def _retry(self, seq: int, kind: str, pid: str, mtype: str, why: str, attempts: int) -> None:
        store = self.service.store
        if attempts >= self.max_attempts:
            store.settle_outbox(seq, sent=False, error=why, retry_at=None)
            self.service.undeliverable(kind, pid, mtype, f"{why} after {attempts} attempts")
            return
        delay = timedelta(seconds=min(30.0, 0.2 * 2 ** (attempts - 1)))
        store.settle_outbox(seq, sent=False, error=why, retry_at=self.service.clock.now() + delay)
        self.wake_at(delay.total_seconds())

    def wake_at(self, delay_s: float) -> None:
        timer = threading.Timer(delay_s, self.wake)
        timer.daemon = True
        timer.start()
