"""The provider's data-plane job service: token → agreement → policy → consent → query → sign → audit."""

from __future__ import annotations

import base64
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import duckdb
import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from healthspace.audit.models import Outcome
from healthspace.compute import (
    BudgetKey,
    BudgetLedger,
    DifferencingGuard,
    DisclosureRules,
    DuckDBEngine,
    GlmSite,
    JobContext,
    QuerySpec,
    SqlCohortHistory,
    canonical_json,
    job_parameters,
    parse_spec,
    run_job,
)
from healthspace.compute.spec import GlmAnalysis
from healthspace.connector.dataplane.states import JOB, JobState
from healthspace.connector.dataplane.tables import JobRow
from healthspace.connector.dataplane.terms import data_classes_of, rules_from_policy
from healthspace.connector.dsp.dataplane import AccessGrant, verify_access_token
from healthspace.consent.service import ConsentService
from healthspace.core.clock import Clock
from healthspace.core.db import Database
from healthspace.core.errors import (
    AuthenticationError,
    ConflictError,
    ForbiddenError,
    HealthspaceError,
    NotFoundError,
    ValidationError,
)
from healthspace.identity.keys import SigningKey
from healthspace.policy import (
    DEFAULT_RULES,
    ExportApproval,
    Facts,
    JurisdictionRules,
    Phase,
    Request,
    cross_border_fact,
    decide_transfer,
    evaluate,
)

__all__ = [
    "AgreementView",
    "AuditRecorder",
    "ConsumerProfile",
    "GlmStep",
    "JobCreate",
    "JobPublic",
    "JobService",
    "PolicyDeniedError",
    "TransferView",
    "sign_payload",
]

SIGNATURE_ALG = "EdDSA"


class AgreementView(Protocol):
    """What the data plane reads of an agreement (`DspService.agreement(id)` returns one)."""

    @property
    def id(self) -> str: ...
    @property
    def provider_id(self) -> str: ...
    @property
    def consumer_id(self) -> str: ...
    @property
    def dataset_id(self) -> str: ...
    @property
    def policy(self) -> dict[str, Any]: ...
    @property
    def signed_at(self) -> datetime: ...
    @property
    def retired_at(self) -> datetime | None: ...


class TransferView(Protocol):
    """What the data plane reads of a transfer (`DspService.transfer(id)` returns one)."""

    @property
    def id(self) -> str: ...
    @property
    def agreement_id(self) -> str: ...
    @property
    def state(self) -> Any: ...


class AuditRecorder(Protocol):
    def __call__(
        self,
        actor: str,
        action: str,
        subject: str,
        outcome: Outcome,
        reason: str = "",
        *,
        scenario_id: str | None = None,
        agreement_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> object: ...


@dataclass(frozen=True, slots=True)
class ConsumerProfile:
    """The consumer's registered attributes the policy may constrain (from the authority's registry)."""

    jurisdiction: str | None = None
    participant_type: str | None = None
    roles: frozenset[str] = frozenset()


class PolicyDeniedError(ForbiddenError):
    code = "policy-denied"
    title = "The agreement's policy does not allow this job"


class JobCreate(BaseModel):
    """A job request: the scenario it serves (the agreement's purpose) and a version-1 query spec."""

    model_config = ConfigDict(extra="forbid")

    scenario: str = Field(min_length=1, max_length=200)
    spec: dict[str, Any]


class GlmStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    analysis: str = Field(min_length=1, max_length=64)
    beta: list[float] = Field(min_length=1, max_length=64)


class JobPublic(BaseModel):
    id: str
    state: JobState
    kind: str
    agreement_id: str
    consumer_id: str
    scenario_id: str
    dataset_id: str
    epsilon: float
    reason: str | None
    created_at: datetime
    updated_at: datetime
    signed: dict[str, Any] | None = None
    """The signed envelope `{payload, alg, kid, signature}`; `signature` is base64url Ed25519 over
    `canonical_json(payload)`."""
    glm: dict[str, Any] | None = None
    """For a GLM session: per analysis `{family, names, n_params}`."""


def sign_payload(key: SigningKey, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The signed envelope of `payload`: verifiable with the provider's public key and `kid`."""
    sig = key.sign(canonical_json(dict(payload)))
    return {
        "payload": dict(payload),
        "alg": SIGNATURE_ALG,
        "kid": key.key_id,
        "signature": base64.urlsafe_b64encode(sig).rstrip(b"=").decode(),
    }


@dataclass
class _GlmSession:
    sites: dict[str, GlmSite]
    iterations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class _Checked:
    grant: AccessGrant
    agreement: AgreementView


def _public(row: JobRow, glm: dict[str, Any] | None = None) -> JobPublic:
    return JobPublic(
        id=row.id,
        state=JobState(row.state),
        kind=row.kind,
        agreement_id=row.agreement_id,
        consumer_id=row.consumer_id,
        scenario_id=row.scenario_id,
        dataset_id=row.dataset_id,
        epsilon=row.epsilon,
        reason=row.reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
        signed=orjson.loads(row.result) if row.result else None,
        glm=glm,
    )


class JobService:
    """Runs consumers' jobs on this provider's clinical store under their agreements.

    Every job: the data-plane token is verified (signature, audience, expiry), its agreement must be
    the consumer's, unretired, with this provider, and its transfer STARTED; the agreement's policy is
    evaluated at the job phase (purpose = the job's scenario, output type, ε, cell size, use count,
    elapsed time, cross-border rules); the cohort is restricted to patients whose consent covers the
    scenario for every data class the spec reads; `run_job` applies disclosure control, the budget
    ledger and the differencing guard; the result is signed with the connector's key. Allowed and
    denied decisions are audited. Jobs on the store run one at a time (one DuckDB connection).
    """

    def __init__(
        self,
        db: Database,
        *,
        provider_id: str,
        provider_jurisdiction: str,
        key: SigningKey,
        agreement: Callable[[str], AgreementView],
        transfer: Callable[[str], TransferView],
        consent: Callable[[], ConsentService],
        connect: Callable[[], duckdb.DuckDBPyConnection],
        record: AuditRecorder,
        clock: Clock,
        consumer: Callable[[str], ConsumerProfile] | None = None,
        approvals: Callable[[], Iterable[ExportApproval]] | None = None,
        crossborder_rules: Mapping[str, JurisdictionRules] = DEFAULT_RULES,
        default_min_cell_size: int = 10,
        glm_max_iterations: int = 100,
    ) -> None:
        self.db = db
        self.provider_id = provider_id
        self.provider_jurisdiction = provider_jurisdiction
        self.key = key
        self._agreement = agreement
        self._transfer = transfer
        self._consent = consent
        self._connect = connect
        self._record = record
        self._clock = clock
        self._consumer = consumer or (lambda _: ConsumerProfile())
        self._approvals = approvals or (lambda: ())
        self._xb_rules = crossborder_rules
        self._k_default = default_min_cell_size
        self._glm_max = glm_max_iterations
        self._engine_lock = threading.Lock()
        self._sessions: dict[str, _GlmSession] = {}
        self.ledger = BudgetLedger(db)
        self.history = SqlCohortHistory(db)

    # --- access ------------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> _Checked:
        """The grant of a `Bearer` data-plane token, checked against the live agreement and transfer."""
        now = self._clock.now()
        try:
            if not authorization or not authorization.startswith("Bearer "):
                raise AuthenticationError("a data-plane bearer token is required", reason="no-token")
            grant = verify_access_token(self.key, self.provider_id, authorization[7:].strip(), now)
        except AuthenticationError as exc:
            self._record(
                "unauthenticated",
                "dataplane.authenticate",
                "dataplane",
                Outcome.DENIED,
                str(exc.extra.get("reason", exc.code)),
            )
            raise
        try:
            agreement = self._agreement(grant.agreement_id)
            problem = self._agreement_problem(grant, agreement)
            if problem is None:
                t = self._transfer(grant.transfer_id)
                if t.agreement_id != grant.agreement_id:
                    problem = "the transfer belongs to another agreement"
                elif str(getattr(t.state, "value", t.state)) != "STARTED":
                    problem = f"the transfer is {getattr(t.state, 'value', t.state)}, not STARTED"
        except NotFoundError:
            problem = "no such agreement or transfer on this connector"
        if problem is not None:
            self._record(
                grant.consumer,
                "dataplane.authorise",
                f"agreement:{grant.agreement_id}",
                Outcome.DENIED,
                problem,
                agreement_id=grant.agreement_id,
            )
            raise ForbiddenError(problem, reason="agreement-not-usable")
        return _Checked(grant, agreement)

    def _agreement_problem(self, grant: AccessGrant, a: AgreementView) -> str | None:
        if a.id != grant.agreement_id:
            return "the agreement does not match the token"
        if a.provider_id != self.provider_id or a.consumer_id != grant.consumer:
            return "the agreement is not between this provider and the token's consumer"
        if a.retired_at is not None:
            return "the agreement is retired"
        return None

    # --- jobs --------------------------------------------------------------------------------------

    def submit(self, checked: _Checked, body: JobCreate) -> JobPublic:
        """Run a job synchronously (a GLM spec opens an iteration session instead) and return it."""
        spec = parse_spec(body.spec)
        grant, agreement = checked.grant, checked.agreement
        rules = rules_from_policy(agreement.policy, self._k_default)
        glms = [a for a in spec.analyses if isinstance(a, GlmAnalysis)]
        if glms and len(glms) != len(spec.analyses):
            raise ValidationError(
                "a spec with a glm analysis may hold only glm analyses", pointer="/analyses"
            )
        kind = "glm" if glms else "query"
        now = self._clock.now()
        job_id = f"job-{secrets.token_hex(12)}"
        with self.db.session() as s:
            row = JobRow(
                id=job_id,
                agreement_id=agreement.id,
                transfer_id=grant.transfer_id,
                consumer_id=grant.consumer,
                scenario_id=body.scenario,
                dataset_id=agreement.dataset_id,
                kind=kind,
                state=JobState.QUEUED.value,
                spec=orjson.dumps(body.spec).decode(),
                result=None,
                reason=None,
                epsilon=0.0,
                created_at=now,
                updated_at=now,
            )
            s.add(row)
            s.commit()
        self._decide(job_id, grant, agreement, spec, rules, body.scenario, now)
        self._move(job_id, JobState.RUNNING)
        try:
            consent = self._consent().cohort(
                body.scenario, data_classes_of(spec), actor=f"dataplane:{job_id}", at=now
            )
            ctx = JobContext(job_id, grant.consumer, body.scenario, agreement.dataset_id)
            if kind == "glm":
                return self._open_glm(job_id, spec, consent, rules, glms)
            with self._engine_lock:
                result = run_job(
                    spec,
                    DuckDBEngine(self._connect()),
                    consent,
                    rules,
                    ctx,
                    ledger=self.ledger,
                    guard=DifferencingGuard(self.history, rules.difference_floor),
                    now=now,
                )
        except HealthspaceError as exc:
            self._end_on_error(job_id, agreement.id, body.scenario, grant.consumer, exc)
            raise
        except Exception as exc:
            self._end_on_error(job_id, agreement.id, body.scenario, grant.consumer, exc)
            raise
        payload = self._payload(job_id, grant, agreement, body.scenario, result.to_dict(), now)
        return self._succeed(job_id, payload, result.epsilon_spent)

    def _decide(
        self,
        job_id: str,
        grant: AccessGrant,
        agreement: AgreementView,
        spec: QuerySpec,
        rules: DisclosureRules,
        scenario: str,
        now: datetime,
    ) -> None:
        params = job_parameters(spec, rules)
        profile = self._consumer(grant.consumer)
        with self.db.session() as s:
            uses = s.scalar(
                select(func.count())
                .select_from(JobRow)
                .where(JobRow.agreement_id == agreement.id, JobRow.state == JobState.SUCCEEDED.value)
            )
        xb = decide_transfer(
            self._xb_rules,
            self.provider_jurisdiction,
            profile.jurisdiction or "unknown",
            str(params["output_type"]),
            agreement.dataset_id,
            grant.consumer,
            scenario,
            self._approvals(),
            now,
        )
        request = Request(
            action="use",
            target=agreement.dataset_id,
            purpose=scenario,
            consumer_id=grant.consumer,
            consumer_type=profile.participant_type,
            consumer_roles=profile.roles,
            consumer_jurisdiction=profile.jurisdiction,
            output_type=params["output_type"],
            epsilon=params["epsilon"],
            cell_size=params["cell_size"],
            execution_location="provider",
            phase=Phase.JOB,
        )
        facts = Facts(
            use_count=int(uses or 0),
            epsilon_spent=self.ledger.spent(BudgetKey(grant.consumer, scenario, agreement.dataset_id)),
            agreement_start=agreement.signed_at,
            cross_border=cross_border_fact(xb),
        )
        decision = evaluate(agreement.policy, request, facts, now)
        outcome = Outcome.ALLOWED if decision.allowed else Outcome.DENIED
        reasons = list(decision.reasons)
        self._record(
            grant.consumer,
            "dataplane.job.decide",
            f"job:{job_id}",
            outcome,
            "; ".join(reasons)[:2000],
            scenario_id=scenario,
            agreement_id=agreement.id,
            details={"job_id": job_id, "transfer_id": grant.transfer_id, **params},
        )
        if not decision.allowed:
            self._move(job_id, JobState.REFUSED, "; ".join(reasons) or "denied by policy")
            raise PolicyDeniedError(
                "the agreement's policy does not allow this job", reasons=reasons, job_id=job_id
            )

    def _end_on_error(
        self, job_id: str, agreement_id: str, scenario: str, consumer: str, exc: Exception
    ) -> None:
        refused = isinstance(exc, ForbiddenError)
        client = isinstance(exc, HealthspaceError)
        reason = str(getattr(exc, "detail", "")) if client else f"internal error ({type(exc).__name__})"
        self._move(job_id, JobState.REFUSED if refused else JobState.FAILED, reason)
        self._record(
            consumer,
            "dataplane.job.run",
            f"job:{job_id}",
            Outcome.DENIED if refused else Outcome.FAILURE,
            reason[:2000],
            scenario_id=scenario,
            agreement_id=agreement_id,
            details={"job_id": job_id},
        )

    def _payload(
        self,
        job_id: str,
        grant: AccessGrant,
        agreement: AgreementView,
        scenario: str,
        result: dict[str, Any],
        now: datetime,
    ) -> dict[str, Any]:
        return {
            "provider": self.provider_id,
            "consumer": grant.consumer,
            "agreement_id": agreement.id,
            "transfer_id": grant.transfer_id,
            "scenario": scenario,
            "job_id": job_id,
            "signed_at": now.isoformat(),
            "result": result,
        }

    def _succeed(self, job_id: str, payload: dict[str, Any], epsilon: float) -> JobPublic:
        envelope = sign_payload(self.key, payload)
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id!r}")
            row.state = JOB.transition(JobState(row.state), JobState.SUCCEEDED).value
            row.result = canonical_json(envelope).decode()
            row.epsilon = epsilon
            row.updated_at = self._clock.now()
            s.commit()
            out = _public(row)
        self._record(
            out.consumer_id,
            "dataplane.job.run",
            f"job:{job_id}",
            Outcome.SUCCESS,
            scenario_id=out.scenario_id,
            agreement_id=out.agreement_id,
            details={"job_id": job_id, "epsilon_spent": epsilon, "kind": out.kind},
        )
        return out

    def _move(self, job_id: str, target: JobState, reason: str | None = None) -> JobRow:
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id!r}")
            row.state = JOB.transition(JobState(row.state), target).value
            if reason is not None:
                row.reason = reason[:4000]
            row.updated_at = self._clock.now()
            s.commit()
            return row

    def _own(self, checked: _Checked, job_id: str) -> JobRow:
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            # Another agreement's job is "not found": its existence is not the caller's business.
            if (
                row is None
                or row.agreement_id != checked.agreement.id
                or row.consumer_id != checked.grant.consumer
            ):
                raise NotFoundError(f"no job {job_id!r} under this agreement")
            return row

    def get(self, checked: _Checked, job_id: str) -> JobPublic:
        return _public(self._own(checked, job_id), self._glm_info(job_id))

    def cancel(self, checked: _Checked, job_id: str) -> JobPublic:
        """Cancel a queued job or an open GLM session; a finished job answers 409 (invalid transition)."""
        row = self._own(checked, job_id)
        self._sessions.pop(job_id, None)
        row = self._move(job_id, JobState.CANCELLED, "cancelled by the consumer")
        self._record(
            checked.grant.consumer,
            "dataplane.job.cancel",
            f"job:{job_id}",
            Outcome.SUCCESS,
            scenario_id=row.scenario_id,
            agreement_id=row.agreement_id,
        )
        return _public(row)

    # --- federated GLM -----------------------------------------------------------------------------

    def _open_glm(
        self,
        job_id: str,
        spec: QuerySpec,
        consent: Any,
        rules: DisclosureRules,
        glms: list[GlmAnalysis],
    ) -> JobPublic:
        with self._engine_lock:
            engine = DuckDBEngine(self._connect())
            sites = {a.id: GlmSite(engine, consent, spec, a.id, rules) for a in glms}
        self._sessions[job_id] = _GlmSession(sites)
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id!r}")
            return _public(row, self._glm_info(job_id))

    def _glm_info(self, job_id: str) -> dict[str, Any] | None:
        session = self._sessions.get(job_id)
        if session is None:
            return None
        return {
            aid: {"family": site.family, "names": site.names, "n_params": site.n_params}
            for aid, site in session.sites.items()
        }

    def glm_step(self, checked: _Checked, job_id: str, step: GlmStep) -> dict[str, Any]:
        """One iteration: this site's signed `SiteStats` at the coordinator's β."""
        row = self._own(checked, job_id)
        session = self._sessions.get(job_id)
        if row.state != JobState.RUNNING.value or session is None:
            raise ConflictError(f"job {job_id!r} is {row.state}, not an open GLM session")
        site = session.sites.get(step.analysis)
        if site is None:
            raise NotFoundError(f"job {job_id!r} has no glm analysis {step.analysis!r}")
        with session.lock:
            # Bounded: every β answered reveals aggregates at a point of the coordinator's choosing.
            if session.iterations >= self._glm_max:
                raise ForbiddenError(
                    f"the GLM session has used its {self._glm_max} iterations", reason="glm-iterations"
                )
            session.iterations += 1
            n = session.iterations
        stats = site(np.asarray(step.beta, dtype=np.float64))
        payload = {
            "provider": self.provider_id,
            "agreement_id": row.agreement_id,
            "job_id": job_id,
            "analysis": step.analysis,
            "iteration": n,
            "beta": list(step.beta),
            "stats": stats.to_dict(),
        }
        return sign_payload(self.key, payload)

    def glm_finish(self, checked: _Checked, job_id: str) -> JobPublic:
        """Close a GLM session: the job succeeds with a signed summary (iterations, rows per analysis)."""
        row = self._own(checked, job_id)
        session = self._sessions.pop(job_id, None)
        if row.state != JobState.RUNNING.value or session is None:
            raise ConflictError(f"job {job_id!r} is {row.state}, not an open GLM session")
        result = {
            "version": 1,
            "job_id": job_id,
            "dataset_id": row.dataset_id,
            "analyses": {
                aid: {
                    "type": "glm",
                    "family": site.family,
                    "names": site.names,
                    "iterations": session.iterations,
                    "n": site.n,
                }
                for aid, site in session.sites.items()
            },
        }
        payload = self._payload(
            job_id, checked.grant, checked.agreement, row.scenario_id, result, self._clock.now()
        )
        return self._succeed(job_id, payload, 0.0)
