"""A provider's data plane for tests: real clinical store, consent registry, audit log and job service."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pyarrow.parquet as pq
from fastapi import FastAPI

from healthspace.audit.log import AuditLog
from healthspace.connector.dataplane import (
    ConsumerProfile,
    FixedAgreement,
    FixedTransfer,
    JobService,
    make_dataplane_router,
    make_review_router,
)
from healthspace.connector.dataplane.store import lazy_store_connection
from healthspace.connector.dsp.dataplane import mint_access_token
from healthspace.consent.fhir import PatientRefs
from healthspace.consent.service import ConsentService
from healthspace.core.apikeys import ApiKeyStore, IssuedKey, Role, role_guard
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from healthspace.core.errors import NotFoundError, install_problem_handlers
from healthspace.core.ids import person_id_for
from healthspace.data.ingest import ingest_ndjson
from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore
from healthspace.identity.keys import SigningKey
from healthspace.policy import ExportApproval, template
from healthspace.synth.generate import generate
from tests.support.servers import serve

SCENARIO = "diabetes-outcomes-research"
CONSUMER = "hk-university"
AS_OF = datetime(2026, 1, 1, tzinfo=UTC)
JURISDICTION = {"gz": "CN-GD", "sz": "CN-GD", "hk": "HK"}


def agreement_policy(
    provider: str,
    dataset: str,
    *,
    k: int = 10,
    epsilon: float | None = None,
    max_uses: int | None = None,
    consumer: str = CONSUMER,
    scenario: str = SCENARIO,
    review_output: bool = False,
) -> dict[str, Any]:
    """The aggregate-research agreement, without a privacy budget unless `epsilon`, allowing models too;
    with `review_output` its permission carries the `reviewOutput` duty (results wait for review)."""
    policy = template(
        "aggregate-research",
        policy_type="Agreement",
        scenario=scenario,
        k=k,
        epsilon=epsilon or 1.0,
        max_uses=max_uses,
        target=dataset,
        assigner=provider,
        assignee=consumer,
    )
    cons = policy["permission"][0]["constraint"]
    if epsilon is None:
        cons[:] = [c for c in cons if c["leftOperand"] != "privacyBudget"]
    for c in cons:
        if c["leftOperand"] == "outputType":
            c["operator"], c["rightOperand"] = "isAnyOf", ["aggregate", "model"]
    if review_output:
        policy["permission"][0].setdefault("duty", []).append({"action": "reviewOutput"})
    return policy


@dataclass
class Provider:
    site: str
    id: str
    dataset_id: str
    synth: Path
    key: SigningKey
    clock: FixedClock
    db: Database
    audit: AuditLog
    consent: ConsentService
    service: JobService
    store_path: Path
    keys_dir: Path
    agreements: dict[str, FixedAgreement] = field(default_factory=dict)
    transfers: dict[str, FixedTransfer] = field(default_factory=dict)
    approvals: list[ExportApproval] = field(default_factory=list)
    url: str = ""
    api_keys: ApiKeyStore | None = None

    def staff_key(self, role: Role, label: str = "") -> IssuedKey:
        if self.api_keys is None:
            self.api_keys = ApiKeyStore(self.db)
        return self.api_keys.issue(role, label or f"{role.value} of {self.id}")

    def add_agreement(self, agreement_id: str, *, consumer: str = CONSUMER, **policy: Any) -> str:
        """A FINALIZED agreement with a STARTED transfer; returns the transfer id."""
        self.agreements[agreement_id] = FixedAgreement(
            agreement_id,
            self.id,
            consumer,
            self.dataset_id,
            agreement_policy(self.id, self.dataset_id, consumer=consumer, **policy),
            self.clock.now() - timedelta(days=1),
        )
        transfer_id = f"tr-{agreement_id}"
        self.transfers[transfer_id] = FixedTransfer(transfer_id, agreement_id, "STARTED")
        return transfer_id

    def token(
        self, agreement_id: str, *, consumer: str = CONSUMER, ttl: timedelta = timedelta(minutes=10)
    ) -> str:
        return mint_access_token(
            self.key, self.id, consumer, agreement_id, f"tr-{agreement_id}", self.clock.now(), ttl
        )

    def app(self) -> FastAPI:
        app = FastAPI()
        install_problem_handlers(app)
        app.include_router(make_dataplane_router(lambda: self.service))

        def staff(*roles: Role) -> Any:
            return role_guard(lambda _: self.api_keys or ApiKeyStore(self.db), *roles)

        app.include_router(make_review_router(lambda: self.service, staff))

        @app.get("/.well-known/healthspace")
        def describe() -> dict[str, str]:
            return {"id": self.id, "public_key": self.key.public_key_b64, "key_id": self.key.key_id}

        return app

    def audit_entries(self) -> list[Any]:
        return [e.entry for e in self.audit.entries(0, self.audit.size)]

    # --- independent truth ---------------------------------------------------------------------

    def omop(self, table: str) -> pd.DataFrame:
        return pq.read_table(self.synth / "omop" / f"{table}.parquet").to_pandas()

    def consenting_ids(self, at: datetime = AS_OF) -> set[int]:
        """Synth person ids with a permit decided by `at` and not withdrawn by then (docs/synth.md)."""
        c = self.omop("consent")
        c = c[(c.scenario_id == SCENARIO) & (c.decision == "permit") & (c.decided_at <= at)]
        c = c[c.withdrawn_at.isna() | (c.withdrawn_at > at)]
        return {int(i) for i in c.person_id}

    def store_ids(self, synth_ids: set[int]) -> set[int]:
        """The clinical store's person ids (keyed on the FHIR Patient id) of synth person ids."""
        person = self.omop("person")
        chosen = person[person.person_id.isin(synth_ids)]
        return {person_id_for(str(v)) for v in chosen.person_source_value}

    def with_condition(self, prefix: str) -> set[int]:
        cond = self.omop("condition_occurrence")
        return {int(i) for i in cond.loc[cond.condition_source_value.str.startswith(prefix), "person_id"]}

    def sex_of(self, synth_ids: set[int]) -> dict[str, int]:
        person = self.omop("person")
        chosen = person[person.person_id.isin(synth_ids)]
        male = int((chosen.gender_concept_id == 8507).sum())
        return {"female": len(chosen) - male, "male": male, "other": 0}


def build_provider(root: Path, site: str, patients: int, seed: int) -> Provider:
    home = root / site
    synth = generate(site, patients, seed, home / "synth", progress=False).out
    fhir = [p for p in sorted((synth / "fhir").glob("*.ndjson")) if p.name != "Consent.ndjson"]
    store_path, keys_dir = home / "clinical", home / "keys"
    with ClinicalStore.create(store_path, f"{site}-ehr", LocalKeyStore(keys_dir)) as store:
        ingest_ndjson(store, fhir)
    provider_id = f"{site}-hospital"
    clock = FixedClock(AS_OF)
    key = SigningKey.generate()
    db, audit, consent = control_plane(f"sqlite:///{home / 'connector.db'}", site, synth, key, clock)
    p = Provider(
        site,
        provider_id,
        f"urn:healthspace:{provider_id}:t2d-cohort",
        synth,
        key,
        clock,
        db,
        audit,
        consent,
        cast(JobService, None),
        store_path,
        keys_dir,
    )
    p.service = job_service(p, db, audit, consent)
    return p


BRANCHES = ("apikeys", "audit", "consent", "compute", "jobs")


def control_plane(
    url: str, site: str, synth: Path, key: SigningKey, clock: FixedClock
) -> tuple[Database, AuditLog, ConsentService]:
    """The connector database of a site (any URL): audit log and the synth's consents imported."""
    db = Database(url, branches=BRANCHES)
    audit = AuditLog(db, key, clock)
    consent = ConsentService(db, audit, key, f"{site}-hospital", PatientRefs(f"{site}-pat-"), clock=clock)
    consent.import_ndjson((synth / "fhir" / "Consent.ndjson").read_bytes().splitlines(), actor="steward")
    return db, audit, consent


def job_service(p: Provider, db: Database, audit: AuditLog, consent: ConsentService) -> JobService:
    """A data plane for `p` on `db`: a new one on the same database is what a restart leaves."""

    def find_agreement(agreement_id: str) -> FixedAgreement:
        found = p.agreements.get(agreement_id)
        if found is None:
            raise NotFoundError(f"no agreement {agreement_id!r}")
        return found

    def find_transfer(transfer_id: str) -> FixedTransfer:
        found = p.transfers.get(transfer_id)
        if found is None:
            raise NotFoundError(f"no transfer {transfer_id!r}")
        return found

    return JobService(
        db,
        provider_id=p.id,
        provider_jurisdiction=JURISDICTION[p.site],
        key=p.key,
        agreement=find_agreement,
        transfer=find_transfer,
        consent=lambda: consent,
        connect=lazy_store_connection(p.store_path, p.keys_dir),
        record=audit.record,
        record_many=audit.append_many,
        clock=p.clock,
        consumer=lambda cid: ConsumerProfile(jurisdiction="HK", participant_type="university"),
        approvals=lambda: p.approvals,
    )


@contextmanager
def serving(providers: list[Provider]) -> Iterator[list[Provider]]:
    with ExitStack() as stack:
        for p in providers:
            p.url = stack.enter_context(serve(p.app()))
        yield providers
