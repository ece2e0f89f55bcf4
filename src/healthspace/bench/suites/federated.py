"""Federated study cost: cohort counts at three HTTP data planes through the lab, and the cost per job.

Three synthetic hospitals are loaded the way a hospital loads data (FHIR NDJSON → encrypted clinical
store; consent NDJSON → consent registry), each behind its own data plane (job service with policy
evaluation, consent cohort, run_job, Ed25519 signature, audit) served by uvicorn on loopback, each in
its own process as connectors are (the lab runs in the bench's process); the bench asks the site
processes over a pipe for their baselines and engine time, which never go through the product's API. Quick
mode: 300 patients per site. Full mode: 200,000 per site (about 10 M OMOP rows each): a 10,000-patient
hospital is ingested, then its rows and consents are replicated 20 times under new patient ids (the
patient's FHIR id with `-r<k>`, so store and registry agree on the person ids).

Figures, each with a baseline measured in the same run on the same stores:
* one `run_study` of a single-condition count (E11) end to end, p50 and p99; baseline the raw DuckDB
  count on the three stores, run in parallel (one per site process, as the lab's jobs run);
* the same for a count over 1,000 condition codes (an inclusion event listing 1,000 exact ICD-10 codes,
  six of them present in the data); baseline the raw DuckDB count with the same 1,000 codes;
* the cost per job of everything but the engine (HTTP, token, policy, consent cohort, guard, signing,
  audit, verification): one site's job end to end minus the time spent inside the engine's queries
  during that job (DuckDB's work and the engine's own set operations on cohort ids, as the compute
  suite counts them: `TimedEngine`, read in the site's process); baseline that engine time.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
from fastapi import FastAPI
from sqlalchemy import text

from healthspace.audit.log import AuditLog
from healthspace.bench.harness import Figure, serve
from healthspace.bench.suites.compute import TimedEngine, thousand_codes
from healthspace.compute.engine import OMOP_TABLES
from healthspace.connector.dataplane import (
    ConsumerProfile,
    FixedAgreement,
    FixedTransfer,
    JobService,
    make_dataplane_router,
)
from healthspace.connector.dsp.dataplane import mint_access_token
from healthspace.consent.fhir import PatientRefs
from healthspace.consent.service import ConsentService
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from healthspace.core.errors import ConfigurationError, NotFoundError, install_problem_handlers
from healthspace.core.ids import person_id_for
from healthspace.data.ingest import ingest_ndjson
from healthspace.data.keys import LocalKeyStore
from healthspace.data.schema import arrow_schema
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
_CODES = thousand_codes()
_SPEC_1000: dict[str, Any] = {
    "version": 1,
    "cohort": {"inclusion": [{"type": "event", "event": {"domain": "condition", "codes": _CODES}}]},
    "analyses": [{"type": "count", "id": "n"}],
}
_RAW_1000 = (
    "SELECT count(DISTINCT person_id) FROM condition_occurrence WHERE condition_source_value IN ("  # noqa: S608
    + ", ".join(f"$c{i}" for i in range(len(_CODES)))
    + ")"
)
_RAW_1000_PARAMS = {f"c{i}": c for i, c in enumerate(_CODES)}
# Full mode: a 10,000-patient hospital replicated 20 times = 200,000 patients per site.
_BASE, _COPIES = 10_000, 20
_TIME_BUDGET_S = 240.0  # per measured loop: the loops stop early rather than run for ever on a busy machine


def _say(msg: str) -> None:
    # Building three 200k-patient sites takes minutes: say where it is.
    print(f"  federated: {msg}", file=sys.stderr, flush=True)


class _Engines:
    """The data plane's engines (one per store connection, `TimedEngine`: seconds inside its queries,
    DuckDB's work and the engine's own set operations on cohort ids; not the consent registration)."""

    def __init__(self) -> None:
        self.made: list[TimedEngine] = []

    def __call__(self, con: duckdb.DuckDBPyConnection) -> TimedEngine:
        engine = TimedEngine(con)
        self.made.append(engine)
        return engine

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.made)


@dataclass
class _Hospital:
    site: Site
    connect: Any
    timed: _Engines
    store: ClinicalStore
    db: Database
    audit: AuditLog
    app: FastAPI


# Row keys re-derived per copy so that copies do not share ids (visit ids stay consistent across tables).
_ROW_KEYS = {
    "visit_occurrence": ("visit_occurrence_id",),
    "condition_occurrence": ("condition_occurrence_id", "visit_occurrence_id"),
    "drug_exposure": ("drug_exposure_id", "visit_occurrence_id"),
    "procedure_occurrence": ("procedure_occurrence_id", "visit_occurrence_id"),
    "measurement": ("measurement_id", "visit_occurrence_id"),
    "observation_period": ("observation_period_id",),
}


def _replicate(store_path: Path, keys_dir: Path, synth: Path, copies: int) -> None:
    """Append copies 1..copies-1 of every clinical row under new patients.

    Copy k of patient `P` is patient `P-r<k>`, person id `person_id_for("P-r<k>")`, as ingestion of
    such a patient would give (`_replicate_consents` gives their consents the same ids).
    """
    patients = [
        orjson.loads(line)["id"] for line in (synth / "fhir" / "Patient.ndjson").read_bytes().splitlines()
    ]
    old = [person_id_for(p) for p in patients]
    con = duckdb.connect()
    with ClinicalStore.open(store_path, LocalKeyStore(keys_dir)) as store, store.batch("replicas") as w:
        for k in range(1, copies):
            new = [person_id_for(f"{p}-r{k}") for p in patients]
            con.register("remap", pa.table({"old_id": old, "new_id": new}))
            for table in ("person", "death", *_ROW_KEYS):
                con.register("src", store.dataset(table))
                keys = "".join(
                    f", CAST(hash(s.{c}, {k}) >> 1 AS BIGINT) AS {c}" for c in _ROW_KEYS.get(table, ())
                )
                # Only table names from this module and column names of the store's schema enter the text.
                rows = con.execute(
                    f"SELECT s.* REPLACE (m.new_id AS person_id{keys}) FROM src s"  # noqa: S608
                    " JOIN remap m ON m.old_id = s.person_id"
                ).to_arrow_table()
                w.write(table, rows.select(arrow_schema(table).names).cast(arrow_schema(table)))
            if k % 5 == 0 or k == copies - 1:
                _say(f"{store_path.parent.name}: copy {k + 1}/{copies} written")
        w.finish({"batch_id": "replicas", "note": f"bench: {copies - 1} copies of every patient"})
    con.close()


def _replicate_consents(db: Database, copies: int) -> None:
    """Copies 1..copies-1 of every imported consent record, for patient `P-r<k>` (same times, scope).

    Copied inside the database: importing 190,000 more resources as FHIR NDJSON (or through the ORM)
    takes minutes per site and is not what is measured here; the base 10,000 patients' consents did go
    through the NDJSON import. SQLite only (the bench connector's database).
    """
    with db.session() as s:
        patients = s.execute(text("SELECT DISTINCT person_id, patient_id FROM consent_decisions")).all()
        if any(p is None for _, p in patients):
            raise ConfigurationError("an imported consent record has no patient id")
        s.execute(
            text("CREATE TEMP TABLE bench_remap (old_id BIGINT, k INTEGER, new_id BIGINT, patient TEXT)")
        )
        s.execute(
            text("INSERT INTO bench_remap VALUES (:o, :k, :n, :p)"),
            [
                {"o": old, "k": k, "n": person_id_for(f"{p}-r{k}"), "p": f"{p}-r{k}"}
                for k in range(1, copies)
                for old, p in patients
            ],
        )
        s.execute(
            text(
                "INSERT INTO consent_decisions (decision_id, fhir_id, person_id, patient_id, scenario_id,"
                " decision, decided_at, valid_from, valid_until, class_mask, recorded_at, source, actor)"
                " SELECT lower(hex(randomblob(16))), d.fhir_id || '-r' || m.k, m.new_id, m.patient,"
                " d.scenario_id, d.decision, d.decided_at, d.valid_from, d.valid_until, d.class_mask,"
                " d.recorded_at, d.source, d.actor"
                " FROM consent_decisions d JOIN bench_remap m ON m.old_id = d.person_id ORDER BY m.k, d.seq"
            )
        )
        s.execute(text("DROP TABLE bench_remap"))


def _hospital(root: Path, site: str, patients: int, seed: int, copies: int = 1) -> _Hospital:
    t0 = time.perf_counter()
    synth = generate(site, patients, seed, root / site / "synth", progress=False).out
    fhir = [p for p in sorted((synth / "fhir").glob("*.ndjson")) if p.name != "Consent.ndjson"]
    store_path, keys_dir = root / site / "clinical", root / site / "keys"
    with ClinicalStore.create(store_path, f"{site}-ehr", LocalKeyStore(keys_dir)) as store:
        ingest_ndjson(store, fhir)
    if copies > 1:
        _replicate(store_path, keys_dir, synth, copies)
        _say(f"{site}: {patients * copies:,} patients stored ({time.perf_counter() - t0:.0f} s)")
    pid, dataset = f"{site}-hospital", f"urn:healthspace:{site}-hospital:t2d-cohort"
    clock, key = FixedClock(AS_OF), SigningKey.generate()
    db = Database(
        f"sqlite:///{root / site / 'connector.db'}", branches=("audit", "consent", "compute", "jobs")
    )
    audit = AuditLog(db, key, clock)
    consent = ConsentService(db, audit, key, pid, PatientRefs(f"{site}-pat-"), clock=clock)
    consent.import_ndjson((synth / "fhir" / "Consent.ndjson").read_bytes().splitlines(), actor="bench")
    if copies > 1:
        _replicate_consents(db, copies)
        _say(f"{site}: consents imported ({time.perf_counter() - t0:.0f} s)")
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

    store = ClinicalStore.open(store_path, LocalKeyStore(keys_dir))
    # Read one row through pyarrow first: pyarrow creates its KMS client (Python code) on the first
    # decryption under a lock of its own; when that first decryption happens inside a DuckDB scan, the
    # thread running it can wait for that lock while holding the GIL the creating thread needs, and both
    # hang (seen twice at 200,000 patients). Created here, the client is cached for the scans.
    store.dataset("person").head(1)
    con = store.connect(in_memory=True)  # as the connector's data plane opens it (lazy_store_connection)
    timed = _Engines()
    service = JobService(
        db,
        provider_id=pid,
        provider_jurisdiction="CN-GD" if site in ("gz", "sz") else "HK",
        key=key,
        agreement=find_agreement,
        transfer=find_transfer,
        consent=lambda: consent,
        connect=lambda: con,
        engine=timed,
        record=audit.record,
        record_many=audit.append_many,
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
    return _Hospital(
        Site(pid, "", token, agreement.id, key.public_key_b64), lambda: con, timed, store, db, audit, app
    )


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- one process per hospital ----------------------------------------------------------------------

_BUILD_TIMEOUT_S = 1800.0  # building a 200,000-patient site takes minutes, more when three share 2 cores
_REPLY_TIMEOUT_S = 120.0  # any other request to a site process
_IDLE_TIMEOUT_S = 3600.0  # a site process left without requests this long stops by itself


def _site_main(conn: Connection, root: str, site: str, patients: int, seed: int, copies: int) -> None:
    """A hospital's own process, as a connector is: build the site, serve its data plane on loopback,
    and answer the bench over `conn`: `raw` / `raw_1000` (run the baseline count on this store, reply
    its milliseconds), `engine` (seconds spent inside the engine's queries so far), `stop`."""
    try:
        h = _hospital(Path(root), site, patients, seed, copies)
        with serve(h.app) as url:
            con = h.connect()
            rows = sum(
                int(con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0])  # noqa: S608
                for t in OMOP_TABLES
            )
            conn.send(
                (
                    "ok",
                    {
                        "id": h.site.id,
                        "endpoint": f"{url}/dataplane",
                        "token": h.site.token,
                        "agreement_id": h.site.agreement_id,
                        "public_key": h.site.public_key,
                        "rows": rows,
                        "expected": int(con.execute(_RAW).fetchall()[0][0]),
                    },
                )
            )
            while conn.poll(_IDLE_TIMEOUT_S):
                cmd = conn.recv()
                if cmd == "stop":
                    break
                if cmd == "engine":
                    conn.send(("ok", h.timed.seconds))
                    continue
                sql, params = (_RAW, None) if cmd == "raw" else (_RAW_1000, _RAW_1000_PARAMS)
                t0 = time.perf_counter()
                con.execute(sql, params).fetchall()
                conn.send(("ok", (time.perf_counter() - t0) * 1000))
        h.audit.close()
        h.db.dispose()
        h.store.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


class _SiteProcess:
    """The bench's handle on one hospital process (spawned: a fork would copy DuckDB's threads' state)."""

    def __init__(self, ctx: Any, root: Path, site: str, patients: int, seed: int, copies: int) -> None:
        self.name = site
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_site_main, args=(child, str(root), site, patients, seed, copies), daemon=True
        )
        self.proc.start()
        child.close()
        self.info: dict[str, Any] = {}

    def send(self, cmd: str) -> None:
        self.conn.send(cmd)

    def reply(self, timeout: float = _REPLY_TIMEOUT_S) -> Any:
        if not self.conn.poll(timeout):
            raise ConfigurationError(f"bench site {self.name} did not answer within {timeout:.0f} s")
        kind, value = self.conn.recv()
        if kind == "error":
            raise ConfigurationError(f"bench site {self.name} failed:\n{value}")
        return value

    def ask(self, cmd: str) -> Any:
        self.send(cmd)
        return self.reply()

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # the process may be gone already
            self.conn.send("stop")
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.terminate()  # our own child, by its handle
            self.proc.join(timeout=10)


def _studies(study: Study, runs: int, raw: Any) -> tuple[list[float], list[float]]:
    """`runs` lab studies (bounded by `_TIME_BUDGET_S` too), each followed by the raw baseline: ms lists."""
    lab_ms: list[float] = []
    raw_ms: list[float] = []
    run_study(study)  # warm-up: opens stores, compiles, connects
    deadline = time.monotonic() + _TIME_BUDGET_S
    for _ in range(runs):
        t0 = time.perf_counter()
        result = run_study(study)
        lab_ms.append((time.perf_counter() - t0) * 1000)
        if not result.complete:
            raise ConfigurationError(f"bench study failed: {[s.to_dict() for s in result.sites]}")
        raw_ms.append(raw())
        if time.monotonic() > deadline:
            break
    return lab_ms, raw_ms


def run(quick: bool) -> list[Figure]:
    patients, copies, runs = (300, 1, 15) if quick else (_BASE, _COPIES, 200)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            _SiteProcess(ctx, Path(tmp), s, patients, i, copies)
            for i, s in enumerate(("gz", "sz", "hk"), start=1)
        ]
        try:
            for p in procs:
                p.info = p.reply(_BUILD_TIMEOUT_S)
            sites = [
                Site(
                    p.info["id"],
                    p.info["endpoint"],
                    p.info["token"],
                    p.info["agreement_id"],
                    p.info["public_key"],
                )
                for p in procs
            ]
            rows, expected = procs[0].info["rows"], sum(p.info["expected"] for p in procs)

            def parallel(cmd: str) -> Callable[[], float]:
                # The three stores counted at once, each in its own process, as the lab's jobs run:
                # the wall time from asking to the last answer.
                def go() -> float:
                    t0 = time.perf_counter()
                    for p in procs:
                        p.send(cmd)
                    for p in procs:
                        p.reply()
                    return (time.perf_counter() - t0) * 1000

                return go

            _say("measuring the single-condition count")
            lab_ms, raw_ms = _studies(Study(SCENARIO, _SPEC, sites), runs, parallel("raw"))
            _say("measuring the count by 1,000 codes")
            k_ms, k_raw_ms = _studies(Study(SCENARIO, _SPEC_1000, sites), runs, parallel("raw_1000"))

            # Cost per job: one site, one job at a time, so the engine time its process reports before
            # and after a study is exactly that job's.
            _say("measuring the cost per job")
            one, gz = Study(SCENARIO, _SPEC, sites[:1]), procs[0]
            e2e_ms: list[float] = []
            engine_ms: list[float] = []
            over_ms: list[float] = []
            one_raw_ms: list[float] = []
            run_study(one)
            deadline = time.monotonic() + _TIME_BUDGET_S
            for _ in range(runs):
                e0 = gz.ask("engine")
                t0 = time.perf_counter()
                run_study(one)
                e2e = (time.perf_counter() - t0) * 1000
                eng = (gz.ask("engine") - e0) * 1000
                e2e_ms.append(e2e)
                engine_ms.append(eng)
                over_ms.append(e2e - eng)
                one_raw_ms.append(gz.ask("raw"))  # timed inside the site's process
                if time.monotonic() > deadline:
                    break
        finally:
            for p in procs:
                p.stop()
    size = f"3 sites x {patients * copies:,} patients ({rows:,} OMOP rows at the first), one process each"
    note = (
        f"{size}, {len(lab_ms)} studies; consenting E11 cohort counted (raw E11 persons, all consents: "
        f"{expected:,}); baseline: raw DuckDB count on the same 3 stores, run in parallel (one per site "
        "process, as the lab's jobs run), wall time from asking to the last answer, after each study"
    )
    note_k = (
        f"{size}, {len(k_ms)} studies; inclusion on one condition event listing 1,000 exact ICD-10 codes "
        "(6 present in the data, 994 absent), counted; baseline: raw DuckDB count(DISTINCT person_id) "
        "with the same 1,000 codes IN (...) on the 3 stores in parallel (wall time)"
    )
    note_job = (
        f"gz site, {len(e2e_ms)} sequential single-site studies of the E11 count: HTTP, token, policy, "
        "consent cohort, guard, signing, audit, lab verification; engine = time inside the engine's queries "
        "during the job (DuckDB and the engine's set operations on cohort ids, not the consent "
        "registration), reported by the site's process; raw count timed inside that process"
    )
    k50, k99 = _quantile(k_ms, 0.5), _quantile(k_ms, 0.99)
    return [
        Figure(
            "federated count p50 (3 sites, lab end to end)",
            "ms",
            [_quantile(lab_ms, 0.5)],
            "lower",
            "raw engine count x3",
            raw_ms,
            100.0,
            note,
        ),
        Figure(
            "federated count p99 (3 sites, lab end to end)",
            "ms",
            [_quantile(lab_ms, 0.99)],
            "lower",
            "raw engine count x3",
            raw_ms,
            None,
            note,
        ),
        Figure(
            "count by 1,000 codes p50 (3 sites, lab end to end)",
            "ms",
            [k50],
            "lower",
            "raw engine count, 1,000 codes x3",
            k_raw_ms,
            300.0,
            note_k,
        ),
        Figure(
            "count by 1,000 codes p99 (3 sites, lab end to end)",
            "ms",
            [k99],
            "lower",
            "raw engine count, 1,000 codes x3",
            k_raw_ms,
            2 * k50,
            note_k + "; target: 2 x its p50",
        ),
        Figure(
            "one job end to end (1 site, lab)",
            "ms",
            e2e_ms,
            "lower",
            "raw engine count (1 store)",
            one_raw_ms,
            None,
            note_job,
        ),
        Figure(
            "one job: everything but the engine",
            "ms",
            over_ms,
            "lower",
            "engine time in the job",
            engine_ms,
            5.0,
            note_job,
        ),
    ]
