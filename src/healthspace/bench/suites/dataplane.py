"""Data-plane costs added by issue 6's remaining parts: the GLM step with its persisted session, token
refresh, and the per-job decision through the connector's policy gate.

One synthetic hospital (quick: 300 patients; full: 2,000) behind its data plane on loopback. Each
figure has a baseline measured in the same run:

* GLM step over HTTP (token check, session counter UPDATE in SQLite, aggregates, Ed25519 signature)
  against the in-process `GlmSite(β)` call on the same design (the aggregates alone);
* `POST /dataplane/token` (verification, agreement and transfer checks, gate decision at phase
  TRANSFER, the refresh record, a new token, two audit entries) against an authenticated
  `GET /dataplane/jobs/{id}` on the same server;
* `PolicyGate.decide` at phase JOB (its compiled-policy cache, cross-border rules as a fact,
  fail-closed wrapper) against the data plane's decision before it went through the gate:
  `decide_transfer` then `policy.evaluate` on the agreement's policy document (compiled per call).

Every loop is bounded in count and in time (`_BUDGET_S`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI

from healthspace.audit.log import AuditLog
from healthspace.bench.harness import Figure, serve
from healthspace.compute import DuckDBEngine, GlmSite, parse_spec
from healthspace.connector.dataplane import (
    ConsumerProfile,
    FixedAgreement,
    FixedTransfer,
    JobService,
    data_classes_of,
    make_dataplane_router,
    rules_from_policy,
)
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
from healthspace.policy import DEFAULT_RULES, Facts, Phase, Request, evaluate, template
from healthspace.policy.crossborder import cross_border_fact, decide_transfer
from healthspace.synth.generate import generate

__all__ = ["run"]

SCENARIO = "diabetes-outcomes-research"
CONSUMER = "hk-university"
AS_OF = datetime(2026, 1, 1, tzinfo=UTC)
_BUDGET_S = 60.0  # per figure: a slow machine reports fewer samples rather than running for ever
_GLM: dict[str, Any] = {
    "version": 1,
    "analyses": [
        {
            "type": "glm",
            "id": "m",
            "family": "gaussian",
            "outcome": {"kind": "age"},
            "covariates": [{"kind": "male"}],
        }
    ],
}
_COUNT: dict[str, Any] = {"version": 1, "analyses": [{"type": "count", "id": "n"}]}


def _timed(fn: Callable[[], object], count: int) -> list[float]:
    """Milliseconds of each of up to `count` calls of `fn`, stopping after `_BUDGET_S` seconds."""
    out: list[float] = []
    stop = time.monotonic() + _BUDGET_S
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
        if time.monotonic() > stop:
            break
    return out


def run(quick: bool) -> list[Figure]:
    patients, count = (300, 60) if quick else (2_000, 400)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth = generate("hk", patients, 5, root / "synth", progress=False).out
        fhir = [p for p in sorted((synth / "fhir").glob("*.ndjson")) if p.name != "Consent.ndjson"]
        store_path, keys_dir = root / "clinical", root / "keys"
        with ClinicalStore.create(store_path, "hk-ehr", LocalKeyStore(keys_dir)) as store:
            ingest_ndjson(store, fhir)
        pid, dataset = "hk-hospital", "urn:healthspace:hk-hospital:t2d-cohort"
        clock, key = FixedClock(AS_OF), SigningKey.generate()
        db = Database(f"sqlite:///{root / 'connector.db'}", branches=("audit", "consent", "compute", "jobs"))
        audit = AuditLog(db, key, clock)
        consent = ConsentService(db, audit, key, pid, PatientRefs("hk-pat-"), clock=clock)
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
        for c in rule["constraint"]:
            if c["leftOperand"] == "outputType":
                c["operator"], c["rightOperand"] = "isAnyOf", ["aggregate", "model"]
        agreement = FixedAgreement("agr-bench", pid, CONSUMER, dataset, policy, AS_OF - timedelta(days=1))
        transfer = FixedTransfer("tr-bench", agreement.id)

        def find_agreement(agreement_id: str) -> FixedAgreement:
            if agreement_id != agreement.id:
                raise NotFoundError(agreement_id)
            return agreement

        def find_transfer(transfer_id: str) -> FixedTransfer:
            if transfer_id != transfer.id:
                raise NotFoundError(transfer_id)
            return transfer

        connect = lazy_store_connection(store_path, keys_dir)
        service = JobService(
            db,
            provider_id=pid,
            provider_jurisdiction="HK",
            key=key,
            agreement=find_agreement,
            transfer=find_transfer,
            consent=lambda: consent,
            connect=connect,
            record=audit.record,
            clock=clock,
            consumer=lambda _: ConsumerProfile(jurisdiction="HK", participant_type="university"),
            glm_max_iterations=count + 10,
        )
        app = FastAPI()
        install_problem_handlers(app)
        app.include_router(make_dataplane_router(lambda: service))
        token = mint_access_token(key, pid, CONSUMER, agreement.id, transfer.id, AS_OF, timedelta(days=1))
        auth = {"Authorization": f"Bearer {token}"}
        try:
            with serve(app) as url, httpx.Client(base_url=f"{url}/dataplane", timeout=30) as http:
                glm = _glm_figures(http, auth, policy, consent, connect, count)
                refresh = _refresh_figures(http, auth, key, pid, agreement.id, transfer.id, count)
        finally:
            audit.close()
            db.dispose()
    gate = _gate_figures(policy, dataset, service, count * 50)
    note = f"one site, {patients:,} patients, SQLite control DB, {count} calls at most"
    return [
        Figure("GLM step over HTTP, persisted session", "ms", glm[0], "lower",
               "in-process GlmSite(β), same design", glm[1], None, note),
        Figure("data-plane token refresh", "ms", refresh[0], "lower",
               "authenticated GET /dataplane/jobs/{id}", refresh[1], None, note),
        Figure("job decision via PolicyGate.decide", "decisions/s", gate[0], "higher",
               "pre-gate path: decide_transfer + evaluate(policy document)", gate[1], None,
               "aggregate-research agreement, phase JOB, HK consumer of HK data; the baseline "
               "compiles the policy on every call as the data plane did, the gate caches it"),
    ]  # fmt: skip


def _glm_figures(
    http: httpx.Client,
    auth: dict[str, str],
    policy: dict[str, Any],
    consent: ConsentService,
    connect: Callable[[], Any],
    count: int,
) -> tuple[list[float], list[float]]:
    r = http.post("/jobs", json={"scenario": SCENARIO, "spec": _GLM}, headers=auth)
    if r.status_code != 200:
        raise ConfigurationError(f"bench GLM session refused: {r.text[:300]}")
    job_id = r.json()["id"]
    spec = parse_spec(_GLM)
    cohort = consent.cohort(SCENARIO, data_classes_of(spec), actor="bench", at=AS_OF)
    site = GlmSite(DuckDBEngine(connect()), cohort, spec, "m", rules_from_policy(policy))
    beta = np.asarray([40.0, 1.0])
    body = {"analysis": "m", "beta": beta.tolist()}

    def step() -> None:
        if http.post(f"/glm/{job_id}", json=body, headers=auth).status_code != 200:
            raise ConfigurationError("bench GLM step failed")

    step()  # warm-up
    over_http = _timed(step, count)
    local = _timed(lambda: site(beta), count)
    http.post(f"/jobs/{job_id}/cancel", headers=auth)
    return over_http, local


def _refresh_figures(
    http: httpx.Client,
    auth: dict[str, str],
    key: SigningKey,
    pid: str,
    agreement_id: str,
    transfer_id: str,
    count: int,
) -> tuple[list[float], list[float]]:
    job = http.post("/jobs", json={"scenario": SCENARIO, "spec": _COUNT}, headers=auth).json()
    current = [mint_access_token(key, pid, CONSUMER, agreement_id, transfer_id, AS_OF)]

    def refresh() -> None:
        r = http.post("/token", headers={"Authorization": f"Bearer {current[0]}"})
        if r.status_code != 200:
            raise ConfigurationError(f"bench refresh refused: {r.text[:300]}")
        current[0] = r.json()["token"]  # each token refreshes once: follow the chain

    def read() -> None:
        if http.get(f"/jobs/{job['id']}", headers=auth).status_code != 200:
            raise ConfigurationError("bench job read failed")

    refresh()
    read()
    return _timed(refresh, count), _timed(read, count)


def _gate_figures(
    policy: dict[str, Any], dataset: str, service: JobService, decisions: int
) -> tuple[list[float], list[float]]:
    kw: dict[str, Any] = {"purpose": SCENARIO, "epsilon": None, "cell_size": 10}
    request = Request(
        target=dataset,
        consumer_id=CONSUMER,
        consumer_type="university",
        consumer_jurisdiction="HK",
        output_type="aggregate",
        execution_location="provider",
        phase=Phase.JOB,
        **kw,
    )
    start = AS_OF - timedelta(days=1)

    def gate() -> None:
        for _ in range(100):
            d = service.gate.decide(
                policy, dataset, CONSUMER, Phase.JOB, start, "aggregate", execution_location="provider", **kw
            )
            if not d.allowed:
                raise ConfigurationError(f"bench gate denied: {d.decision.reasons}")

    def before() -> None:
        for _ in range(100):
            border = decide_transfer(
                DEFAULT_RULES, "HK", "HK", "aggregate", dataset, CONSUMER, SCENARIO, (), AS_OF
            )
            facts = Facts(agreement_start=start, cross_border=cross_border_fact(border))
            if not evaluate(policy, request, facts, AS_OF).allowed:
                raise ConfigurationError("bench evaluate denied")

    batches = max(1, decisions // 100)
    gate_ms, before_ms = _timed(gate, batches), _timed(before, batches)
    return [100_000 / ms for ms in gate_ms], [100_000 / ms for ms in before_ms]
