"""The data space authority service: registry, credentials, revocations, scenarios and its audit log.

On disk (`<data_dir>`): `authority.json` (id and name), `authority.key` (Ed25519, encrypted with the KEK)
and the control-plane database `authority.db` unless `HEALTHSPACE_DATABASE_URL` points elsewhere.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, status
from pydantic import BaseModel, Field

from healthspace import __version__
from healthspace.audit.api import make_router as make_audit_router
from healthspace.audit.api import sign_heads_periodically
from healthspace.audit.log import AuditLog
from healthspace.audit.models import Outcome
from healthspace.authority.models import (
    ExportApprovalCreate,
    ExportApprovalPublic,
    ParticipantCreate,
    ParticipantPublic,
    ScenarioCreate,
    ScenarioPublic,
    ScenarioStatus,
)
from healthspace.authority.service import AuthorityService
from healthspace.core.apikeys import ApiKeyStore, IssuedKey, Role, StoredKey, role_guard
from healthspace.core.clock import Clock, SystemClock
from healthspace.core.db import Database
from healthspace.core.errors import (
    ConfigurationError,
    ConflictError,
    HealthspaceError,
    install_problem_handlers,
)
from healthspace.core.settings import Settings
from healthspace.identity.fastapi import peer_dependency
from healthspace.identity.keys import SigningKey
from healthspace.identity.replay import SqlReplayGuard
from healthspace.identity.tokens import Caller, RequestVerifier

__all__ = ["AuthorityRuntime", "create_app", "init_authority", "open_runtime"]

CONFIG_FILE = "authority.json"
KEY_FILE = "authority.key"
BRANCHES = ("apikeys", "audit", "identity", "authority")


@dataclass
class AuthorityRuntime:
    settings: Settings
    authority_id: str
    name: str
    key: SigningKey
    db: Database
    audit: AuditLog
    api_keys: ApiKeyStore
    service: AuthorityService
    verifier: RequestVerifier
    clock: Clock

    def close(self) -> None:
        self.audit.close()
        self.db.dispose()


def init_authority(settings: Settings, authority_id: str, name: str) -> dict[Role, IssuedKey]:
    """Create a new authority in `settings.data_dir`: key pair, config, database, staff API keys.

    Returns the API keys (plaintext shown once). Refuses to overwrite an existing authority.
    """
    d = settings.data_dir
    if (d / CONFIG_FILE).exists():
        raise ConflictError(f"an authority already exists in {d}; use another --data-dir")
    d.mkdir(parents=True, exist_ok=True)
    SigningKey.generate().save(d / KEY_FILE, settings.key_encryption_key())
    (d / CONFIG_FILE).write_text(json.dumps({"id": authority_id, "name": name}, indent=2))
    db = Database(settings.database_url_for("authority"), branches=BRANCHES)
    try:
        store = ApiKeyStore(db)
        return {r: store.issue(r, f"{r.value} (initial)") for r in (Role.ADMIN, Role.REGULATOR)}
    finally:
        db.dispose()


def open_runtime(settings: Settings, clock: Clock | None = None) -> AuthorityRuntime:
    d = settings.data_dir
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ConfigurationError(
            f"no authority in {d} (missing {CONFIG_FILE}); run `healthspace authority init` first"
        ) from None
    clock = clock or SystemClock()
    key = SigningKey.load(d / KEY_FILE, settings.key_encryption_key())
    db = Database(settings.database_url_for("authority"), branches=BRANCHES)
    audit = AuditLog(db, key, clock)
    service = AuthorityService(db, key, config["id"], audit, clock)
    verifier = RequestVerifier(
        authority_public_key_b64=key.public_key_b64,
        authority_id=config["id"],
        audience=config["id"],
        revocations=service,
        replay=SqlReplayGuard(db),
        clock=clock,
    )
    return AuthorityRuntime(
        settings, config["id"], config["name"], key, db, audit, ApiKeyStore(db), service, verifier, clock
    )


# --- HTTP -----------------------------------------------------------------------------------------


def _rt(request: Request) -> AuthorityRuntime:
    rt: AuthorityRuntime = request.app.state.runtime
    return rt


Runtime = Annotated[AuthorityRuntime, Depends(_rt)]
Admin = Annotated[StoredKey, Depends(role_guard(lambda r: _rt(r).api_keys, Role.ADMIN))]


def _record_auth_failure(request: Request, error: HealthspaceError) -> None:
    reason = str(error.extra.get("reason", error.code))
    _rt(request).audit.record(
        "unauthenticated", "peer.authenticate", f"{request.method} {request.url.path}", Outcome.DENIED, reason
    )


Peer = Annotated[Caller, Depends(peer_dependency(lambda r: _rt(r).verifier, _record_auth_failure))]


class OnboardResult(BaseModel):
    participant: ParticipantPublic
    credential: str = Field(description="The membership credential (signed token); store it with the key.")


class RevokeRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=1000)


class ScenarioStatusChange(BaseModel):
    status: ScenarioStatus


class DirectoryEntry(BaseModel):
    id: str
    legal_name: str
    type: str
    jurisdiction: str
    roles: list[str]
    connector_url: str | None
    status: str


public = APIRouter(tags=["public"])
admin = APIRouter(prefix="/admin", tags=["admin"])
members = APIRouter(tags=["members"])


@public.get("/health")
def health(rt: Runtime) -> dict[str, Any]:
    return {"status": "ok", "service": "authority", "id": rt.authority_id, "version": __version__}


@public.get("/.well-known/healthspace-authority")
def self_description(rt: Runtime) -> dict[str, Any]:
    """The trust anchor: participants pin this key when they are onboarded."""
    return {
        "id": rt.authority_id,
        "name": rt.name,
        "public_key": rt.key.public_key_b64,
        "key_id": rt.key.key_id,
        "algorithm": "EdDSA",
        "revocations": "/revocations",
        "scenarios": "/scenarios",
        "cross_border_rules": "/cross-border/rules",
        "version": __version__,
    }


@public.get("/revocations")
def revocations(rt: Runtime) -> dict[str, str]:
    return {"revocation_list": rt.service.revocation_list()}


@public.get("/cross-border/rules")
def cross_border_rules(rt: Runtime) -> dict[str, str]:
    """The cross-border rule set every connector applies, signed by the authority (public)."""
    return {"rules": rt.service.signed_cross_border_rules()}


@public.get("/scenarios")
def list_scenarios(rt: Runtime) -> list[ScenarioPublic]:
    """The scenario registry is public: patients and researchers alike read what each use is for."""
    return rt.service.list_scenarios()


@public.get("/scenarios/{scenario_id}")
def get_scenario(scenario_id: str, rt: Runtime) -> ScenarioPublic:
    return rt.service.get_scenario(scenario_id)


@members.get("/participants")
def directory(rt: Runtime, caller: Peer) -> list[DirectoryEntry]:
    """The member directory, for authenticated participants only."""
    return [
        DirectoryEntry(**p.model_dump(include=set(DirectoryEntry.model_fields)))
        for p in rt.service.list_participants()
    ]


@members.get("/cross-border/approvals")
def my_export_approvals(rt: Runtime, caller: Peer) -> dict[str, str]:
    """The export approvals for the calling provider's datasets, signed by the authority."""
    return {"approvals": rt.service.signed_export_approvals(caller.participant_id)}


@admin.post("/export-approvals", status_code=status.HTTP_201_CREATED)
def register_export_approval(body: ExportApprovalCreate, rt: Runtime, key: Admin) -> ExportApprovalPublic:
    return rt.service.register_export_approval(body, actor=f"admin:{key.key_id}")


@admin.get("/export-approvals")
def list_export_approvals(
    rt: Runtime, key: Admin, provider_id: str | None = None
) -> list[ExportApprovalPublic]:
    return rt.service.list_export_approvals(provider_id)


@admin.post("/export-approvals/{approval_id}/revoke")
def revoke_export_approval(
    approval_id: str, body: RevokeRequest, rt: Runtime, key: Admin
) -> ExportApprovalPublic:
    return rt.service.revoke_export_approval(approval_id, body.reason, actor=f"admin:{key.key_id}")


@admin.post("/participants", status_code=status.HTTP_201_CREATED)
def onboard(body: ParticipantCreate, rt: Runtime, key: Admin) -> OnboardResult:
    participant, credential = rt.service.onboard(body, actor=f"admin:{key.key_id}")
    return OnboardResult(participant=participant, credential=credential)


@admin.get("/participants")
def list_participants(rt: Runtime, key: Admin) -> list[ParticipantPublic]:
    return rt.service.list_participants()


@admin.get("/participants/{participant_id}")
def get_participant(participant_id: str, rt: Runtime, key: Admin) -> ParticipantPublic:
    return rt.service.get_participant(participant_id)


@admin.post("/participants/{participant_id}/revoke")
def revoke(participant_id: str, body: RevokeRequest, rt: Runtime, key: Admin) -> ParticipantPublic:
    return rt.service.revoke(participant_id, body.reason, actor=f"admin:{key.key_id}")


@public.get("/standards")
def list_standards(rt: Runtime) -> list[dict[str, Any]]:
    """Published data collection standards (every version); hospitals load their data against them."""
    return rt.service.standards()


@public.get("/standards/{standard_id}")
def get_standard(standard_id: str, rt: Runtime, version: str | None = None) -> dict[str, Any]:
    """A standard's document (the latest version unless `version` is given)."""
    return rt.service.standard(standard_id, version)


@admin.post("/standards", status_code=status.HTTP_201_CREATED)
def publish_standard(body: dict[str, Any], rt: Runtime, key: Admin) -> dict[str, Any]:
    profile = rt.service.publish_standard(body, actor=f"admin:{key.key_id}")
    return {"id": profile.id, "version": profile.version, "title": profile.title}


@admin.post("/scenarios", status_code=status.HTTP_201_CREATED)
def register_scenario(body: ScenarioCreate, rt: Runtime, key: Admin) -> ScenarioPublic:
    return rt.service.register_scenario(body, actor=f"admin:{key.key_id}")


@admin.post("/scenarios/{scenario_id}/status")
def set_scenario_status(
    scenario_id: str, body: ScenarioStatusChange, rt: Runtime, key: Admin
) -> ScenarioPublic:
    return rt.service.set_scenario_status(scenario_id, body.status, actor=f"admin:{key.key_id}")


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    rt = open_runtime(settings or Settings(), clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        signer = asyncio.create_task(sign_heads_periodically(rt.audit, rt.settings.audit_head_interval_s))
        yield
        signer.cancel()
        rt.audit.tree_head()  # the last entries leave covered by a signed head
        rt.close()

    app = FastAPI(
        lifespan=lifespan,
        title="healthspace authority",
        version=__version__,
        description="Participant registry, membership credentials, scenario registry, cross-border rules "
        "and export approvals, and audit log.",
    )
    app.state.runtime = rt
    install_problem_handlers(app)
    app.include_router(public)
    app.include_router(members)
    app.include_router(admin)
    app.include_router(
        make_audit_router(lambda: rt.audit, role_guard(lambda _: rt.api_keys, Role.ADMIN, Role.REGULATOR))
    )
    return app
