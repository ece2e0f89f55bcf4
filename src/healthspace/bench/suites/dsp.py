"""Latency and throughput of full DSP contract negotiations (request → FINALIZED) between two connectors.

Each connector core has its own control-plane database (a SQLite file, or a PostgreSQL database),
audit log, Ed25519 identity, credential from a bench authority, replay guard, DSP service and
manager, and a real uvicorn server on 127.0.0.1. The provider runs in a process of its own, as a
connector does (and as the two cores of this machine allow); the consumer runs in this process and
drives. One negotiation is four signed, schema-checked DSP messages (request, agreement,
verification, finalized event), each persisted and audited on both sides. The baseline, measured in
the same run against the same provider, is one plain loopback HTTP round trip (GET /health).

On PostgreSQL a second provider is measured beside the first: one connector made of P processes
(`HEALTHSPACE_BENCH_DSP_PROCESSES`, 2 by default) that share one database, one identity (the same
Ed25519 key and credential, handed to every process) and one port (each process listens on a
socket of its own bound to it with SO_REUSEPORT, and serves it with its own uvicorn; the kernel
spreads new connections over the sockets by hash).
The first process publishes the dataset; the database is migrated here before any process starts.
Its throughput under concurrency is measured in rounds interleaved with those of the one-process
provider (the baseline), with the provider CPU per negotiation summed over its processes and the
DSP requests each process answered. SQLite is left out: one writer per file, and the multi-process
connector is PostgreSQL-only. The consumer shares the machine's cores with every provider process,
so that rate is bounded by both; the figure's note says by how much.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from fastapi import FastAPI, Request
from sqlalchemy.engine import make_url

from healthspace.audit.log import AuditLog
from healthspace.audit.models import Outcome
from healthspace.bench.harness import Figure, loopback_socket, serve
from healthspace.connector.dsp.api import DspComponents, install_message_lane, make_dsp_routers
from healthspace.connector.dsp.manager import DspManager, peer_http_client
from healthspace.connector.dsp.service import DatasetCreate, DspService
from healthspace.core.clock import SystemClock
from healthspace.core.db import Database
from healthspace.core.errors import ForbiddenError, install_problem_handlers
from healthspace.identity.credentials import (
    CredentialClaims,
    ParticipantRole,
    ParticipantType,
    issue_credential,
)
from healthspace.identity.fastapi import PeerAuth, peer_dependency
from healthspace.identity.keys import SigningKey
from healthspace.identity.replay import SqlReplayGuard
from healthspace.identity.revocation import RevocationCache, RevocationList
from healthspace.identity.tokens import RequestVerifier
from healthspace.protocol.states import NegotiationState

__all__ = ["run"]

AUTHORITY = "bench-authority"
TARGET_P50_MS = 25.0
TARGET_RATE = 200.0  # negotiations/s per provider under concurrency (issue 3)
CONCURRENCY = 8
TARGET_P99_MS = 100.0
OFFER: dict[str, Any] = {"@id": "urn:offer:bench:1", "permission": [{"action": "use"}]}
DATASET = "urn:dataset:bench"
BRANCHES = ("audit", "identity", "dsp")
PROVIDER_PROCESSES = 2  # the multi-process provider (PostgreSQL); HEALTHSPACE_BENCH_DSP_PROCESSES
START_TIMEOUT_S = 120.0
REPLY_TIMEOUT_S = 60.0


@dataclass
class _Node:
    id: str
    url: str
    service: DspService
    answered: Callable[[], int]  # DSP requests this node's server has answered (not GET /health)


class _Counted:
    """An ASGI app that counts the DSP requests it answered (every request but GET /health). Its
    count changes on the server's event loop only, so a plain int will do."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.count = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http" and scope["path"] != "/health":
            self.count += 1


def _raw(key: SigningKey) -> bytes:
    return key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _key(raw: bytes) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(raw))


def _credential(authority: SigningKey, pid: str, key: SigningKey) -> str:
    claims = CredentialClaims(
        participant_id=pid,
        legal_name=pid,
        participant_type=ParticipantType.HOSPITAL,
        jurisdiction="HK",
        roles=(ParticipantRole.DATA_PROVIDER, ParticipantRole.DATA_CONSUMER),
        public_key=key.public_key_b64,
    )
    credential, _ = issue_credential(authority, AUTHORITY, claims, SystemClock().now(), timedelta(days=1))
    return credential


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@contextmanager
def _node(
    db_url: str,
    pid: str,
    authority: SigningKey,
    *,
    key: SigningKey | None = None,
    credential: str | None = None,
    sock: socket.socket | None = None,
) -> Iterator[_Node]:
    """One connector core serving on loopback. A new identity and socket unless given: the
    processes of one provider share its key, credential and port."""
    clock = SystemClock()
    key = key or SigningKey.generate()
    credential = credential or _credential(authority, pid, key)
    sock = sock or loopback_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    db = Database(db_url, branches=BRANCHES)
    audit = AuditLog(db, key, clock)
    revocations = RevocationList(issuer=AUTHORITY, issued_at=clock.now())
    verifier = RequestVerifier(
        authority_public_key_b64=authority.public_key_b64,
        authority_id=AUTHORITY,
        audience=pid,
        revocations=RevocationCache(lambda: revocations, clock=clock, max_age=timedelta(seconds=60)),
        replay=SqlReplayGuard(db),
        clock=clock,
    )

    def record(actor: str, action: str, subject: str, outcome: Outcome, reason: str) -> None:
        audit.record(actor, action, subject, outcome, reason)

    service = DspService(
        db,
        participant_id=pid,
        public_url=url,
        key=key,
        clock=clock,
        record=record,
        record_many=audit.record_many,
    )
    http = peer_http_client(5.0)

    def auth_for(peer: str) -> httpx.Auth:
        return PeerAuth(key, credential, pid, peer)

    manager = DspManager(service, http, auth_for)
    components = DspComponents(service, manager, http, auth_for)

    def no_staff(*_: Any) -> Any:
        def refuse(_: Request) -> Any:
            raise ForbiddenError("no management API in the bench")

        return refuse

    app = FastAPI()
    install_problem_handlers(app)
    public, dsp, _ = make_dsp_routers(lambda _: components, peer_dependency(verifier), no_staff)
    app.include_router(public)
    app.include_router(dsp)
    install_message_lane(app, [dsp])

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    counted = _Counted(app)
    manager.start()
    try:
        with serve(counted, sock):
            yield _Node(pid, url, service, lambda: counted.count)
    finally:
        manager.stop()
        http.close()
        audit.close()
        db.dispose()


def _negotiate(consumer: _Node, provider_id: str, provider_url: str, dataset_id: str) -> float:
    t0 = time.perf_counter()
    started = consumer.service.start_negotiation(
        "bench", provider_id, provider_url, {**OFFER, "target": dataset_id}
    )
    done = consumer.service.wait_negotiation(started.id, {NegotiationState.FINALIZED}, 10.0)
    elapsed = (time.perf_counter() - t0) * 1000
    if done.state is not NegotiationState.FINALIZED:
        raise RuntimeError(f"bench negotiation ended {done.state}: {done.terminal_reason}")
    return elapsed


def _provider_main(
    conn: Connection,
    db_url: str,
    pid: str,
    authority_raw: bytes,
    key_raw: bytes,
    credential: str,
    port: int,
    publish: bool,
) -> None:
    """One process of the provider connector: serve `port` until told to stop; answer "cpu" with its
    CPU time and the DSP requests it has answered. The first process publishes the dataset."""
    sock = _shared_port_socket(port)
    with _node(db_url, pid, _key(authority_raw), key=_key(key_raw), credential=credential, sock=sock) as node:
        if publish:
            node.service.publish("bench", DatasetCreate(id=DATASET, title="Bench cohort", offer=OFFER))
        conn.send(node.url)
        try:
            while conn.recv() == "cpu":
                conn.send((time.process_time(), node.answered()))
        except EOFError:
            pass  # the bench is gone: stop serving


class _Provider:
    """A provider connector of one or more processes, as the bench sees it: its id and URL, and
    the CPU seconds used so far by the connector processes: this one (consumer, driver, and the
    bench's HTTP client) and the provider's, which report their own `time.process_time()`."""

    def __init__(self, pid: str, url: str, conns: list[Connection]) -> None:
        self.id = pid
        self.url = url
        self._conns = conns
        self.answered: list[int] = []  # DSP requests answered, by process, at the last `cpu()`
        self._stopping = False

    def ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for conn in self._conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a bench provider process did not start")
            conn.recv()

    def cpu(self) -> tuple[float, float]:
        """(this process, the provider's processes summed)."""
        for conn in self._conns:
            conn.send("cpu")
        theirs = 0.0
        answered: list[int] = []
        for conn in self._conns:
            if not conn.poll(REPLY_TIMEOUT_S):
                raise RuntimeError("a bench provider process did not answer")
            seconds, count = conn.recv()
            theirs += seconds
            answered.append(count)
        self.answered = answered
        return time.process_time(), theirs

    def stop(self) -> None:
        """Tell every process to stop, without waiting (so that several providers stop together);
        the context that started them joins them."""
        if not self._stopping:
            self._stopping = True
            for conn in self._conns:
                with suppress(OSError):  # that process is gone already
                    conn.send("stop")


def _shared_port_socket(port: int) -> socket.socket:
    """A loopback socket bound to `port` (0: a free one) that other sockets may bind too; listening
    only once served (the parent's, never served, just holds the port)."""
    sock = loopback_socket(bind=False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextmanager
def _provider(db_url: str, authority: SigningKey, pid: str, processes: int = 1) -> Iterator[_Provider]:
    """Start a provider of `processes` processes sharing one database, key, credential and
    port; the caller waits for it with `ready()` (and may do its own set-up meanwhile)."""
    ctx = multiprocessing.get_context("spawn")
    key = SigningKey.generate()
    credential = _credential(authority, pid, key)
    if processes > 1:
        # Migrated here, once, so the processes start without queueing on the migration lock.
        Database(db_url, branches=BRANCHES).dispose()
    # Each process listens on a socket of its own bound to this port (SO_REUSEPORT): the kernel
    # spreads new connections over them by hash. One socket shared by every process let one process
    # accept most connections in some runs (329 / 39 requests), and keep-alive keeps them there.
    sock = _shared_port_socket(0)
    procs: list[multiprocessing.process.BaseProcess] = []
    conns: list[Connection] = []
    provider = _Provider(pid, f"http://127.0.0.1:{sock.getsockname()[1]}", conns)
    try:
        for i in range(processes):
            ours, theirs = ctx.Pipe()
            conns.append(ours)
            port = sock.getsockname()[1]
            args = (theirs, db_url, pid, _raw(authority), _raw(key), credential, port, i == 0)
            proc = ctx.Process(target=_provider_main, args=args, daemon=True)
            proc.start()
            procs.append(proc)
            theirs.close()  # the child has its own end now; ours sees EOF if the child dies
        yield provider
    finally:
        provider.stop()
        for child in procs:
            child.join(30)
            if child.is_alive():
                child.terminate()
                child.join(10)
            if child.is_alive():
                child.kill()
                child.join(10)
        for conn in conns:
            conn.close()
        sock.close()


@contextmanager
def _database(kind: str, root: Path, name: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{(root / f'{name}.db').as_posix()}"
        return
    import psycopg  # only when PostgreSQL is measured

    admin = os.environ.get("HEALTHSPACE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    db = f"hs_bench_{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=3) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    try:
        yield (
            make_url(admin)
            .set(drivername="postgresql+psycopg", database=db)
            .render_as_string(hide_password=False)
        )
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _postgres_reachable() -> bool:
    try:
        import psycopg

        admin = os.environ.get(
            "HEALTHSPACE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        )
        with psycopg.connect(admin, connect_timeout=3):
            return True
    except Exception:
        return False


def _processes() -> int:
    return max(1, int(os.environ.get("HEALTHSPACE_BENCH_DSP_PROCESSES", str(PROVIDER_PROCESSES))))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _measure(kind: str, quick: bool) -> list[Figure]:
    n = 12 if quick else 200
    authority = SigningKey.generate()
    # The multi-process provider: PostgreSQL only (SQLite has one writer per file).
    processes = _processes() if kind == "postgresql" else 1
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        provider = stack.enter_context(
            _provider(
                stack.enter_context(_database(kind, root, "bench-provider")), authority, "bench-provider"
            )
        )
        multi: _Provider | None = None
        if processes > 1:
            multi = stack.enter_context(
                _provider(
                    stack.enter_context(_database(kind, root, "bench-provider-mp")),
                    authority,
                    "bench-provider-mp",
                    processes,
                )
            )
        # The consumer is set up while the provider processes start.
        consumer = stack.enter_context(
            _node(stack.enter_context(_database(kind, root, "bench-consumer")), "bench-consumer", authority)
        )
        provider.ready()
        if multi is not None:
            multi.ready()
        cpu = provider.cpu

        def one(_: object = None) -> float:
            return _negotiate(consumer, provider.id, provider.url, DATASET)

        def burst(target: _Provider, count: int) -> tuple[float, float, float]:
            """`count` negotiations with `target`, CONCURRENCY at a time, all to FINALIZED: (rate,
            provider CPU ms per negotiation summed over its processes, consumer-process CPU ms)."""

            def go(_: object) -> float:
                return _negotiate(consumer, target.id, target.url, DATASET)

            c0 = target.cpu()
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                t0 = time.perf_counter()
                list(pool.map(go, range(count)))
                elapsed = time.perf_counter() - t0
            c1 = target.cpu()
            return count / elapsed, (c1[1] - c0[1]) / count * 1000, (c1[0] - c0[0]) / count * 1000

        with httpx.Client() as client:
            client.get(f"{provider.url}/health")  # open the connection, as the managers' pools are
            for _ in range(3):
                one()  # warm-up: first requests pay for imports and pools
            latencies: list[float] = []
            health: list[float] = []
            for _ in range(n):
                t0 = time.perf_counter()
                client.get(f"{provider.url}/health").raise_for_status()
                health.append((time.perf_counter() - t0) * 1000)
                latencies.append(one())
            # CPU per negotiation, both processes, in blocks; the baseline is the CPU of a block of
            # GET /health round trips in between (the bench's httpx client and the provider's uvicorn).
            block, health_block = (4, 20) if quick else (20, 100)
            cpu_neg: list[float] = []
            cpu_health: list[float] = []
            provider_neg: list[float] = []
            provider_health: list[float] = []
            for _ in range(2 if quick else 5):
                c0 = cpu()
                for _ in range(block):
                    one()
                c1 = cpu()
                for _ in range(health_block):
                    client.get(f"{provider.url}/health").raise_for_status()
                c2 = cpu()
                cpu_neg.append((sum(c1) - sum(c0)) / block * 1000)
                cpu_health.append((sum(c2) - sum(c1)) / health_block * 1000)
                provider_neg.append((c1[1] - c0[1]) / block * 1000)
                provider_health.append((c2[1] - c1[1]) / health_block * 1000)
            # Throughput: negotiations started by CONCURRENCY threads at once, all to FINALIZED,
            # against sequential GET /health round trips in the same run. With a multi-process
            # provider, its rounds alternate with the one-process provider's (which goes first
            # alternates too), so the machine's noise hits both.
            per_round = CONCURRENCY * (2 if quick else 10)
            rates: list[float] = []
            health_rates: list[float] = []
            single_cpu: list[float] = []
            multi_rates: list[float] = []
            multi_cpu: list[float] = []
            consumer_cpu: list[float] = []
            answered_before: list[int] = []
            if multi is not None:
                warm_up = CONCURRENCY // 2 if quick else 2 * CONCURRENCY
                burst(provider, warm_up)  # warm-up of concurrent use, both providers alike
                burst(multi, warm_up)  # and of every process of the multi-process one
                answered_before = list(multi.answered)
            for r in range(3):
                order = (
                    [provider] if multi is None else [provider, multi] if r % 2 == 0 else [multi, provider]
                )
                for target in order:
                    rate_, provider_ms, consumer_ms = burst(target, per_round)
                    consumer_cpu.append(consumer_ms)
                    if target is provider:
                        rates.append(rate_)
                        single_cpu.append(provider_ms)
                    else:
                        multi_rates.append(rate_)
                        multi_cpu.append(provider_ms)
                t0 = time.perf_counter()
                for _ in range(per_round):
                    client.get(f"{provider.url}/health").raise_for_status()
                health_rates.append(per_round / (time.perf_counter() - t0))
        for running in (provider, multi):
            if running is not None:
                running.stop()  # both providers' processes stop together; their contexts join them
    backend = "SQLite" if kind == "sqlite" else "PostgreSQL"
    figures: list[Figure] = []
    if multi is not None:
        # Reported, not required: the kernel puts each connection on a socket by its hash, so with the
        # consumer's handful of keep-alive connections one process may now and then get them all.
        split = [after - before for after, before in zip(multi.answered, answered_before, strict=True)]
        figures = _multi_figures(
            processes, per_round, multi_rates, rates, multi_cpu, single_cpu, consumer_cpu, split
        )
    note = f"{n} negotiations, 4 DSP messages each, {backend} both sides, audit on, provider in own process"
    return [
        Figure(
            name=f"dsp negotiation request→FINALIZED p50 ({backend})",
            unit="ms",
            samples=latencies,
            better="lower",
            baseline_name="loopback GET /health round trip",
            baseline_samples=health,
            target=TARGET_P50_MS,
            note=note,
        ),
        Figure(
            name=f"dsp negotiation request→FINALIZED p99 ({backend})",
            unit="ms",
            samples=[_percentile(latencies, 0.99)],
            better="lower",
            baseline_name="loopback GET /health round trip p99",
            baseline_samples=[_percentile(health, 0.99)],
            target=TARGET_P99_MS,
            note=f"{note}; p50 of the same run {statistics.median(latencies):.1f} ms",
        ),
        Figure(
            name=f"dsp CPU per negotiation, both connector processes ({backend})",
            unit="ms",
            samples=cpu_neg,
            better="lower",
            baseline_name="CPU per loopback GET /health round trip, both processes",
            baseline_samples=cpu_health,
            note=f"{block} sequential negotiations per sample, {health_block} GET /health per baseline "
            "sample; process_time of the consumer process and of the provider process. At this CPU "
            "per negotiation, two cores give at most 2000 / median negotiations/s",
        ),
        Figure(
            name=f"dsp provider CPU per negotiation ({backend})",
            unit="ms",
            samples=provider_neg,
            better="lower",
            baseline_name="provider CPU per loopback GET /health",
            baseline_samples=provider_health,
            note="process_time of the provider process alone, in the same blocks. One provider process "
            "(one interpreter) serves at most 1000 / median negotiations/s whatever the cores; "
            f"{TARGET_RATE:.0f}/s per provider takes {1000 / TARGET_RATE:.0f} ms or less here, or more "
            "provider processes",
        ),
        Figure(
            name=f"dsp negotiations/s with {CONCURRENCY} concurrent requests ({backend})",
            unit="negotiations/s",
            samples=rates,
            baseline_name="sequential loopback GET /health round trips/s",
            baseline_samples=health_rates,
            target=TARGET_RATE,
            note=f"{per_round} negotiations per round; one consumer process drives one provider process "
            "(both on this machine's 2 cores)",
        ),
        *figures,
    ]


def _multi_figures(
    processes: int,
    per_round: int,
    multi_rates: list[float],
    single_rates: list[float],
    multi_cpu: list[float],
    single_cpu: list[float],
    consumer_cpu: list[float],
    split: list[int],
) -> list[Figure]:
    """The multi-process provider's figures (PostgreSQL), against the one-process provider of the
    same run, with a note on what bounds the rate."""
    provider_ms = statistics.median(multi_cpu)
    single_ms = statistics.median(single_cpu)
    consumer_ms = statistics.median(consumer_cpu)
    cores = _cores()
    load = f"; load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    needed = math.ceil(TARGET_RATE * provider_ms / 1000)
    shares = " / ".join(str(x) for x in split)
    setup = (
        f"{per_round} negotiations per round, {len(multi_rates)} rounds, alternating with the one-process "
        f"provider's; {processes} provider processes share one PostgreSQL database, one identity (key and "
        "credential) and one port (SO_REUSEPORT), each with its own uvicorn"
    )
    return [
        Figure(
            name=f"dsp negotiations/s, provider of {processes} processes, {CONCURRENCY} concurrent requests "
            "(PostgreSQL)",
            unit="negotiations/s",
            samples=multi_rates,
            baseline_name=f"dsp negotiations/s, provider of 1 process, {CONCURRENCY} concurrent requests, "
            "same run",
            baseline_samples=single_rates,
            target=TARGET_RATE,
            note=f"{setup}. Bounded by the machine, not by one interpreter: its {cores} cores run the "
            f"consumer process (median {consumer_ms:.1f} ms CPU per negotiation, this bench's driver "
            f"included) and every provider process ({provider_ms:.1f} ms per negotiation summed over "
            f"the {processes}), so here at most {cores * 1000 / (consumer_ms + provider_ms):.0f}/s "
            f"whatever the number of processes, less what else runs on them{load}. At "
            f"{provider_ms:.1f} ms provider CPU per negotiation, "
            f"{TARGET_RATE:.0f}/s per provider takes ceil({TARGET_RATE:.0f} * {provider_ms:.1f} / 1000) = "
            f"{needed} provider processes on {needed} free cores, the consumer's cores apart. DSP "
            f"requests answered by each process in the measured rounds: {shares}",
        ),
        Figure(
            name=f"dsp provider CPU per negotiation, {processes} processes summed, {CONCURRENCY} concurrent "
            "requests (PostgreSQL)",
            unit="ms",
            samples=multi_cpu,
            better="lower",
            baseline_name=f"provider CPU per negotiation, 1 process, {CONCURRENCY} concurrent requests, "
            "same run",
            baseline_samples=single_cpu,
            note=f"{setup}. process_time of every provider process, summed, over each round; a ratio "
            "above 1 is CPU the processes add by splitting the work: each has its own idle loops, and "
            "concurrent requests batch less (audit group commits, event-loop wake-ups). One-process median "
            f"{single_ms:.1f} ms, so one interpreter serves at most {1000 / single_ms:.0f}/s",
        ),
    ]


def run(quick: bool) -> list[Figure]:
    figures = _measure("sqlite", quick)
    if _postgres_reachable():
        figures += _measure("postgresql", quick)
    elif os.environ.get("CI") == "true":
        raise RuntimeError("PostgreSQL is not reachable; CI measures both backends")
    return figures
