"""The connector: one per participant. This module holds its runtime, start-up and HTTP surface.

Trust chain: the connector pins the authority's public key (config), holds its own Ed25519 key
(encrypted at rest) and the membership credential the authority issued for it. It answers peers that
present a valid request token, and proves itself to peers the same way.

The policy gate in front of agreeing and starting, and withdrawal handling, are in `connector/gate.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import AnyHttpUrl, BaseModel

from healthspace import __version__
from healthspace.audit.api import make_router as make_audit_router
from healthspace.audit.api import sign_heads_periodically
from healthspace.audit.log import AuditLog
from healthspace.audit.models import Outcome
from healthspace.connector.config import CREDENTIAL_FILE, KEY_FILE, ConnectorConfig
from healthspace.connector.dataplane import (
    ConsumerProfile,
    JobService,
    lazy_store_connection,
    make_dataplane_router,
    make_review_router,
)
from healthspace.connector.dsp.api import DspComponents, install_message_lane, make_dsp_routers
from healthspace.connector.dsp.manager import DspManager, peer_http_client
from healthspace.connector.gate import Directory, GatedDspService, PolicyGate, WithdrawalRetirer
from healthspace.consent.api import make_patient_router, make_staff_router
from healthspace.consent.fhir import PatientRefs
from healthspace.consent.models import ScenarioInfo
from healthspace.consent.service import ConsentService
from healthspace.core.apikeys import ApiKeyStore, IssuedKey, Role, StoredKey, role_guard
from healthspace.core.clock import Clock, SystemClock
from healthspace.core.db import Database
from healthspace.core.errors import (
    ConfigurationError,
    ConflictError,
    HealthspaceError,
    ValidationError,
    install_problem_handlers,
)
from healthspace.core.leases import Duty, Housekeeper, Leases, new_instance_id
from healthspace.core.notices import ChangeNotices
from healthspace.core.settings import Settings
from healthspace.data.api import make_data_router
from healthspace.data.keys import LocalKeyStore
from healthspace.data.manager import RetentionManager
from healthspace.data.profile import StandardProfile, load_profile
from healthspace.data.service import DataService
from healthspace.identity.fastapi import PeerAuth, peer_dependency
from healthspace.identity.keys import SigningKey
from healthspace.identity.replay import SqlReplayGuard
from healthspace.identity.revocation import RevocationCache, verify_revocation_list
from healthspace.identity.tokens import Caller, RequestVerifier, mint_request_token
from healthspace.policy.registry import CrossBorderCache, CrossBorderSet, verify_approvals, verify_rules
from healthspace.protocol.schemas import find_schema_dir

__all__ = [
    "ConnectorRuntime",
    "app_from_environment",
    "check_startup",
    "create_app",
    "init_connector",
    "open_runtime",
]

log = logging.getLogger(__name__)

BRANCHES = ("apikeys", "audit", "identity", "dsp", "consent", "data", "compute", "jobs", "leases")
# Housekeeping done by one of the connector's processes for all (see `core.leases`), in seconds.
RETENTION_EVERY_S = 60.0
INTERRUPTED_JOBS_EVERY_S = 30.0
STAFF_ROLES = (Role.ADMIN, Role.STEWARD, Role.RESEARCHER, Role.REVIEWER, Role.REGULATOR)


@dataclass
class ConnectorRuntime:
    settings: Settings
    config: ConnectorConfig
    key: SigningKey
    credential: str
    db: Database
    audit: AuditLog
    api_keys: ApiKeyStore
    verifier: RequestVerifier
    clock: Clock
    http: httpx.Client
    leases: Leases
    instance: str  # this process among the connector's processes (`core.leases.new_instance_id`)
    dsp: DspComponents | None = None
    consent: ConsentService | None = None
    gate: PolicyGate | None = None
    data: DataService | None = None
    jobs: JobService | None = None

    def duties(self) -> list[Duty]:
        """What one of the connector's processes does for all."""
        duties = []
        if self.data is not None:
            duties.append(
                Duty("data.retention", RETENTION_EVERY_S, RetentionManager(self.data, self.clock).run_due)
            )
        if self.jobs is not None:
            duties.append(Duty("jobs.interrupted", INTERRUPTED_JOBS_EVERY_S, self.jobs.fail_interrupted))
        return duties

    def housekeeper(self, notices: ChangeNotices | None = None) -> Housekeeper:
        """The duties, and this process's heartbeat (which also tells `notices` whether other
        processes are alive to be told of changes)."""
        on_live = None
        if notices is not None:

            def on_live(live: frozenset[str]) -> None:
                notices.others_alive = bool(live - {self.instance})

        return Housekeeper(self.leases, self.instance, self.duties(), clock=self.clock, on_live=on_live)

    def change_notices(self) -> ChangeNotices | None:
        """On PostgreSQL, where several processes may serve one connector: notices of DSP changes
        between them, so a long poll in one sees a message another received at once."""
        if self.db.dialect != "postgresql" or self.dsp is None:
            return None
        service = self.dsp.service
        notices = ChangeNotices(self.db, self.instance, service.changed_elsewhere)
        service.broadcast = notices.publish
        return notices

    def close(self) -> None:
        if self.dsp is not None:
            self.dsp.manager.stop()
            self.dsp.http.close()
        self.http.close()
        self.audit.close()
        self.db.dispose()

    def peer_auth(self, audience: str) -> PeerAuth:
        # The runtime's clock, like the verifiers': tokens and checks then agree on the time.
        return PeerAuth(self.key, self.credential, self.config.participant_id, audience, clock=self.clock)

    def record(self, actor: str, action: str, subject: str, outcome: Outcome, reason: str = "") -> None:
        self.audit.record(actor, action, subject, outcome, reason)


def init_connector(settings: Settings, config: ConnectorConfig) -> dict[Role, IssuedKey]:
    """Create a connector in `settings.data_dir`: its key pair, config, database and staff API keys.

    The credential is added later by `install_credential`, once the authority has onboarded the
    participant with the public key made here (the private key never leaves this directory).
    """
    d = settings.data_dir
    if (d / KEY_FILE).exists():
        raise ConflictError(f"a connector already exists in {d}; use another --data-dir")
    config.save(d)
    SigningKey.generate().save(d / KEY_FILE, settings.key_encryption_key())
    db = Database(settings.database_url_for("connector"), branches=BRANCHES)
    try:
        store = ApiKeyStore(db)
        return {r: store.issue(r, f"{r.value} (initial)") for r in STAFF_ROLES}
    finally:
        db.dispose()


def public_key_of(settings: Settings) -> str:
    return SigningKey.load(settings.data_dir / KEY_FILE, settings.key_encryption_key()).public_key_b64


def install_credential(settings: Settings, credential: str) -> None:
    path = settings.data_dir / CREDENTIAL_FILE
    path.write_text(credential)
    path.chmod(0o600)


def open_runtime(settings: Settings, clock: Clock | None = None) -> ConnectorRuntime:
    d = settings.data_dir
    config = ConnectorConfig.load(d)
    try:
        credential = (d / CREDENTIAL_FILE).read_text().strip()
    except FileNotFoundError:
        raise ConfigurationError(
            f"connector in {d} has no membership credential yet; onboard it at the authority first"
        ) from None
    clock = clock or SystemClock()
    key = SigningKey.load(d / KEY_FILE, settings.key_encryption_key())
    db = Database(settings.database_url_for("connector"), branches=BRANCHES)
    http = httpx.Client(timeout=10.0)

    def fetch_revocations() -> Any:
        r = http.get(f"{config.authority_url}/revocations")
        r.raise_for_status()
        return verify_revocation_list(
            r.json()["revocation_list"], config.authority_public_key, config.authority_id
        )

    verifier = RequestVerifier(
        authority_public_key_b64=config.authority_public_key,
        authority_id=config.authority_id,
        audience=config.participant_id,
        revocations=RevocationCache(
            fetch_revocations, clock=clock, max_age=timedelta(seconds=settings.revocation_max_age_s)
        ),
        replay=SqlReplayGuard(db),
        clock=clock,
    )
    rt = ConnectorRuntime(
        settings,
        config,
        key,
        credential,
        db,
        AuditLog(db, key, clock),
        ApiKeyStore(db),
        verifier,
        clock,
        http,
        Leases(db, clock),
        new_instance_id(),
    )
    if config.patient_id_prefix:
        rt.consent = ConsentService(
            db, rt.audit, key, config.participant_id, PatientRefs(config.patient_id_prefix), clock=clock
        )
    rt.gate = _make_gate(rt)
    rt.data = DataService(
        db,
        rt.audit,
        key,
        LocalKeyStore(d / "keys"),
        d / "clinical",
        organisation=config.legal_name,
        clock=clock,
        import_root=d / "import",
    )
    service = GatedDspService(
        db,
        participant_id=config.participant_id,
        public_url=config.public_url,
        key=key,
        clock=clock,
        record=rt.record,
        record_many=rt.audit.record_many,
        gate=rt.gate,
        audit=rt.audit,
    )
    dsp_http = peer_http_client()
    rt.dsp = DspComponents(service, DspManager(service, dsp_http, rt.peer_auth), dsp_http, rt.peer_auth)
    if rt.consent is not None:
        rt.consent.on_withdrawal(WithdrawalRetirer(service, rt.consent, f"connector:{config.participant_id}"))
    if rt.consent is not None:
        rt.jobs = _make_jobs(rt, rt.consent, rt.dsp, rt.gate)
        rt.jobs.fail_interrupted()
    return rt


def _make_jobs(
    rt: ConnectorRuntime, consent: ConsentService, dsp: DspComponents, gate: PolicyGate
) -> JobService:
    """The data plane of a hospital: jobs under started compute-to-data transfers, on its clinical store.

    Jobs run on the connector's primary clinical dataset, `<participant id>-ehr` (one clinical dataset
    per connector for now; mapping DSP datasets to several clinical datasets is future work).
    """
    d, me = rt.settings.data_dir, rt.config.participant_id

    def consumer(participant_id: str) -> ConsumerProfile:
        member = gate.directory.get(participant_id)
        if member is None:  # unknown to the authority: the policy's consumer terms cannot hold
            return ConsumerProfile()
        return ConsumerProfile(member.jurisdiction, member.type, member.roles)

    return JobService(
        rt.db,
        provider_id=me,
        provider_jurisdiction=rt.config.jurisdiction,
        key=rt.key,
        agreement=dsp.service.agreement,
        transfer=dsp.service.transfer,
        consent=lambda: consent,
        connect=lazy_store_connection(d / "clinical" / "live" / f"{me}-ehr", d / "keys"),
        record=rt.audit.record,
        record_many=rt.audit.append_many,
        clock=rt.clock,
        consumer=consumer,
        approvals=lambda: gate.cross_border.current().approvals,
        gate=gate,
        runner=rt.instance,
        live_runners=rt.leases.live_instances,
    )


def _make_gate(rt: ConnectorRuntime) -> PolicyGate:
    """The gate, reading the authority's directory and signed cross-border documents (same freshness as
    the revocation list: `revocation_max_age_s`)."""
    c = rt.config
    base = c.authority_url.rstrip("/")

    def fetch_cross_border() -> CrossBorderSet:
        r = rt.http.get(f"{base}/cross-border/rules")
        r.raise_for_status()
        rules_at, rules = verify_rules(r.json()["rules"], c.authority_public_key, c.authority_id)
        a = rt.http.get(f"{base}/cross-border/approvals", auth=rt.peer_auth(c.authority_id))
        a.raise_for_status()
        approvals_at, approvals = verify_approvals(
            a.json()["approvals"], c.authority_public_key, c.authority_id, c.participant_id
        )
        return CrossBorderSet(rules, tuple(approvals), min(rules_at, approvals_at))

    def fetch_members() -> Any:
        r = rt.http.get(f"{base}/participants", auth=rt.peer_auth(c.authority_id))
        r.raise_for_status()
        return r.json()

    max_age = timedelta(seconds=rt.settings.revocation_max_age_s)
    return PolicyGate(
        c.participant_id,
        c.jurisdiction,
        Directory(fetch_members, rt.clock, max_age),
        CrossBorderCache(fetch_cross_border, clock=rt.clock, max_age=max_age),
        rt.clock,
        has_consent_registry=rt.consent is not None,
    )


class _PublishedStandards:
    """Data standards as the authority publishes them, fetched on first use and kept `TTL_S` seconds.

    Fails closed: a standard the authority does not publish, or cannot be reached for, is an error and
    nothing is loaded (loading against a built-in stand-in would silently apply the wrong rules)."""

    TTL_S = 300.0

    def __init__(self, rt: ConnectorRuntime) -> None:
        self._rt = rt
        self._cache: dict[str, tuple[float, StandardProfile]] = {}

    def __call__(self, standard_id: str) -> StandardProfile:
        held = self._cache.get(standard_id)
        if held is not None and time.monotonic() - held[0] < self.TTL_S:
            return held[1]
        url = f"{self._rt.config.authority_url}/standards/{quote(standard_id, safe='')}"
        try:
            r = self._rt.http.get(url)
        except httpx.HTTPError as exc:
            raise StandardUnavailableError(
                f"the authority cannot be reached for standard {standard_id!r} ({type(exc).__name__})"
            ) from None
        if r.status_code == 404:
            raise ValidationError(f"the authority publishes no standard {standard_id!r}")
        if r.status_code != 200:
            raise StandardUnavailableError(
                f"the authority answered HTTP {r.status_code} for standard {standard_id!r}"
            )
        profile = load_profile(r.content)
        self._cache[standard_id] = (time.monotonic(), profile)
        return profile


class StandardUnavailableError(HealthspaceError):
    status = 503
    code = "standard-unavailable"
    title = "The data standard cannot be fetched"


class _ScenarioDirectory:
    """The authority's scenario registry as patients see it, fetched and kept for a minute.

    When the authority cannot be reached and nothing is cached, the list is empty: a patient can then
    grant nothing, which is the safe failure."""

    TTL_S = 60.0

    def __init__(self, rt: ConnectorRuntime) -> None:
        self._rt = rt
        self._cached: list[ScenarioInfo] = []
        self._fetched_at = -self.TTL_S

    def __call__(self) -> list[ScenarioInfo]:
        if time.monotonic() - self._fetched_at >= self.TTL_S:
            try:
                r = self._rt.http.get(f"{self._rt.config.authority_url}/scenarios")
                r.raise_for_status()
                self._cached = [
                    ScenarioInfo(s["id"], s["title"], s.get("description", ""), tuple(s["data_classes"]))
                    for s in r.json()
                    if s.get("status") == "ACTIVE"
                ]
                self._fetched_at = time.monotonic()
            except (httpx.HTTPError, ValueError, KeyError):
                log.warning("scenario registry unreachable; serving %d cached scenarios", len(self._cached))
        return self._cached


# --- HTTP -----------------------------------------------------------------------------------------


def _rt(request: Request) -> ConnectorRuntime:
    rt: ConnectorRuntime = request.app.state.runtime
    return rt


def _record_auth_failure(request: Request, error: HealthspaceError) -> None:
    _rt(request).record(
        "unauthenticated",
        "peer.authenticate",
        f"{request.method} {request.url.path}",
        Outcome.DENIED,
        str(error.extra.get("reason", error.code)),
    )


Runtime = Annotated[ConnectorRuntime, Depends(_rt)]
_authenticate_peer = peer_dependency(lambda r: _rt(r).verifier, _record_auth_failure)
Peer = Annotated[Caller, Depends(_authenticate_peer)]
AnyStaff = Annotated[StoredKey, Depends(role_guard(lambda r: _rt(r).api_keys, *STAFF_ROLES))]
Admin = Annotated[StoredKey, Depends(role_guard(lambda r: _rt(r).api_keys, Role.ADMIN))]


class Hello(BaseModel):
    participant_id: str
    caller: str
    proof: str  # a request token from us to the caller: the answer authenticates us in turn


class TrustCheckRequest(BaseModel):
    url: AnyHttpUrl


class TrustCheckResult(BaseModel):
    peer_id: str
    url: str
    authenticated: bool
    mutual: bool
    status_code: int
    detail: str = ""


public = APIRouter(tags=["public"])
peer = APIRouter(prefix="/peer", tags=["peer"])
management = APIRouter(prefix="/management", tags=["management"])


@public.get("/health")
def health(rt: Runtime) -> dict[str, Any]:
    return {"status": "ok", "service": "connector", "id": rt.config.participant_id, "version": __version__}


@public.get("/.well-known/healthspace")
def self_description(rt: Runtime) -> dict[str, Any]:
    c = rt.config
    return {
        "id": c.participant_id,
        "legal_name": c.legal_name,
        "type": c.participant_type,
        "jurisdiction": c.jurisdiction,
        "roles": c.roles,
        "public_key": rt.key.public_key_b64,
        "key_id": rt.key.key_id,
        "authority": {"id": c.authority_id, "url": c.authority_url},
        "endpoints": {"peer": "/peer", "management": "/management", "audit": "/audit"},
        "version": __version__,
    }


@peer.post("/hello")
def hello(rt: Runtime, caller: Peer) -> Hello:
    """Proves the trust chain: the caller's token verified here; our proof lets the caller verify us."""
    me = rt.config.participant_id
    rt.record(caller.participant_id, "peer.hello", me, Outcome.SUCCESS)
    proof = mint_request_token(rt.key, rt.credential, me, caller.participant_id, rt.clock.now())
    return Hello(participant_id=me, caller=caller.participant_id, proof=proof)


@management.get("/whoami")
def whoami(rt: Runtime, key: AnyStaff) -> dict[str, str]:
    return {"participant_id": rt.config.participant_id, "role": key.role.value, "key_id": key.key_id}


class ProcessesPublic(BaseModel):
    this: str  # the process that answered
    live: list[str]  # processes whose heartbeat is current (this one included)
    duties: dict[str, str | None]  # each housekeeping duty's process (None: not taken yet)


@management.get("/processes")
def processes(rt: Runtime, key: Admin) -> ProcessesPublic:
    """The connector's live processes (`serve --workers N`) and which one does each duty: what an
    operator checks after a worker died or a deployment changed."""
    return ProcessesPublic(
        this=rt.instance,
        live=sorted(rt.leases.live_instances()),
        duties={d.name: rt.leases.holder(d.name) for d in rt.duties()},
    )


@management.post("/trust-check")
def trust_check(body: TrustCheckRequest, rt: Runtime, key: Admin) -> TrustCheckResult:
    """Authenticate to the connector at `url` and verify its answer: both directions of the trust chain."""
    url = str(body.url).rstrip("/")
    try:
        desc = rt.http.get(f"{url}/.well-known/healthspace").json()
        peer_id = str(desc["id"])
        r = rt.http.post(f"{url}/peer/hello", auth=rt.peer_auth(peer_id))
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return TrustCheckResult(
            peer_id="",
            url=url,
            authenticated=False,
            mutual=False,
            status_code=0,
            detail=f"peer unreachable or not a connector: {type(exc).__name__}",
        )
    if r.status_code != 200:
        rt.record(
            f"admin:{key.key_id}", "peer.trust-check", peer_id, Outcome.FAILURE, f"HTTP {r.status_code}"
        )
        return TrustCheckResult(
            peer_id=peer_id,
            url=url,
            authenticated=False,
            mutual=False,
            status_code=r.status_code,
            detail=r.text[:500],
        )
    try:
        answer = rt.verifier.verify(f"Bearer {r.json()['proof']}")
        mutual = answer.participant_id == peer_id
        detail = "" if mutual else f"proof is from {answer.participant_id}, not {peer_id}"
    except HealthspaceError as exc:
        mutual, detail = False, f"peer's proof refused: {exc.detail}"
    rt.record(
        f"admin:{key.key_id}",
        "peer.trust-check",
        peer_id,
        Outcome.SUCCESS if mutual else Outcome.FAILURE,
        detail,
    )
    return TrustCheckResult(
        peer_id=peer_id, url=url, authenticated=True, mutual=mutual, status_code=200, detail=detail
    )


def _dsp(request: Request) -> DspComponents:
    components = _rt(request).dsp
    if components is None:
        raise ConfigurationError("DSP is not set up on this connector")
    return components


def _staff(*roles: Role) -> Any:
    return role_guard(lambda r: _rt(r).api_keys, *roles)


def check_startup(settings: Settings) -> None:
    """What `create_app` checks before serving (schemas, key, credential, database and its migrations),
    without serving: a runtime opened and closed again."""
    # Every DSP message in and out is checked against the schemas, loaded on first use: without them a
    # peer's first message would meet a 500. Refuse to start instead, naming where we looked.
    find_schema_dir()
    open_runtime(settings).close()


def app_from_environment() -> FastAPI:
    """The app factory of each worker process of `connector serve --workers N`: settings from the
    `HEALTHSPACE_*` variables the supervisor passed on."""
    return create_app(Settings())


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    find_schema_dir()  # see `check_startup`
    rt = open_runtime(settings or Settings(), clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        signer = asyncio.create_task(sign_heads_periodically(rt.audit, rt.settings.audit_head_interval_s))
        notices = rt.change_notices()
        if notices is not None:
            notices.start()
        housekeeper = rt.housekeeper(notices)
        housekeeper.start()
        if rt.dsp is not None:
            rt.dsp.manager.start()
        yield
        housekeeper.stop()
        if notices is not None:
            notices.stop()
        signer.cancel()
        rt.audit.tree_head()  # the last entries leave covered by a signed head
        rt.close()

    app = FastAPI(
        lifespan=lifespan,
        title=f"healthspace connector: {rt.config.legal_name}",
        version=__version__,
        description="A participant's connector: peer API, management API and audit log.",
    )
    app.state.runtime = rt
    install_problem_handlers(app)
    app.include_router(public)
    app.include_router(peer)
    app.include_router(management)
    dsp_routers = make_dsp_routers(_dsp, _authenticate_peer, _staff)
    for router in dsp_routers:
        app.include_router(router)
    install_message_lane(app, dsp_routers)
    if rt.consent is not None:
        consent = rt.consent
        app.include_router(make_patient_router(lambda: consent, _ScenarioDirectory(rt)))
        app.include_router(
            make_staff_router(lambda: consent, role_guard(lambda _: rt.api_keys, Role.ADMIN, Role.STEWARD))
        )
    if rt.data is not None:
        data = rt.data
        app.include_router(make_data_router(lambda: data, _staff, resolve_standard=_PublishedStandards(rt)))
    if rt.jobs is not None:
        jobs = rt.jobs
        app.include_router(make_dataplane_router(lambda: jobs))
        app.include_router(make_review_router(lambda: jobs, _staff))
    app.include_router(
        make_audit_router(lambda: rt.audit, role_guard(lambda _: rt.api_keys, Role.ADMIN, Role.REGULATOR))
    )
    return app
