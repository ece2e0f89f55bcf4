"""The DSP manager: background workers that take owed steps and deliver the outbox.

Design (see docs/dsp.md): handlers and management calls only change rows and write outbox messages in
one transaction; right after the commit the service hands the manager hints (`Work`): which process
owes a step, which has a message waiting. A pool of workers takes the hints: (1) runs the step a
process owes (`pending`), (2) leases that process's oldest due message and POSTs it to the peer with a
signed request token and a bounded timeout, outside any transaction. 2xx settles a message; a 4xx is
final (our process is terminated with the reason); a network error or 5xx is retried with exponential
back-off up to `max_attempts`.

Hints are an accelerator, not the source of truth: rows are leased (`claim_next`, `claim_outbox`) and
steps re-checked under the row lock, so a duplicate or stale hint does nothing, and a full pass over
the tables (`run_once`) runs at start and at least every `idle_s`, so work left by a previous run, a
lost hint or a message whose worker died (its lease runs out) is still done. Several workers let one
process's HTTP round trip overlap another's database work; a process's messages still go out in order
(oldest pending first, one lease).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import httpx

from healthspace.connector.dsp.service import DspService, Work
from healthspace.connector.dsp.store import Outgoing
from healthspace.core.errors import HealthspaceError
from healthspace.core.peer_http import PeerHttp, PeerHttpClient, PeerHttpError, PeerResponse
from healthspace.protocol.messages import ContractNegotiation, DspMessage, TransferProcess, parse_as
from healthspace.protocol.states import NegotiationState, TransferState, has_moved_past

__all__ = ["DspManager", "peer_http_client"]

_JSON_HEADERS = {"Content-Type": "application/json"}

log = logging.getLogger(__name__)

_ACK_OF = {
    "ContractRequestMessage": ContractNegotiation,
    "TransferRequestMessage": TransferProcess,
    "ContractOfferMessage": ContractNegotiation,  # only a provider's initial offer: see `_ack_type`
}


def _ack_type(message_type: str, url: str) -> type[DspMessage] | None:
    """The acknowledgement an initial message is answered with (a counter-offer gets none)."""
    if message_type == "ContractOfferMessage" and not url.endswith("/negotiations/offers"):
        return None
    return _ACK_OF.get(message_type)


_SWEEP: Work = ("sweep", "", "")


def peer_http_client(timeout_s: float = 10.0, connections: int = 32) -> PeerHttpClient:
    """The HTTP client for peer calls: an `httpx.Client` for the management API's occasional calls,
    carrying the `PeerHttp` pool the manager delivers DSP messages with (`core.peer_http`,
    ADR 0008: a fraction of httpx's CPU per request). Both set TCP_NODELAY: with Nagle's algorithm
    meeting the peer's delayed ACK, a request written in two parts waits ~40 ms. Keep-alive
    connections are pooled per peer, enough for every manager worker to hold one."""
    transport = httpx.HTTPTransport(
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )
    return PeerHttpClient(PeerHttp(timeout_s, connections), transport=transport, timeout=timeout_s)


class _NoAnswerError(Exception):
    """A peer call that got no HTTP answer (network, timeout, malformed answer); `str()` says why."""


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
        workers: int = 4,
    ) -> None:
        self.service = service
        self.http = http
        # Deliveries go through the lean pool when the client carries one and the auth can hand us
        # its header (`PeerAuth`); any other client or auth (tests, embedders) goes through httpx.
        self._peer: PeerHttp | None = http.peer if isinstance(http, PeerHttpClient) else None
        self.auth_for = auth_for
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.lease = lease
        self.idle_s = idle_s
        self.workers = max(1, workers)
        # Hints, and messages handed over already leased (`DspService.hand_off`): deliver at once.
        self._work: queue.SimpleQueue[Work | Outgoing | None] = queue.SimpleQueue()
        self._sweeping = threading.Lock()
        self._last_sweep = 0.0
        self._sweep_queued = False  # at most one full pass waits in the queue
        # Processes whose message is on the wire, and those hinted meanwhile: their next message
        # can only be claimed once the one in flight is settled, so the deliverer re-hints them.
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._blocked: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        service.on_work(self.hint)

    def hint(self, work: Sequence[Work]) -> None:
        """Called by the service after a commit that left work owed."""
        for w in work:
            self._work.put(w)

    def wake(self) -> None:
        """Ask for a full pass (external changes); one already waiting in the queue will do."""
        with self._lock:
            if self._sweep_queued:
                return
            self._sweep_queued = True
        self._work.put(_SWEEP)

    def handed(self, messages: list[Outgoing]) -> None:
        """Messages a transaction wrote leased for this manager: a worker delivers them as they are."""
        for m in messages:
            self._work.put(m)

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self.wake()  # whatever a previous run left owed
        for i in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"dsp-manager-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        # Only running workers take hand-offs: a manager driven by `run_once` alone (tests, tools)
        # must find every message unleased in the outbox.
        self.service.hand_off(self.handed, self.lease)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.service.hand_off(None, self.lease)
        self._stop.set()
        for _ in self._threads:
            self._work.put(None)
        for t in self._threads:
            t.join(timeout_s)
        self._threads = []
        # Messages handed over but not taken: give their leases back, so the next run (or another
        # worker on the same database) sends them at once instead of when the lease runs out.
        left: list[Work | None] = []
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Outgoing):
                self.service.store.release_lease(item.seq)
            else:
                left.append(item)
        for item in left:
            self._work.put(item)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                work = self._work.get(timeout=self.idle_s)
            except queue.Empty:
                if time.monotonic() - self._last_sweep < self.idle_s:
                    continue  # another idle worker swept meanwhile: one pass per idle_s will do
                work = _SWEEP  # the safety net: retries due, hints lost, rows changed elsewhere
            if work is None:
                return
            if work is not _SWEEP and time.monotonic() - self._last_sweep > self.idle_s:
                self.wake()  # under constant load the queue is never idle: sweep anyway
            try:
                self._take(work)
            except Exception:  # a worker must outlive any single fault; the rows stay owed
                log.exception("DSP manager work %s failed", work)

    def _take(self, work: Work | Outgoing) -> None:
        if isinstance(work, Outgoing):
            self._deliver_row(work)
            return
        what, kind, pid = work
        if what == "step":
            self._take_step(kind, pid)
        elif what == "send":
            row = self.service.store.claim_next(pid, self.service.clock.now(), self.lease)
            if row is not None:
                self._deliver_row(row)
                return
            with self._lock:
                if pid in self._in_flight:
                    self._blocked.add(pid)
        else:
            with self._lock:
                self._sweep_queued = False
            if not self._sweeping.acquire(blocking=False):
                return  # a pass is running; the next one comes within idle_s
            try:
                self._last_sweep = time.monotonic()
                self.run_once()
            finally:
                self._sweeping.release()

    def run_once(self) -> int:
        """One full pass: owed steps first, then due deliveries. Returns how much work was done."""
        done = 0
        with self.service.db.session() as s:
            owed = self.service.store.pending_ids(s)
        for kind, pid in owed:
            self._take_step(kind, pid)
            done += 1
        now = self.service.clock.now()
        for row in self.service.store.claim_outbox(now, self.lease):
            self._deliver_row(Outgoing.of(row))
            done += 1
        return done

    def _take_step(self, kind: str, pid: str) -> None:
        step = self.service.run_pending(kind, pid, lease=self.lease)
        try:
            for row in step.sent:
                self._deliver_row(row)
        finally:
            self.service.record_all(step.audits)

    def _deliver_row(self, row: Outgoing) -> None:
        pid = row.process_id
        with self._lock:
            self._in_flight.add(pid)
        try:
            self._deliver(
                row.seq, row.kind, pid, row.peer_id, row.url, row.message_type, row.body, row.attempts
            )
        finally:
            with self._lock:
                self._in_flight.discard(pid)
                again = pid in self._blocked
                self._blocked.discard(pid)
            if again:
                self._work.put(("send", row.kind, pid))

    def _deliver(
        self, seq: int, kind: str, pid: str, peer: str, url: str, mtype: str, body: str, attempts: int
    ) -> None:
        store = self.service.store
        try:
            r = self._call("POST", url, peer, body.encode())
        except _NoAnswerError as exc:
            self._retry(seq, kind, pid, mtype, str(exc), attempts)
            return
        if 200 <= r.status_code < 300:
            answer: DspMessage | None = None
            ack = _ack_type(mtype, url)
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
        """After a refusal: has the peer's copy of the process already taken this message?

        That is the case when we crashed after delivering a message but before settling it, so the
        repeat is refused as "not allowed in this state": the peer stands where ours does, or has
        moved on from there (`has_moved_past`: it verified our agreement and finalized while we were
        down). Then the message counts as delivered.
        """
        if _ack_type(mtype, url) is not None:
            return False  # initial requests are idempotent at the receiver; a refusal is a refusal
        marker = "/negotiations/" if kind == "negotiation" else "/transfers/"
        base, found, rest = url.rpartition(marker)
        if not found or not rest:
            return False
        their_pid = rest.split("/", 1)[0]
        try:
            r = self._call("GET", f"{base}{marker}{their_pid}", peer)
            if r.status_code != 200:
                return False
            ours: NegotiationState | TransferState
            if kind == "negotiation":
                theirs: NegotiationState | TransferState
                theirs = parse_as(r.content, ContractNegotiation).state
                ours = NegotiationState(self.service.negotiation(pid).state)
            else:
                theirs = parse_as(r.content, TransferProcess).state
                ours = TransferState(self.service.transfer(pid).state)
        except (_NoAnswerError, HealthspaceError, ValueError):
            return False
        return has_moved_past(ours, theirs)

    def _call(self, method: str, url: str, peer: str, body: bytes | None = None) -> PeerResponse:
        """One signed call to `peer` (a fresh request token), answered or raising `_NoAnswerError`."""
        auth = self.auth_for(peer)
        authorization = getattr(auth, "authorization", None)
        if self._peer is not None and callable(authorization):
            headers = {"Authorization": authorization()}
            if body is not None:
                headers.update(_JSON_HEADERS)
            try:
                return self._peer.request(method, url, body, headers, self.timeout_s)
            except PeerHttpError as exc:
                raise _NoAnswerError(str(exc)) from None
        try:
            r = self.http.request(
                method,
                url,
                content=body,
                headers=_JSON_HEADERS if body is not None else None,
                auth=auth,
                timeout=self.timeout_s,
            )
        except httpx.HTTPError as exc:
            raise _NoAnswerError(type(exc).__name__) from None
        return PeerResponse(r.status_code, r.content)

    def _retry(self, seq: int, kind: str, pid: str, mtype: str, why: str, attempts: int) -> None:
        store = self.service.store
        if attempts >= self.max_attempts:
            store.settle_outbox(seq, sent=False, error=why, retry_at=None)
            self.service.undeliverable(kind, pid, mtype, f"{why} after {attempts} attempts")
            return
        delay = timedelta(seconds=min(30.0, 0.2 * 2 ** (attempts - 1)))
        store.settle_outbox(seq, sent=False, error=why, retry_at=self.service.clock.now() + delay)
        self.wake_at(delay.total_seconds(), ("send", kind, pid))

    def wake_at(self, delay_s: float, work: Work) -> None:
        timer = threading.Timer(delay_s, self.hint, args=([work],))
        timer.daemon = True
        timer.start()
