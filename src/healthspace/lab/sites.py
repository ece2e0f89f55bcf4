"""Study sites: a provider's data-plane endpoint and token, from the consumer's STARTED transfers, and
the keeper that refreshes their short-lived tokens."""

from __future__ import annotations

import base64
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from healthspace.compute import canonical_json
from healthspace.core.errors import AuthenticationError, HealthspaceError, ValidationError
from healthspace.core.peer_http import PeerHttp, PeerHttpError, PeerResponse
from healthspace.identity.keys import key_id_of, public_key_from_b64

__all__ = [
    "DEFAULT_TOKENS",
    "NO_ANSWER",
    "Answer",
    "Site",
    "SiteHttp",
    "TokenKeeper",
    "TokenRefreshError",
    "fetch_public_key",
    "json_of",
    "send",
    "site_from_transfer",
    "timed_out",
    "verify_envelope",
]

SiteHttp = PeerHttp | httpx.Client
"""How the lab reaches data planes: its own `PeerHttp` pool by default (a fraction of httpx's CPU per
call, ADR 0008), or an `httpx.Client` a caller passes (tests, custom transports)."""
Answer = PeerResponse | httpx.Response
NO_ANSWER: tuple[type[Exception], ...] = (PeerHttpError, httpx.HTTPError)
"""Every way a call can end without an answer, whichever client made it."""


def send(
    http: SiteHttp, method: str, url: str, content: bytes | None = None, headers: dict[str, str] | None = None
) -> Answer:
    """One request with either client; raises one of `NO_ANSWER` when there is no answer."""
    if isinstance(http, PeerHttp):
        return http.request(method, url, content, headers or {})
    return http.request(method, url, content=content, headers=headers)


def timed_out(exc: BaseException) -> bool:
    """Whether a `NO_ANSWER` error was a timeout (the site was reached but too slow)."""
    return isinstance(exc, httpx.TimeoutException) or isinstance(exc.__cause__, TimeoutError)


@dataclass(frozen=True, slots=True)
class Site:
    """One provider of a study: `endpoint` is the data address (`{provider_url}/dataplane`).

    `public_key` (base64url raw Ed25519) verifies the provider's signed results; when None, the lab
    reads it from the provider's `/.well-known/healthspace` (trust on first use, see docs/lab.md).
    """

    id: str
    endpoint: str
    token: str
    agreement_id: str = ""
    public_key: str | None = None

    @property
    def base_url(self) -> str:
        return self.endpoint.removesuffix("/").removesuffix("/dataplane")


def site_from_transfer(transfer: dict[str, Any]) -> Site:
    """A `Site` from a consumer-side transfer of the management API (STARTED, with a data address)."""
    if transfer.get("state") != "STARTED":
        raise ValidationError(f"transfer {transfer.get('id')!r} is {transfer.get('state')}, not STARTED")
    address = transfer.get("data_address") or {}
    props = {p.get("name"): p.get("value") for p in address.get("endpointProperties") or []}
    endpoint, token = address.get("endpoint"), props.get("authorization")
    if not isinstance(endpoint, str) or not isinstance(token, str):
        raise ValidationError(f"transfer {transfer.get('id')!r} has no usable data address")
    return Site(
        id=str(transfer.get("counterparty_id")),
        endpoint=endpoint,
        token=token,
        agreement_id=str(transfer.get("agreement_id") or props.get("agreementId") or ""),
    )


def _b64url(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@functools.lru_cache(maxsize=256)
def _provider_key(public_key_b64: str) -> tuple[str, Ed25519PublicKey | None]:
    """Key id and parsed key (None when it does not parse) of a provider's published key: a lab checks
    every result of a site with the same key, so it is decoded once, not once per result."""
    key_id = key_id_of(_b64url(public_key_b64))
    try:
        return key_id, public_key_from_b64(public_key_b64)
    except ValidationError:
        return key_id, None


def verify_envelope(envelope: dict[str, Any], public_key_b64: str) -> dict[str, Any]:
    """The payload of a provider's signed envelope, after checking key id and Ed25519 signature."""
    try:
        payload = envelope["payload"]
        kid, sig = str(envelope["kid"]), _b64url(str(envelope["signature"]))
        key_id, key = _provider_key(public_key_b64)
    except (KeyError, TypeError, ValueError) as exc:
        raise AuthenticationError("the result is not a signed envelope", reason="bad-envelope") from exc
    if envelope.get("alg") != "EdDSA" or kid != key_id:
        raise AuthenticationError(
            f"the result is signed with key {kid!r}, not {key_id!r}", reason="wrong-key"
        )
    if not isinstance(payload, dict) or key is None:
        raise AuthenticationError("the result's signature does not verify", reason="bad-signature")
    try:
        key.verify(sig, canonical_json(payload))
    except InvalidSignature:
        raise AuthenticationError("the result's signature does not verify", reason="bad-signature") from None
    return payload


def fetch_public_key(http: SiteHttp, site: Site) -> str:
    """The provider's published public key (base64), for sites that do not pin one."""
    if site.public_key is not None:
        return site.public_key
    r = send(http, "GET", f"{site.base_url}/.well-known/healthspace")
    if r.status_code != 200:
        raise PeerHttpError(f"{site.id} did not publish its key (HTTP {r.status_code})")
    return str(json_of(r)["public_key"])


class TokenRefreshError(HealthspaceError):
    """The provider would not refresh a data-plane token (its status and problem are kept)."""

    code = "token-refresh-refused"
    title = "The provider refused to refresh the data-plane token"

    def __init__(self, detail: str, *, http_status: int | None, reasons: list[str] | None = None) -> None:
        super().__init__(detail, http_status=http_status, reasons=reasons or [])
        self.http_status = http_status
        self.reasons = reasons or []


@functools.lru_cache(maxsize=1024)
def _claims(token: str) -> tuple[str, float, float | None]:
    """The transfer a token is for, when it was issued and its lifetime in seconds (exp - iat), read
    without verifying: the lab only schedules refreshes with them; the provider verifies every use.
    Kept per token (a function of the token's text alone): every call of a study reads them."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
        transfer = str(claims.get("transfer") or "")
        iat = float(claims["iat"])
        lifetime = float(claims["exp"]) - iat
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        return "", 0.0, None
    return transfer, iat, lifetime if lifetime > 0 else None


@dataclass
class _Held:
    token: str
    seen_at: float
    issued_at: float
    lifetime_s: float | None

    @classmethod
    def of(cls, token: str, seen_at: float) -> _Held:
        _, iat, lifetime = _claims(token)
        return cls(token, seen_at, iat, lifetime)


class TokenKeeper:
    """The freshest data-plane token per transfer: refreshed at the provider (`POST {endpoint}/token`)
    when it nears expiry or when a call answers 401 `token-expired`.

    Near expiry is judged on the lab's own monotonic clock from when the token was received and the
    lifetime it states (exp - iat), so the lab and the provider need not agree on the time; a token
    that was already old when the lab first saw it is caught by the 401 path instead (the provider
    refreshes tokens up to a few minutes past expiry). Each token refreshes once at the provider, so
    refreshes of one transfer are serialised here and a second caller gets the token already fetched.
    """

    def __init__(self, refresh_before_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.refresh_before_s = refresh_before_s
        self._clock = clock
        self._held: dict[tuple[str, str], _Held] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def _key(self, site: Site) -> tuple[str, str]:
        transfer = _claims(site.token)[0]
        return site.endpoint, transfer or site.token

    def _current(self, site: Site) -> _Held:
        key = self._key(site)
        with self._lock:
            held = self._held.get(key)
            # A site token issued after the one held (the transfer was restarted and handed out a
            # new data address) starts a new chain.
            if held is None or (site.token != held.token and _claims(site.token)[1] > held.issued_at):
                held = _Held.of(site.token, self._clock())
                self._held[key] = held
            return held

    def token(self, http: SiteHttp, site: Site) -> str:
        """The token to call `site` with now, refreshed first if it is within `refresh_before_s` of expiry."""
        held = self._current(site)
        if held.lifetime_s is None:
            return held.token
        age = self._clock() - held.seen_at
        if age < held.lifetime_s - self.refresh_before_s:
            return held.token
        try:
            return self.refresh(http, site, held.token)
        except TokenRefreshError:
            if age < held.lifetime_s:
                return held.token  # still valid: let the call go ahead and tell its own story
            raise

    def refresh(self, http: SiteHttp, site: Site, stale: str) -> str:
        """Exchange `stale` for a fresh token (or return the one another caller already fetched)."""
        key = self._key(site)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            held = self._current(site)
            if held.token != stale:
                return held.token
            try:
                r = send(http, "POST", f"{site.endpoint}/token", headers={"Authorization": f"Bearer {stale}"})
            except NO_ANSWER as exc:
                raise TokenRefreshError(
                    f"token refresh at {site.id} failed: {type(exc).__name__}", http_status=None
                ) from exc
            if r.status_code != 200:
                detail, reasons = problem_of(r)
                raise TokenRefreshError(
                    f"token refresh refused by {site.id}: {detail}",
                    http_status=r.status_code,
                    reasons=reasons,
                )
            try:
                fresh = str(json_of(r)["token"])
            except (ValueError, KeyError, TypeError) as exc:
                raise TokenRefreshError(
                    f"token refresh at {site.id}: malformed answer", http_status=r.status_code
                ) from exc
            with self._lock:
                self._held[key] = _Held.of(fresh, self._clock())
            return fresh

    def call(self, http: SiteHttp, site: Site, method: str, path: str, json: Any = None) -> Answer:
        """`method {site.endpoint}{path}` with the current token; on 401 `token-expired`, refresh and
        retry once. Raises `TokenRefreshError` when the provider will not refresh."""
        token = self.token(http, site)
        # The body encoded once, by orjson (httpx's `json=` uses the standard library's encoder, slow
        # for a spec listing a thousand codes), and sent again as is on a retry.
        content = None if json is None else orjson.dumps(json)
        r = send(http, method, f"{site.endpoint}{path}", content, _headers(token, content))
        if r.status_code == 401 and _reason(r) == "token-expired":
            token = self.refresh(http, site, token)
            r = send(http, method, f"{site.endpoint}{path}", content, _headers(token, content))
        return r


def _headers(token: str, content: bytes | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if content is not None:
        headers["Content-Type"] = "application/json"
    return headers


def json_of(r: Answer) -> Any:
    """The answer's JSON document, parsed by orjson (a `ValueError` when it is not JSON)."""
    return orjson.loads(r.content)


DEFAULT_TOKENS = TokenKeeper()
"""The lab process's keeper, used when a study is run without one: refreshed tokens outlive one run."""


def _reason(r: Answer) -> str | None:
    try:
        doc = json_of(r)
    except ValueError:
        return None
    return str(doc.get("reason")) if isinstance(doc, dict) and doc.get("reason") is not None else None


def problem_of(r: Answer) -> tuple[str, list[str]]:
    """The detail and reasons of a problem-JSON answer (or the start of the body)."""
    try:
        doc = json_of(r)
    except ValueError:
        return r.text[:300], []
    if not isinstance(doc, dict):
        return str(doc)[:300], []
    reasons = doc.get("reasons")
    return str(doc.get("detail", ""))[:1000], [str(x) for x in reasons] if isinstance(reasons, list) else []
