"""The provider's data-plane job service: token → agreement → policy → consent → query → sign → audit."""

from __future__ import annotations

import base64
import secrets
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

import duckdb
import jwt
import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Table, Update, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from healthspace.audit.log import AuditBatch, AuditRecorder
from healthspace.audit.models import AuditEntry, Outcome
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
from healthspace.compute.guard import Recent
from healthspace.compute.spec import GlmAnalysis
from healthspace.connector.dataplane.review import OutputReview
from healthspace.connector.dataplane.states import JOB, JobState
from healthspace.connector.dataplane.tables import GlmSessionRow, JobRow, TokenRefreshRow
from healthspace.connector.dataplane.terms import data_classes_of, rules_from_policy
from healthspace.connector.dsp.dataplane import (
    DEFAULT_ACCESS_TTL,
    AccessGrant,
    mint_access_token,
    verify_access_token,
)
from healthspace.connector.gate import Member, PolicyGate, record_decision
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
from healthspace.policy import DEFAULT_RULES, Decision, ExportApproval, JurisdictionRules, Phase
from healthspace.policy.registry import CrossBorderSet

__all__ = [
    "AgreementView",
    "AuditRecorder",
    "ConsumerProfile",
    "FixedAgreement",
    "FixedTransfer",
    "GlmStep",
    "JobCreate",
    "JobPublic",
    "JobService",
    "PolicyDeniedError",
    "TokenPublic",
    "TransferView",
    "sign_payload",
]

SIGNATURE_ALG = "EdDSA"
REVIEW_DUTY = "reviewOutput"
# How long after its expiry a data-plane token may still be exchanged for a fresh one: long enough for
# a lab that was busy (or asleep) over the expiry, short enough that a leaked old token soon goes dead.
DEFAULT_REFRESH_GRACE = timedelta(minutes=5)


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


@dataclass(frozen=True)
class FixedAgreement:
    """An `AgreementView` held in memory: a data plane wired without a DSP service (benchmarks, tests)."""

    id: str
    provider_id: str
    consumer_id: str
    dataset_id: str
    policy: dict[str, Any]
    signed_at: datetime
    retired_at: datetime | None = None


@dataclass(frozen=True)
class FixedTransfer:
    """A `TransferView` held in memory (see `FixedAgreement`)."""

    id: str
    agreement_id: str
    state: str = "STARTED"


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
    review: dict[str, Any] | None = None
    """For a result under output review: `{id, state, approvals, required, reason}`; while HELD the
    signed result is not shown."""


class TokenPublic(BaseModel):
    """A fresh data-plane token for the same transfer (`POST /dataplane/token`)."""

    token: str
    token_type: str = "bearer"  # noqa: S105 (the OAuth token type, not a secret)
    expires_at: datetime
    expires_in: int
    """Seconds from now."""
    transfer_id: str
    agreement_id: str


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
    """The designs of an open GLM session, held in memory; its state of record is `GlmSessionRow`."""

    sites: dict[str, GlmSite]
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class _Checked:
    grant: AccessGrant
    agreement: AgreementView


def _public(
    row: JobRow | Mapping[Any, Any], glm: dict[str, Any] | None = None, review: dict[str, Any] | None = None
) -> JobPublic:
    """The consumer's view of a job row (an ORM row, or the columns a Core statement returned)."""
    m: Mapping[Any, Any] = row if isinstance(row, Mapping) else {c: getattr(row, c) for c in _PUBLIC_COLUMNS}
    return JobPublic(
        id=m["id"],
        state=JobState(m["state"]),
        kind=m["kind"],
        agreement_id=m["agreement_id"],
        consumer_id=m["consumer_id"],
        scenario_id=m["scenario_id"],
        dataset_id=m["dataset_id"],
        epsilon=m["epsilon"],
        reason=m["reason"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        signed=orjson.loads(m["result"]) if m["result"] else None,
        glm=glm,
        review=review,
    )


_PUBLIC_COLUMNS = (
    "id",
    "state",
    "kind",
    "agreement_id",
    "consumer_id",
    "scenario_id",
    "dataset_id",
    "epsilon",
    "reason",
    "created_at",
    "updated_at",
    "result",
)


class _ProfileDirectory:
    """The gate's member directory over a `consumer` callable (a data plane built without a gate)."""

    def __init__(self, consumer: Callable[[str], ConsumerProfile]) -> None:
        self._consumer = consumer

    def get(self, participant_id: str) -> Member | None:
        p = self._consumer(participant_id)
        if p.jurisdiction is None:  # unknown to the registry: fail closed, as the directory does
            return None
        return Member(participant_id, p.participant_type or "", p.jurisdiction, p.roles)


class _FixedCrossBorder:
    def __init__(
        self,
        rules: Mapping[str, JurisdictionRules],
        approvals: Callable[[], Iterable[ExportApproval]],
        clock: Clock,
    ) -> None:
        self._rules, self._approvals, self._clock = rules, approvals, clock

    def current(self) -> CrossBorderSet:
        return CrossBorderSet(self._rules, tuple(self._approvals()), self._clock.now())


_JOBS = cast(Table, JobRow.__table__)
# Built once: the statement and its cache key are then not rebuilt on every job.
_USES = (
    select(func.count())
    .select_from(_JOBS)
    .where(
        _JOBS.c.agreement_id == bindparam("agreement_id"),
        _JOBS.c.state.in_((JobState.SUCCEEDED.value, JobState.HELD.value)),
    )
)
_INSERT_JOB = insert(_JOBS)
# `_finish`'s UPDATE ... RETURNING per set of columns it sets (a handful), built once each.
_FINISH: dict[frozenset[str], Update] = {}


def _finish_statement(columns: frozenset[str]) -> Update:
    stmt = _FINISH.get(columns)
    if stmt is None:
        stmt = (
            update(_JOBS)
            .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.state == bindparam("b_source"))
            .values({c: bindparam(c) for c in ("state", "updated_at", *sorted(columns))})
            .returning(*_JOBS.c)
        )
        _FINISH[columns] = stmt
    return stmt


def _aware(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


class _HeldHistory:
    """The differencing guard's history for one job: reads the stored history, and holds the job's
    person sets until `store` writes them in the transaction that stores the job's result."""

    def __init__(self, history: SqlCohortHistory) -> None:
        self._history = history
        self._held: list[tuple[str, str, list[np.ndarray], datetime, list[bytes] | None]] = []

    def near(self, dataset_id: str, ids: np.ndarray, digest: bytes, slack: int, since: datetime) -> Recent:
        return self._history.near(dataset_id, ids, digest, slack, since)

    def record(
        self,
        dataset_id: str,
        consumer_id: str,
        sets: list[np.ndarray],
        at: datetime,
        digests: list[bytes] | None = None,
    ) -> None:
        self._held.append((dataset_id, consumer_id, sets, at, digests))

    def store(self, s: Session | Connection) -> None:
        for dataset_id, consumer_id, sets, at, digests in self._held:
            self._history.record_in(s, dataset_id, consumer_id, sets, at, digests)
        self._held = []


class JobService:
    """Runs consumers' jobs on this provider's clinical store under their agreements.

    Every job: the data-plane token is verified (signature, audience, expiry), its agreement must be
    the consumer's, unretired, with this provider, and its transfer STARTED; the agreement's policy is
    decided by the connector's policy gate at the job phase (`PolicyGate.decide`, purpose = the job's
    scenario, output type, ε, cell size, use count, elapsed time, cross-border rules) and audited as
    `policy.decision` like contract and transfer decisions; the cohort is restricted to patients whose
    consent covers the scenario for every data class the spec reads; `run_job` applies disclosure
    control, the budget ledger and the differencing guard; the result is signed with the connector's
    key and, where the agreement carries the `reviewOutput` duty, held for output review. Jobs on the
    store run one at a time (one DuckDB connection). GLM sessions are recorded in the database and
    resume after a restart (their designs are rebuilt and checked against the recorded digest).

    Without a `gate` (tests, tools) one is built from `consumer`, `approvals` and `crossborder_rules`,
    so the decision takes the same code path either way. A job's audit entries (decision, consent
    cohort, outcome) are appended together when it ends: with `record_many` (`AuditLog.append_many`)
    in one commit, else through `record` one by one.
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
        record_many: Callable[[Sequence[AuditEntry]], object] | None = None,
        consumer: Callable[[str], ConsumerProfile] | None = None,
        approvals: Callable[[], Iterable[ExportApproval]] | None = None,
        crossborder_rules: Mapping[str, JurisdictionRules] = DEFAULT_RULES,
        default_min_cell_size: int = 10,
        glm_max_iterations: int = 100,
        glm_idle: timedelta = timedelta(hours=24),
        gate: PolicyGate | None = None,
        token_ttl: timedelta = DEFAULT_ACCESS_TTL,
        refresh_grace: timedelta = DEFAULT_REFRESH_GRACE,
        reviewers_required: int = 2,
        engine: Callable[[duckdb.DuckDBPyConnection], DuckDBEngine] | None = None,
        runner: str = "",
        live_runners: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.db = db
        # Which process this is, stored with every job it runs; and which processes are alive (see
        # `fail_interrupted`). Without `live_runners` this process is the only one.
        self.runner = runner
        self._live_runners = live_runners or frozenset
        self.provider_id = provider_id
        self.provider_jurisdiction = provider_jurisdiction
        self.key = key
        self._agreement = agreement
        self._transfer = transfer
        self._consent = consent
        self._connect = connect
        self._record = record
        self._record_many = record_many
        self._clock = clock
        self.gate = gate or PolicyGate(
            provider_id,
            provider_jurisdiction,
            _ProfileDirectory(consumer or (lambda _: ConsumerProfile())),
            _FixedCrossBorder(crossborder_rules, approvals or (lambda: ()), clock),
            clock,
            has_consent_registry=True,  # every job here runs on the consenting cohort alone
        )
        self._k_default = default_min_cell_size
        self._glm_max = glm_max_iterations
        self._glm_idle = glm_idle
        self._ttl = token_ttl
        self._grace = refresh_grace
        self._engine_lock = threading.Lock()
        # One engine per store connection, kept across jobs (under `_engine_lock`): the connection is
        # a snapshot of the store (reopened, so a new engine, when the store commits), so what depends
        # only on the consent cohort is built once per cohort (`DuckDBEngine(reuse_consent=True)`).
        self._engine: tuple[duckdb.DuckDBPyConnection, DuckDBEngine] | None = None
        # How a kept engine is made (benchmarks pass one that times its queries).
        self._new_engine = engine or (lambda con: DuckDBEngine(con, reuse_consent=True))
        self._resume_lock = threading.Lock()
        self._sessions: dict[str, _GlmSession] = {}
        self.ledger = BudgetLedger(db)
        self.history = SqlCohortHistory(db)
        self.review = OutputReview(db, record, clock, reviewers_required)

    # --- access ------------------------------------------------------------------------------------

    def _bearer(self, authorization: str | None, action: str) -> str:
        if not authorization or not authorization.startswith("Bearer "):
            self._record("unauthenticated", action, "dataplane", Outcome.DENIED, "no-token")
            raise AuthenticationError("a data-plane bearer token is required", reason="no-token")
        return authorization[7:].strip()

    def authenticate(self, authorization: str | None) -> _Checked:
        """The grant of a `Bearer` data-plane token, checked against the live agreement and transfer."""
        token = self._bearer(authorization, "dataplane.authenticate")
        try:
            grant = verify_access_token(self.key, self.provider_id, token, self._clock.now())
        except AuthenticationError as exc:
            self._record(
                "unauthenticated",
                "dataplane.authenticate",
                "dataplane",
                Outcome.DENIED,
                str(exc.extra.get("reason", exc.code)),
            )
            raise
        return self._check_live(grant, "dataplane.authorise")

    def _check_live(self, grant: AccessGrant, action: str) -> _Checked:
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
                action,
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

    def refresh_token(self, authorization: str | None) -> TokenPublic:
        """A fresh token for the transfer of a valid or just-expired (within the grace) token.

        Only while the transfer is STARTED and its agreement live: unretired, and its policy still
        allowing the transfer now (the gate at phase TRANSFER: validity period, consumer membership,
        cross-border rules). Each token refreshes once (its `jti` is recorded), so a copied token
        cannot fork a second chain. Refusals: 401 (bad, reused or too old a token), 403 (agreement
        or transfer no longer usable, with the policy's reasons). Every outcome is audited.
        """
        action = "dataplane.token.refresh"
        token = self._bearer(authorization, action)
        now = self._clock.now()
        try:
            # The expiry is checked at `now - grace`: a token expired less than `grace` ago still counts.
            grant = verify_access_token(self.key, self.provider_id, token, now - self._grace)
            jti = str(jwt.decode(token, options={"verify_signature": False}).get("jti") or "")
            if not jti:
                raise AuthenticationError("the data-plane token has no id", reason="token-invalid")
        except AuthenticationError as exc:
            if exc.extra.get("reason") == "token-expired":
                exc = AuthenticationError(
                    f"the data-plane token expired more than {int(self._grace.total_seconds())} s ago "
                    "and can no longer be refreshed; the transfer must be restarted",
                    reason="refresh-window-passed",
                )
            self._record("unauthenticated", action, "dataplane", Outcome.DENIED, str(exc.extra["reason"]))
            raise exc from None
        checked = self._check_live(grant, action)
        a = checked.agreement
        d = self.gate.decide(a.policy, a.dataset_id, grant.consumer, Phase.TRANSFER, _aware(a.signed_at))
        record_decision(
            self._record,
            grant.consumer,
            grant.transfer_id,
            d.decision,
            scenario_id=d.scenario_id,
            agreement_id=a.id,
            details={
                "phase": "transfer",
                "check": "token-refresh",
                "dataset_id": a.dataset_id,
                "consumer_id": grant.consumer,
                "output_types": list(d.output_types),
            },
        )
        if not d.allowed:
            raise ForbiddenError(
                "the agreement's policy no longer allows this transfer",
                reason="agreement-not-usable",
                reasons=list(d.decision.reasons),
            )
        try:
            with self.db.session() as s:
                # Bounded table: a refreshed token's row is useless once the token is past its grace.
                s.execute(delete(TokenRefreshRow).where(TokenRefreshRow.expires_at < now - self._grace))
                s.add(
                    TokenRefreshRow(
                        jti=jti[:64],
                        transfer_id=grant.transfer_id,
                        expires_at=grant.expires_at,
                        refreshed_at=now,
                    )
                )
        except IntegrityError:
            self._record(
                grant.consumer,
                action,
                f"transfer:{grant.transfer_id}",
                Outcome.DENIED,
                "token-reused",
                agreement_id=a.id,
            )
            raise AuthenticationError(
                "this data-plane token has already been refreshed; use the newer token",
                reason="token-reused",
            ) from None
        fresh = mint_access_token(
            self.key, self.provider_id, grant.consumer, a.id, grant.transfer_id, now, self._ttl
        )
        expires_in = max(1, int(self._ttl.total_seconds()))
        expires_at = datetime.fromtimestamp(int(now.timestamp()) + expires_in, tz=UTC)
        self._record(
            grant.consumer,
            action,
            f"transfer:{grant.transfer_id}",
            Outcome.SUCCESS,
            agreement_id=a.id,
            details={
                "transfer_id": grant.transfer_id,
                "previous_expires_at": grant.expires_at.isoformat(),
                "expires_at": expires_at.isoformat(),
            },
        )
        return TokenPublic(
            token=fresh,
            expires_at=expires_at,
            expires_in=expires_in,
            transfer_id=grant.transfer_id,
            agreement_id=a.id,
        )

    # --- jobs --------------------------------------------------------------------------------------

    def submit(self, checked: _Checked, body: JobCreate) -> JobPublic:
        """Run a job synchronously (a GLM spec opens an iteration session instead) and return it.

        The job row is written once the policy has decided: REFUSED on a denial, else RUNNING (so a
        crash mid-job leaves a job that visibly did not succeed), then its end state; both go through
        `JOB.transition` from QUEUED. The job's audit entries (decision, consent cohort, outcome) are
        appended together when it ends, whichever way it ends (see `AuditBatch`).
        """
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
        audit = AuditBatch(self._record, self._record_many, self._clock)
        # Each IRLS step releases aggregates at once: nothing a person could hold back in time.
        no_review_for_glm = (
            "the agreement requires output review, which per-iteration GLM statistics cannot wait for"
        )
        with self.db.session() as s:
            # One transaction reads the use count and the budget, and stores the job as decided.
            decision = self._decide(s, job_id, grant, agreement, spec, rules, body.scenario, audit)
            review = any(d.action == REVIEW_DUTY for d in decision.duties)
            if not decision.allowed:
                state, why = JobState.REFUSED, "; ".join(decision.reasons) or "denied by policy"
            elif review and kind == "glm":
                state, why = JobState.REFUSED, no_review_for_glm
            else:
                state, why = JobState.RUNNING, None
            consent: Any = None
            cohort_error: Exception | None = None
            if state is JobState.RUNNING:
                # The consent cohort (its registry's version read, the cohort itself from the cache)
                # in this transaction, before the INSERT takes the write lock; a failure ends the job
                # below, once its RUNNING row is stored, as any failure after the decision does.
                try:
                    consent = self._cohort(s, job_id, spec, body.scenario, now, audit)
                except Exception as exc:
                    cohort_error = exc
            if cohort_error is None:
                s.execute(_INSERT_JOB, self._job_row(job_id, grant, agreement, body, kind, state, why, now))
                s.commit()
            else:
                s.rollback()  # a failed read may leave the transaction unusable (PostgreSQL)
        if cohort_error is not None:
            with self.db.session() as s:
                s.execute(_INSERT_JOB, self._job_row(job_id, grant, agreement, body, kind, state, why, now))
        if not decision.allowed:
            audit.flush()
            raise PolicyDeniedError(
                "the agreement's policy does not allow this job",
                reasons=list(decision.reasons),
                job_id=job_id,
            )
        if state is JobState.REFUSED:
            audit(
                grant.consumer,
                "dataplane.job.run",
                f"job:{job_id}",
                Outcome.DENIED,
                no_review_for_glm,
                scenario_id=body.scenario,
                agreement_id=agreement.id,
                details={"job_id": job_id},
            )
            audit.flush()
            raise ForbiddenError(no_review_for_glm, reason="review-required", job_id=job_id)
        try:
            if cohort_error is not None:
                raise cohort_error
            ctx = JobContext(job_id, grant.consumer, body.scenario, agreement.dataset_id)
            if kind == "glm":
                self.close_idle_glm_sessions()
                out = self._open_glm(job_id, spec, consent, rules, glms)
                audit.flush()
                return out
        except Exception as exc:
            self._end_on_error(job_id, agreement.id, body.scenario, grant.consumer, exc, audit)
            raise
        # The guard's check and the storing of this job's person sets happen under one hold of the
        # engine lock, so no other job is checked against a history that lacks them; the sets are
        # stored in the transaction that stores the result (both or neither).
        with self._engine_lock:
            history = _HeldHistory(self.history)
            try:
                result = run_job(
                    spec,
                    self._engine_now(),
                    consent,
                    rules,
                    ctx,
                    ledger=self.ledger,
                    guard=DifferencingGuard(history, rules.difference_floor),
                    now=now,
                )
            except Exception as exc:
                self._end_on_error(job_id, agreement.id, body.scenario, grant.consumer, exc, audit)
                raise
            payload = self._payload(job_id, grant, agreement, body.scenario, result.to_dict(), now)
            return self._succeed(
                job_id, payload, result.epsilon_spent, review=review, audit=audit, history=history
            )

    def _job_row(
        self,
        job_id: str,
        grant: AccessGrant,
        agreement: AgreementView,
        body: JobCreate,
        kind: str,
        state: JobState,
        why: str | None,
        now: datetime,
    ) -> dict[str, Any]:
        # The values of a Core INSERT built once (`_INSERT_JOB`): the ORM's unit of work would cost as
        # much again, and building `.values(...)` each time about half as much, on every job.
        return {
            "id": job_id,
            "agreement_id": agreement.id,
            "transfer_id": grant.transfer_id,
            "consumer_id": grant.consumer,
            "scenario_id": body.scenario,
            "dataset_id": agreement.dataset_id,
            "kind": kind,
            "state": JOB.transition(JobState.QUEUED, state).value,
            "spec": orjson.dumps(body.spec).decode(),
            "result": None,
            "reason": None if why is None else why[:4000],
            "epsilon": 0.0,
            "created_at": now,
            "updated_at": now,
            "runner": self.runner,
        }

    def _cohort(
        self, s: Session, job_id: str, spec: QuerySpec, scenario: str, now: datetime, audit: AuditBatch
    ) -> Any:
        """The job's consent cohort, read in the job's transaction `s` when the registry shares the
        data plane's database (as in the connector), else in the registry's own."""
        consent = self._consent()
        shared = getattr(consent, "database", None) is self.db
        return consent.cohort(
            scenario,
            data_classes_of(spec),
            actor=f"dataplane:{job_id}",
            at=now,
            record=audit,
            session=s if shared else None,
        )

    def _engine_now(self) -> DuckDBEngine:
        """The engine over the store's current connection (call under `_engine_lock`)."""
        con = self._connect()
        if self._engine is None or self._engine[0] is not con:
            self._engine = (con, self._new_engine(con))
        return self._engine[1]

    def _decide(
        self,
        s: Session,
        job_id: str,
        grant: AccessGrant,
        agreement: AgreementView,
        spec: QuerySpec,
        rules: DisclosureRules,
        scenario: str,
        record: AuditRecorder,
    ) -> Decision:
        """The gate's decision at phase JOB, recorded as `policy.decision` to `record` (the job's batch);
        use count and budget are read in `s`."""
        params = job_parameters(spec, rules)
        # A held result is a use: the computation ran and its budget is spent, released or not.
        # Uses are counted on the (agreement_id, state) index, which grows with every job of the
        # agreement, and ε summed over the ledger: each only when the policy has a constraint on it,
        # else it cannot matter.
        policy = self.gate.compiled(agreement.policy)  # once, for every question below
        uses = s.scalar(_USES, {"agreement_id": agreement.id}) if self.gate.reads(policy, "count") else 0
        budget = BudgetKey(grant.consumer, scenario, agreement.dataset_id)
        spent = self.ledger.spent(budget, session=s) if self.gate.reads(policy, "privacyBudget") else 0.0
        d = self.gate.decide(
            policy,
            agreement.dataset_id,
            grant.consumer,
            Phase.JOB,
            _aware(agreement.signed_at),
            str(params["output_type"]),
            purpose=scenario,
            epsilon=params["epsilon"],
            cell_size=params["cell_size"],
            execution_location="provider",
            use_count=int(uses or 0),
            epsilon_spent=spent,
        )
        record_decision(
            record,
            grant.consumer,
            f"job:{job_id}",
            d.decision,
            scenario_id=scenario,
            agreement_id=agreement.id,
            details={
                "phase": "job",
                "check": "job",
                "dataset_id": agreement.dataset_id,
                "consumer_id": grant.consumer,
                "output_types": list(d.output_types),
                "job_id": job_id,
                "transfer_id": grant.transfer_id,
                **params,
            },
        )
        return d.decision

    def _end_on_error(
        self,
        job_id: str,
        agreement_id: str,
        scenario: str,
        consumer: str,
        exc: Exception,
        audit: AuditBatch | None = None,
    ) -> None:
        """The job ends REFUSED or FAILED with the reason; audited at once, after the job's held entries."""
        refused = isinstance(exc, ForbiddenError)
        client = isinstance(exc, HealthspaceError)
        reason = str(getattr(exc, "detail", "")) if client else f"internal error ({type(exc).__name__})"
        self._move(job_id, JobState.REFUSED if refused else JobState.FAILED, reason)
        audit = audit or AuditBatch(self._record, self._record_many, self._clock)
        audit(
            consumer,
            "dataplane.job.run",
            f"job:{job_id}",
            Outcome.DENIED if refused else Outcome.FAILURE,
            reason[:2000],
            scenario_id=scenario,
            agreement_id=agreement_id,
            details={"job_id": job_id},
        )
        audit.flush()

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

    def _succeed(
        self,
        job_id: str,
        payload: dict[str, Any],
        epsilon: float,
        *,
        review: bool = False,
        audit: AuditBatch | None = None,
        history: _HeldHistory | None = None,
    ) -> JobPublic:
        envelope = canonical_json(sign_payload(self.key, payload)).decode()
        held = None
        audit = audit or AuditBatch(self._record, self._record_many, self._clock)
        try:
            if review:
                with self.db.session() as s:
                    if history is not None:
                        history.store(s)
                    row = s.get(JobRow, job_id)
                    if row is None:
                        raise NotFoundError(f"no job {job_id!r}")
                    held = self.review.hold(s, row, envelope, epsilon)
                    s.commit()
                    summary = {"id": held.id, "state": held.state, "approvals": 0, "required": held.required}
                    out = _public(row, review=summary)
            else:
                # Core statements only (the guard's sets, the UPDATE ... RETURNING): a plain connection's
                # transaction, not an ORM session's, on every job.
                with self.db.writing_core() as c:
                    if history is not None:
                        history.store(c)
                    stored = self._finish(c, job_id, JobState.SUCCEEDED, result=envelope, epsilon=epsilon)
                out = _public(stored)
        except Exception as exc:
            # Cancelled meanwhile, or the store failed: nothing is released, but the job's decision,
            # cohort and spent budget happened and its held entries are evidence of them.
            why = str(getattr(exc, "detail", "")) or type(exc).__name__
            audit(
                payload["consumer"],
                "dataplane.job.run",
                f"job:{job_id}",
                Outcome.FAILURE,
                f"the result was not stored: {why}"[:2000],
                scenario_id=payload["scenario"],
                agreement_id=payload["agreement_id"],
                details={"job_id": job_id, "epsilon_spent": epsilon},
            )
            audit.flush()
            raise
        audit(
            out.consumer_id,
            "dataplane.job.run",
            f"job:{job_id}",
            Outcome.SUCCESS,
            scenario_id=out.scenario_id,
            agreement_id=out.agreement_id,
            details={"job_id": job_id, "epsilon_spent": epsilon, "kind": out.kind, "held": review},
        )
        if held is not None:
            audit(
                f"connector:{self.provider_id}",
                "dataplane.review.hold",
                f"review:{held.id}",
                Outcome.SUCCESS,
                "the agreement requires output review",
                scenario_id=out.scenario_id,
                agreement_id=out.agreement_id,
                details={"job_id": job_id, "required": held.required},
            )
        audit.flush()
        return out

    def _finish(self, s: Session | Connection, job_id: str, target: JobState, **values: Any) -> RowMapping:
        """Move a RUNNING job to `target` with `values`, in `s`: one UPDATE ... RETURNING on the Core
        table (this runs on every job; the ORM would load the row first). The transition is checked
        against the state machine, and the UPDATE applies only while the stored state is RUNNING; a
        job in any other state gets the state machine's refusal."""
        source = JobState.RUNNING
        JOB.transition(source, target)
        t = _JOBS
        stored = s.execute(
            _finish_statement(frozenset(values)),
            {"b_id": job_id, "b_source": source.value, "state": target.value, "updated_at": self._clock.now()}
            | values,
        ).one_or_none()
        if stored is None:
            current = s.execute(select(t.c.state).where(t.c.id == job_id)).scalar_one_or_none()
            if current is None:
                raise NotFoundError(f"no job {job_id!r}")
            JOB.transition(JobState(current), target)  # refuses: the job is no longer RUNNING
            raise ConflictError(f"job {job_id!r} changed state meanwhile")
        return stored._mapping

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
        """The job; a HELD job shows its review's progress, never the result (released only on approval)."""
        row = self._own(checked, job_id)
        glm = self._glm_info(job_id) if row.kind == "glm" else None
        return _public(row, glm, self.review.summary_of_job(job_id))

    def cancel(self, checked: _Checked, job_id: str) -> JobPublic:
        """Cancel a queued job or an open GLM session; a finished job answers 409 (invalid transition)."""
        row = self._own(checked, job_id)
        row = self._move(job_id, JobState.CANCELLED, "cancelled by the consumer")
        self._sessions.pop(job_id, None)
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

    def _build_sites(
        self, spec: QuerySpec, consent: Any, rules: DisclosureRules, glms: list[GlmAnalysis]
    ) -> dict[str, GlmSite]:
        with self._engine_lock:
            engine = DuckDBEngine(self._connect())
            return {a.id: GlmSite(engine, consent, spec, a.id, rules) for a in glms}

    def _open_glm(
        self,
        job_id: str,
        spec: QuerySpec,
        consent: Any,
        rules: DisclosureRules,
        glms: list[GlmAnalysis],
    ) -> JobPublic:
        sites = self._build_sites(spec, consent, rules, glms)
        analyses = {
            aid: {
                "family": site.family,
                "names": site.names,
                "n_params": site.n_params,
                "rows": site.rows,
                "design_sha256": site.design_digest(),
            }
            for aid, site in sites.items()
        }
        now = self._clock.now()
        with self.db.session() as s:
            s.add(
                GlmSessionRow(
                    job_id=job_id,
                    analyses=orjson.dumps(analyses).decode(),
                    iterations=0,
                    max_iterations=self._glm_max,
                    last_beta=None,
                    opened_at=now,
                    updated_at=now,
                )
            )
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id!r}")
            out = _public(row, _glm_public(analyses))
        self._sessions[job_id] = _GlmSession(sites)
        return out

    def fail_interrupted(self) -> list[str]:
        """End as FAILED (audited) the jobs a stopped process left RUNNING; returns their ids.

        A query job runs inside its request, and a GLM job is RUNNING without a recorded session only
        until `_open_glm` stores one: either one still RUNNING whose process is gone was cut off by a
        crash or a kill. Its result never left, and the entries it would have appended when it ended
        (decision, cohort, outcome) were never written; this entry is the evidence that it ran. GLM
        jobs with a recorded session are left alone: they resume.

        A job's process is gone when it is neither this one nor among `live_runners()` (the
        connector's processes whose instance lease is live). Called at start-up, and by the one
        process that holds the sweep duty while the connector runs (a worker that dies while others
        serve leaves its jobs to them).
        """
        with self.db.session() as s:
            running = list(
                s.execute(
                    select(
                        JobRow.id, JobRow.agreement_id, JobRow.scenario_id, JobRow.consumer_id, JobRow.runner
                    )
                    .outerjoin(GlmSessionRow, GlmSessionRow.job_id == JobRow.id)
                    .where(JobRow.state == JobState.RUNNING.value, GlmSessionRow.job_id.is_(None))
                )
            )
        if not running:
            return []
        # Read after the jobs: a process that started a job after that read is alive in this one.
        alive = {self.runner, *self._live_runners()}
        why = "interrupted: the data plane stopped while the job ran; nothing was released"
        failed: list[str] = []
        for job_id, agreement_id, scenario, consumer, runner in running:
            if runner in alive:
                continue
            with self.db.session() as s:
                try:
                    self._finish(s, job_id, JobState.FAILED, reason=why)
                except ConflictError:
                    continue  # ended meanwhile
                s.commit()
            self._record(
                consumer,
                "dataplane.job.run",
                f"job:{job_id}",
                Outcome.FAILURE,
                why,
                scenario_id=scenario,
                agreement_id=agreement_id,
                details={"job_id": job_id, "interrupted": True},
            )
            failed.append(job_id)
        return failed

    def close_idle_glm_sessions(self, limit: int = 100) -> list[str]:
        """Fail the open GLM sessions untouched for `glm_idle` (at most `limit` per call; called when
        a session opens, so abandoned ones do not stay RUNNING for ever). Returns their job ids."""
        cutoff = self._clock.now() - self._glm_idle
        with self.db.session() as s:
            stale = list(
                s.execute(
                    select(JobRow.id, JobRow.agreement_id, JobRow.scenario_id, JobRow.consumer_id)
                    .join(GlmSessionRow, GlmSessionRow.job_id == JobRow.id)
                    .where(JobRow.state == JobState.RUNNING.value, GlmSessionRow.updated_at < cutoff)
                    .limit(max(1, limit))
                )
            )
        closed: list[str] = []
        why = f"GLM session idle for more than {self._glm_idle}; closed"
        for job_id, agreement_id, scenario, consumer in stale:
            try:
                self._move(job_id, JobState.FAILED, why)
            except ConflictError:
                continue  # finished or cancelled meanwhile: nothing to close
            self._sessions.pop(job_id, None)
            self._record(
                f"connector:{self.provider_id}",
                "dataplane.glm.close",
                f"job:{job_id}",
                Outcome.SUCCESS,
                why,
                scenario_id=scenario,
                agreement_id=agreement_id,
                details={"job_id": job_id, "consumer_id": consumer},
            )
            closed.append(job_id)
        return closed

    def _glm_record(self, job_id: str) -> GlmSessionRow | None:
        with self.db.session() as s:
            return s.get(GlmSessionRow, job_id)

    def _glm_info(self, job_id: str) -> dict[str, Any] | None:
        rec = self._glm_record(job_id)
        return None if rec is None else _glm_public(orjson.loads(rec.analyses))

    def _session(self, checked: _Checked, row: JobRow, rec: GlmSessionRow) -> _GlmSession:
        """The session's designs: in memory, or rebuilt (after a restart, or in another worker process
        than the one that opened it) and checked to be the same."""
        with self._resume_lock:
            held = self._sessions.get(row.id)
            if held is not None:
                return held
            recorded: dict[str, Any] = orjson.loads(rec.analyses)
            spec = parse_spec(orjson.loads(row.spec))
            rules = rules_from_policy(checked.agreement.policy, self._k_default)
            glms = [a for a in spec.analyses if isinstance(a, GlmAnalysis)]
            try:
                # Consent as of now: a patient who withdrew since the session opened is not used again,
                # and the digest check below then closes the session rather than mix two cohorts.
                consent = self._consent().cohort(
                    row.scenario_id,
                    data_classes_of(spec),
                    actor=f"dataplane:{row.id}",
                    at=self._clock.now(),
                )
                sites = self._build_sites(spec, consent, rules, glms)
                changed = [
                    aid
                    for aid, site in sites.items()
                    if site.design_digest() != recorded.get(aid, {}).get("design_sha256")
                ]
            except Exception as exc:
                self._end_on_error(row.id, row.agreement_id, row.scenario_id, row.consumer_id, exc)
                raise
            if changed:
                why = (
                    f"the data of GLM analyses {', '.join(sorted(changed))} changed since the session "
                    "opened (records or consent); the session is closed, start a new one"
                )
                self._end_on_error(
                    row.id, row.agreement_id, row.scenario_id, row.consumer_id, ConflictError(why)
                )
                raise ConflictError(why, reason="glm-data-changed")
            self._record(
                row.consumer_id,
                "dataplane.glm.resume",
                f"job:{row.id}",
                Outcome.SUCCESS,
                "session rebuilt in this process (after a restart, or opened by another worker); "
                "same designs",
                scenario_id=row.scenario_id,
                agreement_id=row.agreement_id,
                details={"job_id": row.id, "iterations": rec.iterations},
            )
            session = _GlmSession(sites)
            self._sessions[row.id] = session
            return session

    def glm_step(self, checked: _Checked, job_id: str, step: GlmStep) -> dict[str, Any]:
        """One iteration: this site's signed `SiteStats` at the coordinator's β."""
        row = self._own(checked, job_id)
        rec = self._glm_record(job_id)
        if row.state != JobState.RUNNING.value or rec is None:
            raise ConflictError(f"job {job_id!r} is {row.state}, not an open GLM session")
        if step.analysis not in orjson.loads(rec.analyses):
            raise NotFoundError(f"job {job_id!r} has no glm analysis {step.analysis!r}")
        session = self._session(checked, row, rec)
        site = session.sites[step.analysis]
        with self.db.session() as s:
            # Bounded, and counted in the database so a restart cannot reset the count: every β
            # answered reveals aggregates at a point of the coordinator's choosing.
            bumped = s.execute(
                update(GlmSessionRow)
                .where(
                    GlmSessionRow.job_id == job_id,
                    GlmSessionRow.iterations < GlmSessionRow.max_iterations,
                )
                .values(
                    iterations=GlmSessionRow.iterations + 1,
                    last_beta=orjson.dumps(list(step.beta)).decode(),
                    updated_at=self._clock.now(),
                )
            )
            if getattr(bumped, "rowcount", 0) != 1:
                raise ForbiddenError(
                    f"the GLM session has used its {rec.max_iterations} iterations",
                    reason="glm-iterations",
                )
            n = int(s.scalar(select(GlmSessionRow.iterations).where(GlmSessionRow.job_id == job_id)) or 0)
        with session.lock:
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
        rec = self._glm_record(job_id)
        if row.state != JobState.RUNNING.value or rec is None:
            raise ConflictError(f"job {job_id!r} is {row.state}, not an open GLM session")
        self._sessions.pop(job_id, None)
        analyses: dict[str, Any] = orjson.loads(rec.analyses)
        result = {
            "version": 1,
            "job_id": job_id,
            "dataset_id": row.dataset_id,
            "analyses": {
                aid: {
                    "type": "glm",
                    "family": a["family"],
                    "names": a["names"],
                    "iterations": rec.iterations,
                    "rows": a.get("rows"),  # complete cases: also in every step's statistics
                }
                for aid, a in analyses.items()
            },
        }
        payload = self._payload(
            job_id, checked.grant, checked.agreement, row.scenario_id, result, self._clock.now()
        )
        out = self._succeed(job_id, payload, 0.0)
        out.glm = _glm_public(analyses)
        return out


def _glm_public(analyses: Mapping[str, Any]) -> dict[str, Any]:
    return {
        aid: {"family": a["family"], "names": a["names"], "n_params": a["n_params"]}
        for aid, a in analyses.items()
    }
