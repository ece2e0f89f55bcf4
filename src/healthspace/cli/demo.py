"""`healthspace demo`: a small but real data space on loopback, each service its own process.

The demo drives the same paths an operator would: it initialises each service on disk, starts it,
onboards participants through the authority's admin API with the public keys the connectors made,
installs their credentials, seeds scenarios, and (with --once) proves the trust chain between every
pair of connectors and verifies every audit log offline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.table import Table

from healthspace.audit.models import SignedTreeHead
from healthspace.audit.verify import verify_lines
from healthspace.authority.app import init_authority
from healthspace.authority.seed import DEMO_SCENARIOS
from healthspace.client import AuthorityClient, ConnectorClient
from healthspace.connector.app import init_connector, install_credential, public_key_of
from healthspace.connector.config import ConnectorConfig
from healthspace.core.apikeys import Role
from healthspace.core.clock import utcnow
from healthspace.core.errors import HealthspaceError
from healthspace.core.settings import Settings
from healthspace.data.profile import default_profile
from healthspace.policy.templates import template
from healthspace.protocol.schemas import SCHEMA_DIR_ENV, find_schema_dir

__all__ = ["DEMO_PARTICIPANTS", "run_demo"]

AUTHORITY_ID = "gba-health-data-authority"
AUTHORITY_NAME = "Greater Bay Area Health Data Space Authority"
STARTUP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DemoParticipant:
    id: str
    legal_name: str
    type: str
    jurisdiction: str
    roles: tuple[str, ...]
    site: str | None = None  # synthetic population profile (hospitals only)


DEMO_PARTICIPANTS: tuple[DemoParticipant, ...] = (
    DemoParticipant(
        "gz-pearl-river-hospital",
        "Pearl River General Hospital, Guangzhou",
        "hospital",
        "CN-GD",
        ("data-provider",),
        site="gz",
    ),
    DemoParticipant(
        "sz-bay-medical-centre",
        "Shenzhen Bay Medical Centre",
        "hospital",
        "CN-GD",
        ("data-provider",),
        site="sz",
    ),
    DemoParticipant(
        "hk-harbour-hospital",
        "Victoria Harbour Hospital, Hong Kong",
        "hospital",
        "HK",
        ("data-provider",),
        site="hk",
    ),
    DemoParticipant(
        "hk-harbour-university",
        "Harbour University School of Public Health",
        "university",
        "HK",
        ("data-consumer",),
    ),
)


@dataclass
class Service:
    id: str
    kind: str  # "authority" or "connector"
    data_dir: Path
    port: int
    api_keys: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _free_ports(start: int, count: int) -> list[int]:
    ports: list[int] = []
    port = start
    while len(ports) < count and port < start + 1000:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                ports.append(port)
            except OSError:
                pass
        port += 1
    if len(ports) < count:
        raise RuntimeError(f"no {count} free TCP ports from {start}")
    return ports


def _start(svc: Service, schemas: Path) -> None:
    log = (svc.data_dir / "service.log").open("ab")
    env = {**os.environ, "HEALTHSPACE_DATA_DIR": str(svc.data_dir), SCHEMA_DIR_ENV: str(schemas)}
    env.pop("HEALTHSPACE_DATABASE_URL", None)  # each demo service keeps its own SQLite database
    svc.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed arguments
        [
            sys.executable,
            "-m",
            "healthspace",
            svc.kind,
            "serve",
            "--data-dir",
            str(svc.data_dir),
            "--port",
            str(svc.port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _wait_healthy(svc: Service) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if svc.process is not None and svc.process.poll() is not None:
            raise RuntimeError(f"{svc.id} exited at start; see {svc.data_dir / 'service.log'}")
        try:
            if httpx.get(f"{svc.url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{svc.id} did not answer on {svc.url} within {STARTUP_TIMEOUT_S:.0f} s")


def _stop(services: list[Service]) -> None:
    for svc in services:
        if svc.process and svc.process.poll() is None:
            svc.process.send_signal(signal.SIGTERM)
    for svc in services:
        if svc.process is None:
            continue
        try:
            svc.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            svc.process.kill()
            svc.process.wait()


def _generate_populations(root: Path, patients: int, console: Console) -> dict[str, dict[str, Any]]:
    """Each hospital's synthetic population, written as its EHR export into the connector's import folder."""
    from healthspace.synth.generate import generate

    out: dict[str, dict[str, Any]] = {}
    for seed, p in enumerate((p for p in DEMO_PARTICIPANTS if p.site is not None), start=1):
        assert p.site is not None
        console.print(f"[bold]{p.legal_name}[/bold]: {patients:,} synthetic patients (site {p.site}) ...")
        summary = generate(
            p.site, patients, seed, root / p.id / "import" / "synth", progress=console.is_terminal
        )
        out[p.id] = {
            "site": p.site,
            "patients": patients,
            "seed": seed,
            "synth": str(summary.out),
            "synth_rows": summary.total_rows,
        }
    return out


def _load_clinical_data(
    hospitals: list[Service], populations: dict[str, dict[str, Any]], standard: str, console: Console
) -> None:
    """Each hospital's steward loads its EHR export the way real data is loaded: through the connector's
    data API, validated against the data standard the authority publishes (the connector fetches it)
    into the encrypted store with signed provenance, then quality-checked and published."""
    for svc in hospitals:
        dataset = f"{svc.id}-ehr"
        fhir = sorted(Path(populations[svc.id]["synth"], "fhir").glob("*.ndjson"))
        paths = [f"synth/fhir/{f.name}" for f in fhir if f.name != "Consent.ndjson"]
        with ConnectorClient(svc.url, svc.api_keys[Role.STEWARD.value], timeout=900) as steward:
            console.print(f"{svc.id}: loading {dataset} through the connector's data API ...")
            steward.create_dataset(dataset)
            reports = steward.ingest(dataset, paths, f"{svc.id} EHR (synthetic export)", standard)
            quality = steward.quality(dataset)
            steward.move_dataset(dataset, "curated", "quality checked")
            steward.move_dataset(dataset, "published", "offered for research under the demo scenarios")
        inserted = sum(sum(r["inserted"].values()) for r in reports)
        rejected = sum(r["rejected"] for r in reports)
        console.print(
            f"  loaded {inserted:,} rows, rejected {rejected:,}; quality score {quality['score']:.1%} "
            f"({quality['passed']} of {quality['passed'] + quality['failed']} checks passed)"
        )
        populations[svc.id].update(
            dataset=dataset,
            standard=standard,
            ingest={
                "batches": [r["batch_id"] for r in reports],
                "read": sum(r["read"] for r in reports),
                "inserted": inserted,
                "rejected": rejected,
                "unmapped": sum(sum(r["unmapped"].values()) for r in reports),
            },
            quality={
                "score": round(quality["score"], 4),
                "passed": quality["passed"],
                "failed": quality["failed"],
            },
        )


def _self_check(authority: Service, connectors: list[Service]) -> dict[str, Any]:
    """Every connector authenticates to every other; every audit log verifies offline."""
    trust: list[dict[str, Any]] = []
    for a in connectors:
        with ConnectorClient(a.url, a.api_keys[Role.ADMIN.value]) as client:
            for b in connectors:
                if a is b:
                    continue
                r = client.trust_check(b.url)
                trust.append(
                    {
                        "from": a.id,
                        "to": b.id,
                        "authenticated": r["authenticated"],
                        "mutual": r["mutual"],
                        "detail": r["detail"],
                    }
                )
    audits: dict[str, Any] = {}
    for svc in [authority, *connectors]:
        client_type = AuthorityClient if svc.kind == "authority" else ConnectorClient
        with client_type(svc.url, svc.api_keys[Role.ADMIN.value]) as client:
            public_key = client.describe()["public_key"]
            head = SignedTreeHead.from_json(client.tree_head())
            entries = client.audit_entries(0, head.tree_size)
        # Offline verification, as an auditor would: recompute every leaf and the root, check the signature.
        lines = (orjson.dumps(item, option=orjson.OPT_SORT_KEYS) for item in entries)
        report = verify_lines(lines, head, public_key)
        audits[svc.id] = {
            "entries": head.tree_size,
            "root": head.root_hash,
            "valid": report.ok,
            "problem": report.reason,
        }
    ok = all(t["mutual"] for t in trust) and all(a["valid"] for a in audits.values())
    return {"ok": ok, "trust": trust, "audit": audits}


def _import_consents(root: Path, hospitals: list[Service]) -> dict[str, dict[str, int]]:
    """Each hospital's steward loads its patients' consent decisions (FHIR R4 Consent NDJSON) into the
    connector's consent registry; the result is how many patients each scenario may use."""
    counts: dict[str, dict[str, int]] = {}
    for svc in hospitals:
        with ConnectorClient(svc.url, svc.api_keys[Role.STEWARD.value], timeout=120) as steward:
            steward.import_consents(
                (root / svc.id / "import" / "synth" / "fhir" / "Consent.ndjson").read_bytes()
            )
            counts[svc.id] = {
                s.id: steward.consent_cohort(s.id, list(s.data_classes)) for s in DEMO_SCENARIOS
            }
    return counts


SCENARIO = "diabetes-outcomes-research"
# Each hospital offers the same clinical data twice: for aggregates under a privacy budget (DP counts
# and histograms), and for fitting models without a budget under the provider's disclosure checks.
AGGREGATE_DATASET = "t2d-cohort"
MODEL_DATASET = "t2d-model"


def _offers(hospital_id: str) -> list[dict[str, Any]]:
    """The two datasets each hospital publishes, with offers from the steward templates."""
    aggregate = template(
        "aggregate-research",
        scenario=SCENARIO,
        k=10,
        epsilon=3.0,
        valid_for_days=365,
        uid=f"urn:healthspace:{hospital_id}:offer:t2d-aggregate",
        assigner=hospital_id,
    )
    model = template(
        "federated-model",
        scenario=SCENARIO,
        epsilon=None,  # no DP budget: GLMs run under the disclosure checks instead
        valid_for_days=365,
        uid=f"urn:healthspace:{hospital_id}:offer:t2d-model",
        assigner=hospital_id,
    )
    return [
        {
            "id": f"urn:healthspace:{hospital_id}:{AGGREGATE_DATASET}",
            "title": "Type 2 diabetes cohort",
            "description": "Adults with type 2 diabetes, with HbA1c, eGFR and treatments; aggregates only.",
            "keywords": ["diabetes", "cohort"],
            "offer": aggregate,
        },
        {
            "id": f"urn:healthspace:{hospital_id}:{MODEL_DATASET}",
            "title": "Diabetes outcomes: federated model fitting",
            "description": "The same adults' demographics, problem list, HbA1c and deaths, for models "
            "fitted where the data live (only coefficients leave); disclosure-checked, no privacy budget.",
            "keywords": ["diabetes", "model", "federated"],
            "offer": model,
        },
    ]


def _register_export_approvals(admin: AuthorityClient, university_id: str) -> list[dict[str, Any]]:
    """Models count as record-level output under PIPL: the mainland hospitals' model datasets may go to
    Hong Kong only with a registered export approval (docs/policy), which the authority records."""
    out = []
    for p in DEMO_PARTICIPANTS:
        if p.site is None or p.jurisdiction != "CN-GD":
            continue
        approval = admin.register_export_approval(
            {
                "provider_id": p.id,
                "dataset_id": f"urn:healthspace:{p.id}:{MODEL_DATASET}",
                "consumer_id": university_id,
                "scenario_id": SCENARIO,
                "reference": f"CAC-DEMO-{p.site.upper()}-2026-001",
                "expires_at": (utcnow() + timedelta(days=365)).isoformat(),
            }
        )
        out.append({"provider": p.id, "dataset": approval["dataset_id"], "reference": approval["reference"]})
    return out


def _contracts(hospitals: list[Service], university: Service) -> dict[str, Any]:
    """Each hospital publishes its diabetes cohort under an aggregate-research offer and again under a
    federated-model offer; the university finds both in the hospital's catalog, negotiates each over
    DSP and starts a compute-to-data transfer. Then one request that asks for more than the offer
    allows, refused with the reason."""
    results: list[dict[str, Any]] = []
    researcher = ConnectorClient(university.url, university.api_keys[Role.RESEARCHER.value], timeout=30)
    with researcher:
        for h in hospitals:
            with ConnectorClient(h.url, h.api_keys[Role.STEWARD.value]) as steward:
                for dataset in _offers(h.id):
                    steward.publish_dataset(dataset)
            for dataset in _offers(h.id):
                dataset_id = dataset["id"]
                found = researcher.query_catalog(h.url, [{"id": dataset_id}])["dataset"][0]
                policy = {**found["hasPolicy"][0], "target": dataset_id}
                neg = researcher.start_negotiation(h.url, policy)
                neg = researcher.negotiation(neg["id"], ["FINALIZED", "TERMINATED"])
                entry: dict[str, Any] = {
                    "provider": h.id,
                    "dataset": dataset_id,
                    "negotiation": neg["state"],
                    "agreement": neg["agreement_id"],
                    "transfer": None,
                }
                if neg["state"] == "FINALIZED":
                    t = researcher.start_transfer(neg["agreement_id"])
                    t = researcher.transfer(t["id"], ["STARTED", "TERMINATED"])
                    entry["transfer"] = t["state"]
                    entry["data_address"] = (t.get("data_address") or {}).get("endpoint")
                else:
                    entry["reason"] = neg.get("terminal_reason")
                results.append(entry)

        # Asking for more than offered: the same policy without its output restriction.
        h = hospitals[0]
        dataset_id = f"urn:healthspace:{h.id}:{AGGREGATE_DATASET}"
        broader = researcher.query_catalog(h.url, [{"id": dataset_id}])["dataset"][0]["hasPolicy"][0]
        for rule in broader["permission"]:
            rule["constraint"] = [c for c in rule["constraint"] if c["leftOperand"] != "outputType"]
        neg = researcher.start_negotiation(h.url, {**broader, "target": dataset_id})
        neg = researcher.negotiation(neg["id"], ["FINALIZED", "TERMINATED"])
        denied = {
            "provider": h.id,
            "dataset": dataset_id,
            "request": "aggregate-research offer without its outputType=aggregate constraint",
            "negotiation": neg["state"],
            "reason": neg["terminal_reason"],
        }
    ok = all(r["negotiation"] == "FINALIZED" and r["transfer"] == "STARTED" for r in results)
    return {
        "ok": ok and denied["negotiation"] == "TERMINATED",
        "agreed": results,
        "refused": denied,
        "decisions": _policy_decisions(h),
    }


def _policy_decisions(hospital: Service) -> list[dict[str, Any]]:
    """The hospital's audited policy decisions on the university's requests, allowed and denied, with
    their reasons: what a regulator reads to see why each use was or was not permitted."""
    with ConnectorClient(hospital.url, hospital.api_keys[Role.REGULATOR.value]) as regulator:
        size = regulator.tree_head()["tree_size"]
        entries = [item["entry"] for item in regulator.audit_entries(0, size)]
    return [
        {
            "outcome": e["outcome"],
            "check": e["details"].get("check"),
            "phase": e["details"].get("phase"),
            "scenario": e["scenario_id"],
            "agreement": e["agreement_id"],
            "reasons": e["reason"],
        }
        for e in entries
        if e["action"] == "policy.decision"
    ]


def _print_contracts(contracts: dict[str, Any], console: Console) -> None:
    table = Table("provider", "dataset", "negotiation", "transfer")
    for c in contracts["agreed"]:
        table.add_row(c["provider"], c["dataset"], c["negotiation"], c["transfer"] or "-")
    console.print(table)
    refused = contracts["refused"]
    console.print(
        f"refused on purpose: {refused['request']} -> {refused['negotiation']}: {refused['reason']}"
    )


# The demo's example study: adults with type 2 diabetes (ICD-10 E11*), how many per site, by sex and age
# band, and their HbA1c at the index visit (LOINC 4548-4) by band x sex x age band. The aggregate
# agreements set a privacy budget of ε 3, so every figure is released with differential privacy: ε 1.5
# per study, ε 0.5 per release (discrete Laplace, scale 2), after which noisy cells below 10 are hidden.
HBA1C_BANDS = [4.0, 6.5, 7.0, 8.0, 9.0, 10.0, 15.0]  # %: at target < 7, then each point above
AGE_BREAKS = [18, 45, 65, 120]
# The index date is the first HbA1c test: the hospitals' first (index) visit, where every patient has
# one. The start of observation would not do: loaded records reach back to old problem-list entries.
INDEX_VISIT: dict[str, Any] = {
    "kind": "first_event",
    "event": {"domain": "measurement", "codes": ["4548-4"]},
}
DEMO_STUDY: dict[str, Any] = {
    "version": 1,
    "cohort": {
        "index": INDEX_VISIT,
        "inclusion": [
            {"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}
        ],
    },
    "analyses": [
        {"type": "count", "id": "t2d_patients"},
        {
            "type": "stratified_count",
            "id": "by_sex_and_age",
            "by": [{"var": "sex"}, {"var": "age_group", "breaks": AGE_BREAKS}],
        },
        {
            "type": "measurement_histogram",
            "id": "hba1c_by_sex_and_age",
            "code": "4548-4",
            "window": {"from_days": 0, "to_days": 0},
            "bands": HBA1C_BANDS,
            "by": [{"var": "sex"}, {"var": "age_group", "breaks": AGE_BREAKS}],
        },
    ],
    "privacy": {"epsilon": 1.5, "mechanism": "laplace"},
}


def _has(prefix: str) -> dict[str, Any]:
    """1 when the condition is on the problem list at the index visit (as the generator's outcome model)."""
    return {
        "kind": "has",
        "criterion": {
            "type": "event",
            "event": {"domain": "condition", "codes": [prefix], "match": "prefix"},
            "window": {"to_days": 0},
        },
    }


# The demo's model: death during follow-up, logistic in what was known at the index visit. The synthetic
# hospitals draw deaths from exactly this model (healthspace.synth.model.OUTCOME_COEFFICIENTS), so the
# fit should recover those coefficients within its standard errors.
DEMO_MODEL: dict[str, Any] = {
    "version": 1,
    "cohort": {"index": INDEX_VISIT},
    "analyses": [
        {
            "type": "glm",
            "id": "death",
            "family": "binomial",
            "outcome": {"kind": "has", "criterion": {"type": "event", "event": {"domain": "death"}}},
            "covariates": [
                {"kind": "age", "center": 60, "scale": 10},
                {"kind": "male"},
                {"kind": "value", "code": "4548-4", "window": {"from_days": 0, "to_days": 0}, "center": 6.0},
                _has("N18"),
                _has("I25"),
                _has("J44"),
            ],
        }
    ],
}
# Readable names of the model's terms, and the generator's coefficient for each.
MODEL_TERMS: tuple[tuple[str, str], ...] = (
    ("intercept", "intercept"),
    ("age, per 10 years from 60", "age_per_10y"),
    ("male", "male"),
    ("HbA1c, per % from 6.0", "hba1c_per_pct"),
    ("chronic kidney disease", "ckd"),
    ("ischaemic heart disease", "ihd"),
    ("COPD", "copd"),
)


def _study(university: Service, space: dict[str, Any]) -> dict[str, Any]:
    """The university runs the example study over its STARTED aggregate transfers: the lab fans the job
    out, each hospital checks policy and consent, runs it, applies disclosure control and signs; the
    lab combines."""
    from healthspace.cli.study import load_sites
    from healthspace.lab import Study, run_study

    sites = load_sites(space, university.id, datasets=[AGGREGATE_DATASET])
    result = run_study(Study(SCENARIO, DEMO_STUDY, sites), timeout_s=60)
    return {
        "complete": result.complete,
        "combined": result.combined,
        "provenance": result.provenance,
        "sites": [
            {
                "site": o.site,
                "status": o.status,
                "epsilon_spent": o.epsilon_spent,
                "ms": round(o.elapsed_ms, 1),
                "detail": o.detail,
                "reasons": o.reasons,
                # the site's signed, verified release (noisy and suppressed as published)
                "analyses": (o.result or {}).get("result", {}).get("analyses"),
            }
            for o in result.sites
        ],
    }


def _model(university: Service, space: dict[str, Any]) -> dict[str, Any]:
    """The university fits the logistic model across the hospitals over its STARTED model transfers:
    each hospital builds its design matrix once and answers every Newton step with signed aggregates."""
    from healthspace.cli.study import load_sites
    from healthspace.lab import Study, fit_federated_glm
    from healthspace.synth import OUTCOME_COEFFICIENTS

    sites = load_sites(space, university.id, datasets=[MODEL_DATASET])
    try:
        result = fit_federated_glm(Study(SCENARIO, DEMO_MODEL, sites), "death", timeout_s=60)
    except HealthspaceError as exc:  # a site failing mid-fit: report it, the rest of the demo stands
        return {"ok": False, "detail": exc.detail, "sites": [], "site_rows": {}}
    rows = {}
    for o in result.sites:
        analyses = ((o.result or {}).get("result") or {}).get("analyses") or {}
        rows[o.site] = (analyses.get("death") or {}).get("rows")
    out: dict[str, Any] = {
        "ok": result.fit is not None and result.fit.converged,
        "family": "binomial",
        "outcome": "death during follow-up",
        "detail": result.detail,
        "sites": [{"site": o.site, "status": o.status, "detail": o.detail} for o in result.sites],
        "site_rows": rows,
    }
    if result.fit is None:
        return out
    fit = result.fit
    out.update(
        n=fit.n,
        iterations=fit.iterations,
        converged=fit.converged,
        deviance=fit.deviance,
        terms=[
            {
                "term": label,
                "name": name,
                "coef": float(c),
                "se": float(se),
                "generator": OUTCOME_COEFFICIENTS[key],
            }
            for (label, key), name, c, se in zip(MODEL_TERMS, fit.names, fit.coef, fit.se, strict=True)
        ],
    )
    return out


def _cell(v: Any) -> str:
    return "·" if v is None else f"{v:,}"


def _combined_cell(study: dict[str, Any], analysis: str, *path: int | str) -> str:
    """A combined figure as text: '·' when every hospital hid it, '≥n' when some did (the sum then
    counts only the hospitals that published it), else n."""

    def at(doc: Any) -> Any:
        for key in path:
            doc = doc[key]
        return doc

    combined = at(study["combined"][analysis])
    hidden = any(
        at((s.get("analyses") or {})[analysis]) is None for s in study["sites"] if s["status"] == "ok"
    )
    if combined is None or (hidden and combined == 0):
        return "·"
    return f"≥{combined:,}" if hidden else f"{combined:,}"


def _print_results(study: dict[str, Any], model: dict[str, Any], console: Console) -> None:
    """The combined study and the model as tables: what a researcher reads."""
    combined = study["combined"]
    sites = Table("hospital", "status", "ε spent", "T2D patients (DP)", title="example study, per hospital")
    for s in study["sites"]:
        n = ((s.get("analyses") or {}).get("t2d_patients") or {}).get("count")
        sites.add_row(s["site"], s["status"], f"{s['epsilon_spent']:g}", _cell(n))
    total = combined.get("t2d_patients", {})
    sites.add_row(
        "[bold]combined[/bold]", "", "", _combined_cell(study, "t2d_patients", "count") if total else "-"
    )
    console.print(sites)

    strat = combined.get("by_sex_and_age")
    if strat and "counts" in strat:
        ages = strat["levels"][1]
        t = Table("sex", *ages, title="T2D patients by sex and age band (combined, DP)")
        for i, sex in enumerate(strat["levels"][0]):
            t.add_row(
                sex, *(_combined_cell(study, "by_sex_and_age", "counts", i, j) for j in range(len(ages)))
            )
        console.print(t)

    aid = "hba1c_by_sex_and_age"
    hist = combined.get(aid)
    if hist and "counts" in hist:
        sexes, ages = hist["levels"]
        t = Table(
            "sex",
            "age",
            *(f"{b} %" if b != "other" else b for b in hist["bands"]),
            title="HbA1c at the index visit: T2D patients by band, sex and age (combined, DP)",
        )
        for i, sex in enumerate(sexes):
            for j, age in enumerate(ages):
                row = [hist["counts"][b][i][j] for b in range(len(hist["bands"]))]
                if all(v in (None, 0) for v in row):
                    continue  # e.g. sex 'other' or ages outside the bands: nothing to show
                cells = (_combined_cell(study, aid, "counts", b, i, j) for b in range(len(hist["bands"])))
                t.add_row(sex, age, *cells)
        bands = range(len(hist["bands"]))
        t.add_row("[bold]all[/bold]", "", *(_combined_cell(study, aid, "band_totals", b) for b in bands))
        console.print(t)
    console.print(
        "· = hidden at every hospital (noisy count below 10); ≥n = hidden at some, n sums the others."
    )

    if not model.get("terms"):
        console.print(f"[red]model not fitted[/red]: {model.get('detail')}")
        return
    m = Table(
        "term",
        "coefficient",
        "SE",
        "95% CI",
        "generator",
        title=f"logistic regression of {model['outcome']} (n = {model['n']:,}, "
        f"{model['iterations']} Newton steps)",
    )
    for term in model["terms"]:
        lo, hi = term["coef"] - 1.96 * term["se"], term["coef"] + 1.96 * term["se"]
        m.add_row(
            term["term"],
            f"{term['coef']:+.3f}",
            f"{term['se']:.3f}",
            f"{lo:+.2f} to {hi:+.2f}",
            f"{term['generator']:+.2f}",
        )
    console.print(m)
    rows = ", ".join(f"{site}: {_cell(n)}" for site, n in model["site_rows"].items())
    console.print(f"rows per hospital (complete cases): {rows}")


def _interrupt(*_: object) -> None:
    """SIGTERM stops the demo the way Ctrl-C does."""
    raise KeyboardInterrupt


def _print_space(space: dict[str, Any], console: Console) -> None:
    table = Table("participant", "type", "jurisdiction", "URL", "admin API key")
    auth = space["authority"]
    table.add_row(f"[bold]{auth['id']}[/bold]", "authority", "-", auth["url"], auth["api_keys"]["admin"])
    for p in space["participants"]:
        table.add_row(p["id"], p["type"], p["jurisdiction"], p["url"], p["api_keys"]["admin"])
    console.print(table)


def run_demo(data_dir: Path, *, patients: int, base_port: int, once: bool, console: Console) -> int:
    try:
        # Before minutes of data generation: every connector needs the DSP schemas (it refuses to
        # start without them), and its process is handed the directory found here.
        schemas = find_schema_dir().resolve()
    except HealthspaceError as exc:
        console.print(f"[red]error:[/red] {exc.detail}")
        return 2
    root = data_dir / "demo"
    if root.exists():
        console.print(f"replacing the previous demo space in {root}")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    ports = _free_ports(base_port, 1 + len(DEMO_PARTICIPANTS))
    authority = Service(AUTHORITY_ID, "authority", root / "authority", ports[0])
    connectors = [
        Service(p.id, "connector", root / p.id, port)
        for p, port in zip(DEMO_PARTICIPANTS, ports[1:], strict=True)
    ]
    services = [authority, *connectors]
    try:
        populations = _generate_populations(root, patients, console)

        keys = init_authority(Settings(data_dir=authority.data_dir), AUTHORITY_ID, AUTHORITY_NAME)
        authority.api_keys = {r.value: k.secret for r, k in keys.items()}
        _start(authority, schemas)
        _wait_healthy(authority)
        admin = AuthorityClient(authority.url, authority.api_keys[Role.ADMIN.value])
        anchor = admin.describe()
        for scenario in DEMO_SCENARIOS:
            admin.register_scenario(scenario.model_dump(mode="json"))
        standard = admin.publish_standard(default_profile().model_dump(mode="json"))

        for p, svc in zip(DEMO_PARTICIPANTS, connectors, strict=True):
            settings = Settings(data_dir=svc.data_dir)
            config = ConnectorConfig(
                participant_id=p.id,
                legal_name=p.legal_name,
                participant_type=p.type,
                jurisdiction=p.jurisdiction,
                roles=list(p.roles),
                public_url=svc.url,
                authority_url=authority.url,
                authority_id=anchor["id"],
                authority_public_key=anchor["public_key"],
                patient_id_prefix=f"{p.site}-pat-" if p.site else None,
            )
            svc.api_keys = {r.value: k.secret for r, k in init_connector(settings, config).items()}
            result = admin.onboard(
                {
                    "id": p.id,
                    "legal_name": p.legal_name,
                    "type": p.type,
                    "jurisdiction": p.jurisdiction,
                    "roles": list(p.roles),
                    "public_key": public_key_of(settings),
                    "connector_url": svc.url,
                }
            )
            install_credential(settings, result["credential"])
            _start(svc, schemas)
        for svc in connectors:
            _wait_healthy(svc)
        approvals = _register_export_approvals(
            admin, next(p.id for p in DEMO_PARTICIPANTS if p.type == "university")
        )
        admin.close()

        pairs = list(zip(DEMO_PARTICIPANTS, connectors, strict=True))
        hospitals = [svc for p, svc in pairs if p.site is not None]
        university = next(svc for p, svc in pairs if p.type == "university")
        _load_clinical_data(hospitals, populations, standard["id"], console)
        console.print("hospitals import their patients' consent decisions ...")
        for hospital_id, counts in _import_consents(root, hospitals).items():
            populations[hospital_id]["consenting"] = counts
        console.print("the university negotiates with each hospital over DSP ...")
        contracts = _contracts(hospitals, university)
        contracts["export_approvals"] = approvals

        space = {
            "authority": {
                "id": AUTHORITY_ID,
                "name": AUTHORITY_NAME,
                "url": authority.url,
                "public_key": anchor["public_key"],
                "data_dir": str(authority.data_dir),
                "api_keys": authority.api_keys,
            },
            "participants": [
                {
                    "id": p.id,
                    "name": p.legal_name,
                    "type": p.type,
                    "jurisdiction": p.jurisdiction,
                    "roles": list(p.roles),
                    "url": svc.url,
                    "data_dir": str(svc.data_dir),
                    "identity": {
                        "key": str(svc.data_dir / "participant.key"),
                        "credential": str(svc.data_dir / "credential.jwt"),
                        "kek": str(svc.data_dir / "dev.kek"),
                    },
                    "population": populations.get(p.id),
                    "api_keys": svc.api_keys,
                }
                for p, svc in zip(DEMO_PARTICIPANTS, connectors, strict=True)
            ],
            "scenarios": [s.id for s in DEMO_SCENARIOS],
        }
        space_file = data_dir / "space.json"
        space_file.write_text(json.dumps(space, indent=2))
        space_file.chmod(0o600)  # it holds the demo users' API keys

        console.print("the university runs the example study across the three hospitals ...")
        study = _study(university, space)
        console.print("... and fits a logistic regression of death across them ...")
        model = _model(university, space)
        _print_results(study, model, console)

        if once:
            check = _self_check(authority, connectors)
            summary = {
                "ok": check["ok"] and contracts["ok"] and study["complete"] and model["ok"],
                "space": str(space_file),
                "authority": authority.url,
                "participants": {svc.id: svc.url for svc in connectors},
                "scenarios": space["scenarios"],
                "populations": populations,
                "contracts": contracts,
                "study": study,
                "model": model,
                "self_check": check,
            }
            console.print_json(json.dumps(summary))
            return 0 if summary["ok"] else 1

        _print_space(space, console)
        _print_contracts(contracts, console)
        spec_file = data_dir / "example-study.json"
        spec_file.write_text(json.dumps(DEMO_STUDY, indent=2))
        console.print(
            f"run it again: healthspace study run {spec_file} --scenario {SCENARIO} "
            f"--space {space_file} --as {university.id} --dataset {AGGREGATE_DATASET}"
        )
        console.print(f"space description: {space_file}   (Ctrl-C stops everything)")
        signal.signal(signal.SIGTERM, _interrupt)
        while all(s.process is not None and s.process.poll() is None for s in services):
            time.sleep(0.5)
        console.print("[red]a service stopped unexpectedly; shutting the demo down[/red]")
        return 1
    except KeyboardInterrupt:
        console.print("stopping ...")
        return 0
    finally:
        _stop(services)
