"""HTTP surface of DSP on the connector: the DSP 2025-1 endpoints (peer) and the management API (staff).

Routers stay thin: parse the message (`parse_as`, 400 on anything invalid), one service call, DSP JSON
back. Errors on DSP routes answer a DSP error body (`CatalogError`, `ContractNegotiationError`,
`TransferError`) with the error's status: 400 invalid or not allowed, 404 unknown or not the caller's.
"""

# No `from __future__ import annotations`: FastAPI must see the local Annotated aliases of the factory.

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

import httpx
import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import AnyHttpUrl, BaseModel, Field

from healthspace.connector.dsp.manager import DspManager
from healthspace.connector.dsp.service import (
    PULL_FORMAT,
    AgreementPublic,
    DatasetCreate,
    DatasetPublic,
    DspService,
    NegotiationPublic,
    TransferPublic,
)
from healthspace.core.apikeys import Role as StaffRole
from healthspace.core.apikeys import StoredKey
from healthspace.core.errors import HealthspaceError, NotFoundError, ValidationError
from healthspace.core.fastlane import FastLane, lane_eligible
from healthspace.identity.errors import TokenRejectedError
from healthspace.identity.fastapi import PeerDependency
from healthspace.identity.tokens import Caller, TokenUse
from healthspace.protocol.messages import (
    Auth,
    CatalogError,
    CatalogRequestMessage,
    ContractAgreementMessage,
    ContractAgreementVerificationMessage,
    ContractNegotiationError,
    ContractNegotiationEventMessage,
    ContractNegotiationTerminationMessage,
    ContractOfferMessage,
    ContractRequestMessage,
    DspMessage,
    ProtocolVersion,
    TransferCompletionMessage,
    TransferError,
    TransferRequestMessage,
    TransferStartMessage,
    TransferSuspensionMessage,
    TransferTerminationMessage,
    VersionResponse,
    parse_as,
    to_json,
)
from healthspace.protocol.states import NegotiationState, TransferState

__all__ = ["DspComponents", "install_message_lane", "make_dsp_routers"]

JSON = "application/json"


@dataclass
class DspComponents:
    """What the routes need; held by the connector runtime."""

    service: DspService
    manager: DspManager
    http: httpx.Client
    auth_for: Callable[[str], httpx.Auth]


async def _raw(request: Request) -> bytes:
    return await request.body()


Raw = Annotated[bytes, Depends(_raw)]


def _json(message: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(to_json(message), status_code=status, media_type=JSON, headers=headers)


def _pids_of(body: bytes) -> tuple[str | None, str | None]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    p, c = doc.get("providerPid"), doc.get("consumerPid")
    return (p if isinstance(p, str) else None, c if isinstance(c, str) else None)


def _error(kind: str, exc: HealthspaceError, pid: str | None = None, body: bytes = b"") -> Response:
    if isinstance(exc, TokenRejectedError):
        raise exc  # a replay found in the handler's transaction: 401 problem JSON, as any refused token
    reason = [exc.detail, *[f"{p['pointer'] or '/'}: {p['message']}" for p in exc.extra.get("problems", [])]]
    code = exc.code
    if kind == "catalog":
        return _json(CatalogError(code=code, reason=reason), exc.status)
    provider_pid, consumer_pid = _pids_of(body)
    provider_pid = provider_pid or pid or "unknown"
    consumer_pid = consumer_pid or "unknown"
    model = ContractNegotiationError if kind == "negotiation" else TransferError
    err = model(provider_pid=provider_pid, consumer_pid=consumer_pid, code=code, reason=reason)
    return _json(err, exc.status)


def install_message_lane(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """Serve the DSP routes of `routers` that read the request themselves (every message POST)
    through `core.fastlane.FastLane`, ahead of FastAPI's routing. Call before the app serves."""
    app.add_middleware(FastLane, routes=[r for router in routers for r in router.routes if lane_eligible(r)])


def make_dsp_routers(
    components: Callable[[Request], DspComponents],
    peer: PeerDependency,
    staff: Callable[..., Callable[[Request], StoredKey]],
) -> list[APIRouter]:
    """The DSP routers: version (public), DSP endpoints (`peer` authenticates the caller:
    `identity.fastapi.peer_dependency(...)`) and management (`staff(*roles)` = API-key dependency
    for those roles)."""

    # Authentication and handler run in one thread-pool hop: both block (the replay check and the
    # handler use the database); as a sync dependency and a sync endpoint they took two hand-offs
    # between the event loop and a worker thread per request.
    async def as_peer(request: Request, handle: Callable[[Caller], Response]) -> Response:
        return await run_in_threadpool(lambda: handle(peer(request)))

    async def as_peer_writing(
        request: Request, svc: DspService, handle: Callable[[Caller, TokenUse | None], Response]
    ) -> Response:
        """For handlers that write: the token's use is recorded in the handler's transaction (one
        transaction per request fewer) and settled when the handler is done, whatever happened."""

        def run() -> Response:
            caller, token = peer.deferring_replay(request, svc.db)
            try:
                try:
                    return handle(caller, token)
                finally:
                    if token is not None:
                        token.settle()
            except TokenRejectedError as exc:
                peer.refused(request, exc)
                raise

        return await run_in_threadpool(run)

    # Cheap look-ups run on the event loop (async): a sync dependency costs a thread-pool hop each.
    async def _components(request: Request) -> DspComponents:
        return components(request)

    async def _svc(request: Request) -> DspService:
        return components(request).service

    # The DSP routes that write take the service and the body themselves: each FastAPI dependency
    # costs its resolution on every request, and these routes carry every DSP message.
    async def svc_and_body(request: Request) -> tuple[DspService, bytes]:
        return components(request).service, await request.body()

    Act = Callable[[DspService, str, bytes, TokenUse | None], Response]  # noqa: N806

    async def peer_message(request: Request, kind: str, pid: str | None, act: Act) -> Response:
        """A writing DSP route: `act(service, caller id, body, token use)` as the authenticated peer,
        any refusal answered as a DSP error of `kind` naming the process."""
        svc, body = await svc_and_body(request)

        def handle(caller: Caller, token: TokenUse | None) -> Response:
            try:
                return act(svc, caller.participant_id, body, token)
            except HealthspaceError as exc:
                return _error(kind, exc, pid, body)

        return await as_peer_writing(request, svc, handle)

    Svc = Annotated[DspService, Depends(_svc)]  # noqa: N806
    Comp = Annotated[DspComponents, Depends(_components)]  # noqa: N806

    public = APIRouter(tags=["dsp"])
    dsp = APIRouter(tags=["dsp"])

    @public.get("/.well-known/dspace-version")
    def dspace_version() -> Response:
        version = VersionResponse(
            protocol_versions=[
                ProtocolVersion(
                    version="2025-1",
                    path="/",
                    binding="HTTPS",
                    identifier_type="healthspace-participant-id",
                    auth=Auth(protocol="healthspace-request-token", version="1"),
                )
            ]
        )
        return _json(version)

    # --- catalog -----------------------------------------------------------------------------------

    @dsp.post("/catalog/request")
    async def catalog_request(
        request: Request,
        svc: Svc,
        body: Raw,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> Response:
        def handle(caller: Caller) -> Response:
            try:
                msg = parse_as(body, CatalogRequestMessage)
                page, total = svc.catalog(caller.participant_id, msg, offset, limit)
            except HealthspaceError as exc:
                return _error("catalog", exc)
            links = []
            base = f"{svc.public_url}/catalog/request"
            if offset + limit < total:
                links.append(f'<{base}?{urlencode({"offset": offset + limit, "limit": limit})}>; rel="next"')
            if offset > 0:
                prev = max(0, offset - limit)
                links.append(f'<{base}?{urlencode({"offset": prev, "limit": limit})}>; rel="previous"')
            return _json(page, headers={"Link": ", ".join(links)} if links else None)

        return await as_peer(request, handle)

    @dsp.get("/catalog/datasets/{dataset_id:path}")
    async def catalog_dataset(request: Request, dataset_id: str, svc: Svc) -> Response:
        def handle(caller: Caller) -> Response:
            try:
                return _json(svc.dataset(caller.participant_id, dataset_id))
            except HealthspaceError as exc:
                return _error("catalog", exc)

        return await as_peer(request, handle)

    # --- negotiations ------------------------------------------------------------------------------

    @dsp.post("/negotiations/request")
    async def negotiation_request(request: Request) -> Response:
        def act(svc: DspService, who: str, body: bytes, token: TokenUse | None) -> Response:
            msg = parse_as(body, ContractRequestMessage)
            ack, created = svc.on_contract_request(who, msg, None, token=token)
            return _json(ack, 201 if created else 200)

        return await peer_message(request, "negotiation", None, act)

    @dsp.post("/negotiations/offers")
    async def negotiation_initial_offer(request: Request) -> Response:
        def act(svc: DspService, who: str, body: bytes, token: TokenUse | None) -> Response:
            msg = parse_as(body, ContractOfferMessage)
            return _json(svc.on_initial_offer(who, msg, token=token), 201)

        return await peer_message(request, "negotiation", None, act)

    @dsp.get("/negotiations/{pid}")
    async def negotiation_get(request: Request, pid: str, svc: Svc) -> Response:
        def handle(caller: Caller) -> Response:
            try:
                return _json(svc.get_negotiation(caller.participant_id, pid))
            except HealthspaceError as exc:
                return _error("negotiation", exc, pid)

        return await as_peer(request, handle)

    routes: dict[str, type[DspMessage]] = {
        "request": ContractRequestMessage,
        "offers": ContractOfferMessage,
        "events": ContractNegotiationEventMessage,
        "agreement": ContractAgreementMessage,
        "agreement/verification": ContractAgreementVerificationMessage,
        "termination": ContractNegotiationTerminationMessage,
    }

    def negotiation_route(model: type[DspMessage]) -> Callable[..., Awaitable[Response]]:
        async def endpoint(request: Request, pid: str) -> Response:
            def act(svc: DspService, who: str, body: bytes, token: TokenUse | None) -> Response:
                msg = parse_as(body, model)
                if isinstance(msg, ContractRequestMessage):
                    ack, _ = svc.on_contract_request(who, msg, pid, token=token)
                    return _json(ack)
                return _json(svc.on_negotiation_message(who, pid, msg, token=token))

            return await peer_message(request, "negotiation", pid, act)

        return endpoint

    for suffix, model in routes.items():
        dsp.add_api_route(
            f"/negotiations/{{pid}}/{suffix}",
            negotiation_route(model),
            methods=["POST"],
            name=f"negotiation_{suffix.replace('/', '_')}",
        )

    # --- transfers ---------------------------------------------------------------------------------

    @dsp.post("/transfers/request")
    async def transfer_request(request: Request) -> Response:
        def act(svc: DspService, who: str, body: bytes, token: TokenUse | None) -> Response:
            ack, created = svc.on_transfer_request(who, parse_as(body, TransferRequestMessage), token=token)
            return _json(ack, 201 if created else 200)

        return await peer_message(request, "transfer", None, act)

    @dsp.get("/transfers/{pid}")
    async def transfer_get(request: Request, pid: str, svc: Svc) -> Response:
        def handle(caller: Caller) -> Response:
            try:
                return _json(svc.get_transfer(caller.participant_id, pid))
            except HealthspaceError as exc:
                return _error("transfer", exc, pid)

        return await as_peer(request, handle)

    transfer_routes: dict[str, type[DspMessage]] = {
        "start": TransferStartMessage,
        "completion": TransferCompletionMessage,
        "suspension": TransferSuspensionMessage,
        "termination": TransferTerminationMessage,
    }

    def transfer_route(model: type[DspMessage]) -> Callable[..., Awaitable[Response]]:
        async def endpoint(request: Request, pid: str) -> Response:
            def act(svc: DspService, who: str, body: bytes, token: TokenUse | None) -> Response:
                return _json(svc.on_transfer_message(who, pid, parse_as(body, model), token=token))

            return await peer_message(request, "transfer", pid, act)

        return endpoint

    for suffix, model in transfer_routes.items():
        dsp.add_api_route(
            f"/transfers/{{pid}}/{suffix}", transfer_route(model), methods=["POST"], name=f"transfer_{suffix}"
        )

    # --- management --------------------------------------------------------------------------------

    mgmt = APIRouter(prefix="/management", tags=["management: dsp"])
    Steward = Annotated[StoredKey, Depends(staff(StaffRole.ADMIN, StaffRole.STEWARD))]  # noqa: N806
    Researcher = Annotated[StoredKey, Depends(staff(StaffRole.ADMIN, StaffRole.RESEARCHER))]  # noqa: N806
    Actor = Annotated[StoredKey, Depends(staff(StaffRole.ADMIN, StaffRole.STEWARD, StaffRole.RESEARCHER))]  # noqa: N806
    Staff = Annotated[  # noqa: N806
        StoredKey,
        Depends(
            staff(
                StaffRole.ADMIN,
                StaffRole.STEWARD,
                StaffRole.RESEARCHER,
                StaffRole.REVIEWER,
                StaffRole.REGULATOR,
            )
        ),
    ]

    def who(key: StoredKey) -> str:
        return f"{key.role.value}:{key.key_id}"

    @mgmt.post("/datasets", status_code=201)
    def publish_dataset(body: DatasetCreate, svc: Svc, key: Steward) -> DatasetPublic:
        return svc.publish(who(key), body)

    @mgmt.get("/datasets")
    def list_datasets(svc: Svc, key: Staff) -> list[DatasetPublic]:
        return svc.list_datasets()

    @mgmt.post("/catalog/query")
    def query_catalog(body: CatalogQuery, comp: Comp, key: Researcher) -> dict[str, Any]:
        """Fetch a remote connector's DSP catalog (all pages) on behalf of a researcher."""
        url = str(body.url).rstrip("/")
        peer_id = body.participant_id or _peer_id(comp.http, url)
        message = to_json(CatalogRequestMessage(filter=body.filter or None))
        datasets: list[Any] = []
        catalog: dict[str, Any] = {}
        next_url: str | None = f"{url}/catalog/request"
        for _ in range(100):
            if next_url is None:
                break
            try:
                r = comp.http.post(
                    next_url,
                    content=message,
                    headers={"Content-Type": JSON},
                    auth=comp.auth_for(peer_id),
                    timeout=10.0,
                )
            except httpx.HTTPError as exc:
                raise ValidationError(f"catalog at {url} unreachable: {type(exc).__name__}") from None
            if r.status_code != 200:
                raise ValidationError(f"catalog at {url} answered HTTP {r.status_code}", body=r.text[:500])
            catalog = r.json()
            datasets.extend(catalog.get("dataset", []))
            next_url = r.links.get("next", {}).get("url")
        catalog["dataset"] = datasets
        return catalog

    @mgmt.post("/negotiations", status_code=201)
    def start_negotiation(body: NegotiationCreate, comp: Comp, key: Researcher) -> NegotiationPublic:
        url = str(body.provider_url).rstrip("/")
        peer_id = body.provider_id or _peer_id(comp.http, url)
        return comp.service.start_negotiation(who(key), peer_id, url, body.offer, auto=body.auto)

    @mgmt.post("/negotiations/offers", status_code=201)
    def offer_negotiation(body: OfferCreate, comp: Comp, key: Steward) -> NegotiationPublic:
        url = str(body.consumer_url).rstrip("/")
        peer_id = body.consumer_id or _peer_id(comp.http, url)
        return comp.service.offer_negotiation(who(key), peer_id, url, body.dataset_id, body.offer)

    @mgmt.get("/negotiations")
    def list_negotiations(
        svc: Svc,
        key: Staff,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[NegotiationPublic]:
        return svc.list_negotiations(limit, offset)

    @mgmt.get("/negotiations/{pid}")
    def get_negotiation(
        pid: str,
        svc: Svc,
        key: Staff,
        wait_for: Annotated[list[NegotiationState] | None, Query()] = None,
        timeout_s: Annotated[float, Query(ge=0, le=60)] = 0.0,
        acknowledged: bool = False,
    ) -> NegotiationPublic:
        """Long poll: with `wait_for` (states) and/or `acknowledged` (provider pid known), answers once
        that holds, the negotiation is final, or `timeout_s` has passed."""
        if wait_for or acknowledged:
            return svc.wait_negotiation(pid, set(wait_for or ()), timeout_s, acknowledged=acknowledged)
        return svc.negotiation(pid)

    @mgmt.post("/negotiations/{pid}/{action}")
    def negotiation_action(
        pid: str, action: str, body: ActionBody | None, svc: Svc, key: Actor
    ) -> NegotiationPublic:
        body = body or ActionBody()
        if action not in NEGOTIATION_ACTIONS:
            raise NotFoundError(f"no negotiation action {action!r}")
        return svc.negotiation_action(who(key), key.role, pid, action, offer=body.offer, reason=body.reason)

    @mgmt.get("/agreements")
    def list_agreements(svc: Svc, key: Staff) -> list[AgreementPublic]:
        return svc.list_agreements()

    @mgmt.get("/agreements/{agreement_id}")
    def get_agreement(agreement_id: str, svc: Svc, key: Staff) -> AgreementPublic:
        return svc.agreement(agreement_id)

    @mgmt.post("/agreements/{agreement_id}/retire")
    def retire_agreement(agreement_id: str, body: ActionBody, svc: Svc, key: Actor) -> AgreementPublic:
        """Provider copy: steward or admin; consumer copy: researcher or admin."""
        return svc.retire_agreement(who(key), agreement_id, body.reason, key.role)

    @mgmt.post("/transfers", status_code=201)
    def start_transfer(body: TransferCreate, svc: Svc, key: Researcher) -> TransferPublic:
        return svc.start_transfer(who(key), body.agreement_id, body.format)

    @mgmt.get("/transfers")
    def list_transfers(
        svc: Svc,
        key: Staff,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[TransferPublic]:
        return svc.list_transfers(limit, offset)

    @mgmt.get("/transfers/{pid}")
    def get_transfer(
        pid: str,
        svc: Svc,
        key: Staff,
        wait_for: Annotated[list[TransferState] | None, Query()] = None,
        timeout_s: Annotated[float, Query(ge=0, le=60)] = 0.0,
        acknowledged: bool = False,
    ) -> TransferPublic:
        if wait_for or acknowledged:
            return svc.wait_transfer(pid, set(wait_for or ()), timeout_s, acknowledged=acknowledged)
        return svc.transfer(pid)

    @mgmt.post("/transfers/{pid}/{action}")
    def transfer_action(
        pid: str, action: str, body: ActionBody | None, svc: Svc, key: Actor
    ) -> TransferPublic:
        body = body or ActionBody()
        if action not in TRANSFER_ACTIONS:
            raise NotFoundError(f"no transfer action {action!r}")
        return svc.transfer_action(who(key), key.role, pid, action, body.reason)

    return [public, dsp, mgmt]


NEGOTIATION_ACTIONS = frozenset(
    {"accept", "verify", "request", "approve", "agree", "offer", "finalize", "reject", "terminate"}
)
TRANSFER_ACTIONS = frozenset({"start", "suspend", "complete", "terminate"})


class CatalogQuery(BaseModel):
    url: AnyHttpUrl
    participant_id: str | None = None
    filter: list[Any] = Field(default_factory=list)


class NegotiationCreate(BaseModel):
    provider_url: AnyHttpUrl
    provider_id: str | None = Field(None, description="Looked up at /.well-known/healthspace when absent")
    offer: dict[str, Any] = Field(description="The offer requested; its `target` names the dataset")
    auto: bool = Field(True, description="Accept an unchanged offer and verify agreements by itself")


class OfferCreate(BaseModel):
    consumer_url: AnyHttpUrl
    consumer_id: str | None = Field(None, description="Looked up at /.well-known/healthspace when absent")
    dataset_id: str = Field(min_length=1, max_length=200)
    offer: dict[str, Any] | None = Field(
        None, description="Default: the dataset's offer; a steward's own must be at least as restrictive"
    )


class TransferCreate(BaseModel):
    agreement_id: str
    format: str = PULL_FORMAT


class ActionBody(BaseModel):
    reason: str = Field("", max_length=1000)
    offer: dict[str, Any] | None = None


def _peer_id(http: httpx.Client, url: str) -> str:
    try:
        r = http.get(f"{url}/.well-known/healthspace", timeout=5.0)
        r.raise_for_status()
        return str(r.json()["id"])
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise ValidationError(
            f"{url} does not describe a healthspace connector: {type(exc).__name__}"
        ) from None
