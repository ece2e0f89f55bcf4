"""Latency and throughput of full DSP contract negotiations (request → FINALIZED) between two connectors.

Each connector core has its own control-plane database (a SQLite file, or a PostgreSQL database),
audit log, Ed25519 identity, credential from a bench authority, replay guard, DSP service and
manager, and a real uvicorn server on 127.0.0.1. The provider runs in a process of its own, as a
connector does (and as the two cores of this machine allow); the consumer runs in this process and
drives. One negotiation is four signed, schema-checked DSP messages (request, agreement,
verification, finalized event), each persisted and audited on both sides. The baseline, measured in
the same run against the same provider, is one plain loopback HTTP round trip (GET /health).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
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


@dataclass
class _Node:
    id: str
    url: str
    service: DspService


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@contextmanager
def _node(db_url: str, pid: str, authority: SigningKey) -> Iterator[_Node]:
    clock = SystemClock()
    key = SigningKey.generate()
    claims = CredentialClaims(
        participant_id=pid,
        legal_name=pid,
        participant_type=ParticipantType.HOSPITAL,
        jurisdiction="HK",
        roles=(ParticipantRole.DATA_PROVIDER, ParticipantRole.DATA_CONSUMER),
        public_key=key.public_key_b64,
    )
    credential, _ = issue_credential(authority, AUTHORITY, claims, clock.now(), timedelta(days=1))
    sock = loopback_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    db = Database(db_url, branches=("audit", "identity", "dsp"))
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

    manager.start()
    try:
        with serve(app, sock):
            yield _Node(pid, url, service)
    finally:
        manager.stop()
        http.close()
        audit.close()
        db.dispose()


def _negotiate(consumer: _Node, provider: _Node, dataset_id: str) -> float:
    t0 = time.perf_counter()
    started = consumer.service.start_negotiation(
        "bench", provider.id, provider.url, {**OFFER, "target": dataset_id}
    )
    done = consumer.service.wait_negotiation(started.id, {NegotiationState.FINALIZED}, 10.0)
    elapsed = (time.perf_counter() - t0) * 1000
    if done.state is not NegotiationState.FINALIZED:
        raise RuntimeError(f"bench negotiation ended {done.state}: {done.terminal_reason}")
    return elapsed


def _provider_main(conn: Connection, db_url: str, authority_raw: bytes) -> None:
    """The provider connector's process: serve until told to stop; answer "cpu" with its CPU time."""
    authority = SigningKey(Ed25519PrivateKey.from_private_bytes(authority_raw))
    with _node(db_url, "bench-provider", authority) as node:
        node.service.publish("bench", DatasetCreate(id=DATASET, title="Bench cohort", offer=OFFER))
        conn.send(node.url)
        while conn.recv() == "cpu":
            conn.send(time.process_time())


class _Cpu:
    """CPU seconds used so far by the connector processes: this one (consumer, driver, and the
    bench's HTTP client) and the provider, which reports its own `time.process_time()`."""

    def __init__(self, provider: Connection) -> None:
        self._provider = provider

    def __call__(self) -> tuple[float, float]:
        """(this process, the provider)."""
        self._provider.send("cpu")
        theirs: float = self._provider.recv()
        return time.process_time(), theirs


@contextmanager
def _provider(db_url: str, authority: SigningKey) -> Iterator[tuple[str, str, _Cpu]]:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    raw = authority.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    proc = ctx.Process(target=_provider_main, args=(theirs, db_url, raw), daemon=True)
    proc.start()
    try:
        if not ours.poll(120):
            raise RuntimeError("the bench provider did not start")
        yield "bench-provider", ours.recv(), _Cpu(ours)
    finally:
        ours.send("stop")
        proc.join(30)
        if proc.is_alive():
            proc.terminate()


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


def _measure(kind: str, quick: bool) -> list[Figure]:
    n = 12 if quick else 200
    authority = SigningKey.generate()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        provider_id, provider_url, cpu = stack.enter_context(
            _provider(stack.enter_context(_database(kind, root, "bench-provider")), authority)
        )
        consumer = stack.enter_context(
            _node(stack.enter_context(_database(kind, root, "bench-consumer")), "bench-consumer", authority)
        )
        provider = _Node(provider_id, provider_url, consumer.service)  # only id and url are used

        def one(_: object = None) -> float:
            return _negotiate(consumer, provider, DATASET)

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
            # against sequential GET /health round trips in the same run.
            per_round = CONCURRENCY * (2 if quick else 10)
            rates: list[float] = []
            health_rates: list[float] = []
            for _ in range(3):
                with ThreadPoolExecutor(CONCURRENCY) as pool:
                    t0 = time.perf_counter()
                    list(pool.map(one, range(per_round)))
                    rates.append(per_round / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for _ in range(per_round):
                    client.get(f"{provider.url}/health").raise_for_status()
                health_rates.append(per_round / (time.perf_counter() - t0))
    backend = "SQLite" if kind == "sqlite" else "PostgreSQL"
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
    ]


def run(quick: bool) -> list[Figure]:
    figures = _measure("sqlite", quick)
    if _postgres_reachable():
        figures += _measure("postgresql", quick)
    elif os.environ.get("CI") == "true":
        raise RuntimeError("PostgreSQL is not reachable; CI measures both backends")
    return figures
