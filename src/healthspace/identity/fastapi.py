"""FastAPI and httpx glue: a dependency that authenticates peers, and an httpx `Auth` that signs calls.

Receiving side::

    Peer = Annotated[Caller, Depends(peer_dependency(lambda r: r.app.state.verifier, record_failure))]

    @router.post("/peer/hello")
    def hello(caller: Peer) -> ...: ...

Calling side (a fresh token per request, so retries and redirects never replay one)::

    httpx.post(url, auth=PeerAuth(key, credential, "my-id", "their-id"))
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from datetime import timedelta

import httpx
from fastapi import Request

from healthspace.core.clock import Clock, SystemClock
from healthspace.core.db import Database
from healthspace.core.errors import HealthspaceError
from healthspace.identity.keys import SigningKey
from healthspace.identity.tokens import DEFAULT_TTL, Caller, RequestVerifier, TokenUse, mint_request_token

__all__ = ["FailureCallback", "PeerAuth", "PeerDependency", "peer_dependency"]

log = logging.getLogger(__name__)

FailureCallback = Callable[[Request, HealthspaceError], None]
"""Called with the request and the refusal (`error.extra["reason"]` says why) before it is answered."""


class PeerDependency:
    """Authenticates the peer behind a request (see `peer_dependency`). Calling it is the FastAPI
    dependency; `deferring_replay` serves handlers that record the token's use in their own
    transaction."""

    def __init__(
        self,
        verifier: RequestVerifier | Callable[[Request], RequestVerifier],
        on_failure: FailureCallback | None = None,
    ) -> None:
        self._verifier = verifier
        self._on_failure = on_failure

    def _find(self, request: Request) -> RequestVerifier:
        v = self._verifier
        return v if isinstance(v, RequestVerifier) else v(request)

    # A plain `def`: FastAPI runs it in its thread pool, where the blocking replay check belongs.
    def __call__(self, request: Request) -> Caller:
        try:
            return self._find(request).verify(request.headers.get("authorization"))
        except HealthspaceError as error:
            self.refused(request, error)
            raise

    def deferring_replay(self, request: Request, db: Database) -> tuple[Caller, TokenUse | None]:
        """Authenticate, leaving the replay check to the caller's transaction on `db` when the
        verifier's replay guard keeps its memory there (`RequestVerifier.verify_deferring_replay`).
        A `TokenUse` returned MUST be recorded as it says; a refusal it raises goes to `refused`."""
        try:
            return self._find(request).verify_deferring_replay(request.headers.get("authorization"), db)
        except HealthspaceError as error:
            self.refused(request, error)
            raise

    def refused(self, request: Request, error: HealthspaceError) -> None:
        """Report a refusal to `on_failure`. If it raises, the failure is logged and the request is
        still refused with the original error: a broken audit sink must not turn a denial into
        something else."""
        if self._on_failure is None:
            return
        try:
            self._on_failure(request, error)
        except Exception:
            log.exception("on_failure callback failed while refusing a peer")


def peer_dependency(
    verifier: RequestVerifier | Callable[[Request], RequestVerifier],
    on_failure: FailureCallback | None = None,
) -> PeerDependency:
    """A FastAPI dependency returning the authenticated `Caller`, or answering 401/403 problem JSON.

    `verifier` is the verifier itself or a function finding it from the request (e.g. in `app.state`).
    `on_failure` sees every refusal first (to write the audit entry). If it raises, the failure is
    logged and the request is still refused with the original error: a broken audit sink must not
    turn a denial into something else.
    """
    return PeerDependency(verifier, on_failure)


class PeerAuth(httpx.Auth):
    """httpx authentication that adds a fresh request token from `caller_id` to `audience` to each call.

    `credential` is the caller's membership credential (compact JWS); `key` the key it binds.
    """

    def __init__(
        self,
        key: SigningKey,
        credential: str,
        caller_id: str,
        audience: str,
        *,
        clock: Clock | None = None,
        ttl: timedelta = DEFAULT_TTL,
    ) -> None:
        self._key = key
        self._credential = credential
        self._caller_id = caller_id
        self._audience = audience
        self._clock = clock or SystemClock()
        self._ttl = ttl

    def authorization(self) -> str:
        """A fresh `Authorization` header value (`Bearer <token>`), for clients other than httpx."""
        token = mint_request_token(
            self._key, self._credential, self._caller_id, self._audience, self._clock.now(), self._ttl
        )
        return f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.authorization()
        yield request
