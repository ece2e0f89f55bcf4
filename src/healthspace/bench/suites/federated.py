"""Federated study cost: a single-condition cohort count at three HTTP data planes through the lab.

Three synthetic hospitals (quick: 300 patients each; full: 5,000) are loaded the way a hospital loads
data (FHIR NDJSON → encrypted clinical store; consent NDJSON → consent registry), each behind its own
data plane (job service with policy evaluation, consent cohort, run_job, Ed25519 signature, audit)
served by uvicorn on loopback. The figure is one `run_study` end to end (three concurrent jobs, token
checks, signature verification, combination); the baseline is the raw DuckDB count of the same
condition on the same three stores, in the same run.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import uvicorn
from fastapi import FastAPI

from healthspace.audit.log import AuditLog
from healthspace.bench.harness import Figure
from healthspace.connector.dataplane import ConsumerProfile, JobService, make_dataplane_router
from healthspace.connector.dataplane.store import lazy_store_connection
from healthspace.connector.dsp.dataplane import mint_access_token
from healthspace.consent.fhir import PatientRefs
from healthspace.consent.service import ConsentService
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from healthspace.core.errors import ConfigurationError, NotFoundError, install_problem_handlers
from healthspace.data.ingest import ingest_ndjson
from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore
from healthspace.identity.keys import SigningKey
from healthspace.lab import Site, Study, run_study
from healthspace.policy import template
from healthspace.synth.generate import generate

__all__ = ["run"]

SCENARIO = "diabetes-outcomes-research"
CONSUMER = "hk-university"
AS_OF = datetime(2026, 1, 1, tzinfo=UTC)
_RAW = "SELECT count(DISTINCT person_id) FROM condition_occurrence WHERE condition_source_value LIKE 'E11%'"
_SPEC: dict[str, Any] = {
    "version": 1,
    "cohort": {
        "inclusion": [
            {"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}
        ]
    },
    "analyses": [{"type": "count", "id": "n"}],
}


@dataclass(frozen=True)
class _Agreement:
    id: str
    provider_id: str
    consumer_id: str
    dataset_id: str
    policy: dict[str, Any]
    signed_at: datetime
    retired_at: datetime | None = None


@dataclass(frozen=True)
class _Transfer:
    id: str
    agreement_id: str
    state: str = "STARTED"


@dataclass
class _Hospital:
    site: Site
    connect: Any
    db: Database
    audit: AuditLog
    app: FastAPI


def _hospital(root: Path, site: str, patients: int, seed: int) -> _Hospital:
    synth = generate(site, patients, seed, root / site / "synth", progress=False).out
    fhir = [p for p in sorted((synth / "fhir").glob("*.ndjson")) if p.name != "Consent.ndjson"]
    store_path, keys_dir = root / site / "clinical", root / site / "keys"
    with ClinicalStore.create(store_path, f"{site}-ehr", LocalKeyStore(keys_dir)) as store:
        ingest_ndjson(store, fhir)
    pid, dataset = f"{site}-hospital", f"urn:healthspace:{site}-hospital:t2d-cohort"
    clock, key = FixedClock(AS_OF), SigningKey.generate()
    db = Database(
        f"sqlite:///{root / site / 'connector.db'}", branches=("audit", "consent", "compute", "jobs")
    )
    audit = AuditLog(db, key, clock)
    consent = ConsentService(db, audit, key, pid, PatientRefs(f"{site}-pat-"), clock=clock)
    consent.import_ndjson((synth / "fhir" / "Consent.ndjson").read_bytes().splitlines(), actor="bench")
    policy = template(
        "aggregate-research",
        policy_type="Agreement",
        scenario=SCENARIO,
        target=dataset,
        assigner=pid,
        assignee=CONSUMER,
    )
    rule = policy["permission"][0]
    rule["constraint"] = [c for c in rule["constraint"] if c["leftOperand"] != "privacyBudget"]
    agreement = _Agreement("agr-bench", pid, CONSUMER, dataset, policy, AS_OF - timedelta(days=1))
    transfer = _Transfer("tr-bench", agreement.id)

    def find_agreement(agreement_id: str) -> _Agreement:
        if agreement_id != agreement.id:
            raise NotFoundError(agreement_id)
        return agreement

    def find_transfer(transfer_id: str) -> _Transfer:
        if transfer_id != transfer.id:
            raise NotFoundError(transfer_id)
        return transfer

    connect = lazy_store_connection(store_path, keys_dir)
    service = JobService(
        db,
        provider_id=pid,
        provider_jurisdiction="CN-GD" if site in ("gz", "sz") else "HK",
        key=key,
        agreement=find_agreement,
        transfer=find_transfer,
        consent=lambda: consent,
        connect=connect,
        record=audit.record,
        clock=clock,
        consumer=lambda _: ConsumerProfile(jurisdiction="HK", participant_type="university"),
    )
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(make_dataplane_router(lambda: service))

    @app.get("/.well-known/healthspace")
    def describe() -> dict[str, str]:
        return {"id": pid, "public_key": key.public_key_b64}

    token = mint_access_token(key, pid, CONSUMER, agreement.id, transfer.id, AS_OF, timedelta(days=1))
    return _Hospital(Site(pid, "", token, agreement.id, key.public_key_b64), connect, db, audit, app)


@contextmanager
def _serve(app: FastAPI) -> Iterator[str]:
    # IPPROTO_TCP so accepted sockets get TCP_NODELAY (otherwise each response waits ~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: server.run(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise ConfigurationError("bench data plane did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(quick: bool) -> list[Figure]:
    patients, runs = (300, 15) if quick else (5_000, 200)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        hospitals = [_hospital(Path(tmp), s, patients, i) for i, s in enumerate(("gz", "sz", "hk"), start=1)]
        sites = []
        for h in hospitals:
            url = stack.enter_context(_serve(h.app))
            sites.append(
                Site(h.site.id, f"{url}/dataplane", h.site.token, h.site.agreement_id, h.site.public_key)
            )
        study = Study(SCENARIO, _SPEC, sites)
        cons: list[duckdb.DuckDBPyConnection] = [h.connect() for h in hospitals]
        lab_ms: list[float] = []
        raw_ms: list[float] = []
        expected = sum(int(c.execute(_RAW).fetchall()[0][0]) for c in cons)
        run_study(study)  # warm-up: opens stores, compiles, connects
        for _ in range(runs):
            t0 = time.perf_counter()
            result = run_study(study)
            lab_ms.append((time.perf_counter() - t0) * 1000)
            if not result.complete:
                raise ConfigurationError(f"bench study failed: {[s.to_dict() for s in result.sites]}")
            t0 = time.perf_counter()
            for c in cons:
                c.execute(_RAW).fetchall()
            raw_ms.append((time.perf_counter() - t0) * 1000)
        for h in hospitals:
            h.audit.close()
            h.db.dispose()
    note = (
        f"3 sites x {patients:,} patients, {runs} studies; consenting E11 cohort counted "
        f"(raw E11 persons, all consents: {expected}); baseline: raw DuckDB count on the same 3 stores"
    )
    p50 = [_quantile(lab_ms, 0.5)]
    p99 = [_quantile(lab_ms, 0.99)]
    return [
        Figure(
            "federated count p50 (3 sites, lab end to end)",
            "ms",
            p50,
            "lower",
            "raw engine count x3",
            raw_ms,
            None,
            note,
        ),
        Figure(
            "federated count p99 (3 sites, lab end to end)",
            "ms",
            p99,
            "lower",
            "raw engine count x3",
            raw_ms,
            None,
            note,
        ),
    ]
