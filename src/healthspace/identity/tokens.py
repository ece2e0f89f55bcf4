"""Request tokens: short-lived proofs, signed by the caller's key, that travel with every peer call.

A request token is a compact JWS (EdDSA, header `typ: hs-request+jwt`, `kid`: the caller's key id):

    iss  caller's participant id      aud  receiver's participant id      jti  random id (128 bits)
    iat  issued (s since epoch)       exp  expires (default iat + 60 s)
    cred the caller's membership credential (compact JWS issued by the authority)

so a single `Authorization: Bearer <token>` header carries both the proof of key possession and the
authority's statement of who holds that key. `RequestVerifier.verify` turns the header into a `Caller`
or raises `TokenRejectedError` (401) / `MembershipDeniedError` (403) with a stable reason (see errors.py).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection

from healthspace.core.clock import Clock, SystemClock
from healthspace.core.db import Database
from healthspace.core.errors import ConfigurationError, HealthspaceError, ValidationError
from healthspace.identity import _jws
from healthspace.identity.credentials import (
    MembershipCredential,
    ParticipantRole,
    ParticipantType,
    _authenticate,
    _check_validity,
)
from healthspace.identity.errors import MembershipDeniedError, Reason, TokenRejectedError, reject
from healthspace.identity.keys import SigningKey, public_key_from_b64
from healthspace.identity.replay import ReplayGuard, SqlReplayGuard
from healthspace.identity.revocation import RevocationChecker

__all__ = ["REQUEST_TYP", "Caller", "RequestVerifier", "TokenUse", "mint_request_token"]

log = logging.getLogger(__name__)

REQUEST_TYP = "hs-request+jwt"
DEFAULT_TTL = timedelta(seconds=60)
_TOKEN_ID_CHARS = 64


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated peer: who its credential says it is, and which token it presented."""

    participant_id: str
    legal_name: str
    participant_type: ParticipantType
    jurisdiction: str
    roles: tuple[ParticipantRole, ...]
    credential_id: str
    token_id: str
    token_expires_at: datetime

    def has_role(self, role: ParticipantRole) -> bool:
        return role in self.roles


class TokenUse:
    """A request token checked in every respect but replay, whose one use the receiver records in the
    transaction of the work the token authorises (`RequestVerifier.verify_deferring_replay`).

    Protocol, all steps required: `record_in(conn)` first in that transaction (raises 401 `replayed`
    if the token was used before), `committed()` once the transaction has committed, and `settle()`
    when the request is done, whatever happened. `settle` records a use that no committed
    transaction holds (the handler failed, or refused the request before its transaction) on its
    own, so a failed request keeps its token spent; if the token turns out to be used by then (a
    concurrent presentation), it raises `replayed`. One request, one thread: not thread-safe.
    """

    __slots__ = ("_in_tx", "_refused", "_spent", "guard", "issuer", "now", "remember_until", "token_id")

    def __init__(
        self, guard: SqlReplayGuard, issuer: str, token_id: str, remember_until: datetime, now: datetime
    ) -> None:
        self.guard = guard
        self.issuer = issuer
        self.token_id = token_id
        self.remember_until = remember_until
        self.now = now
        self._in_tx = False  # recorded in a transaction not yet known to have committed
        self._spent = False  # recorded for good
        self._refused = False

    def record_in(self, conn: Connection) -> None:
        """Record the use in the caller's transaction on `conn`; raises `TokenRejectedError` (replayed)."""
        if not self.guard.first_use_in(conn, self.issuer, self.token_id, self.remember_until, self.now):
            self._refused = True
            raise self._replayed()
        self._in_tx = True

    def committed(self) -> None:
        """The transaction `record_in` wrote to has committed: the use is recorded for good."""
        self._spent = self._spent or self._in_tx

    def settle(self) -> None:
        """At the end of the request: make sure the use is recorded (see the class docstring)."""
        if self._spent or self._refused:
            return
        self._in_tx = False
        if not self.guard.first_use(self.issuer, self.token_id, self.remember_until, self.now):
            self._refused = True
            raise self._replayed()
        self._spent = True

    def _replayed(self) -> HealthspaceError:
        return reject(Reason.REPLAYED, "request token was already used", participant_id=self.issuer)


def mint_request_token(
    key: SigningKey,
    credential_token: str,
    caller_id: str,
    audience: str,
    now: datetime,
    ttl: timedelta = DEFAULT_TTL,
) -> str:
    """A fresh request token from `caller_id` to `audience`, valid from `now` (whole seconds) for `ttl`.

    `key` must be the key the credential binds; the receiver refuses the token otherwise.
    """
    if now.tzinfo is None:
        raise ValidationError("times must be timezone-aware")
    if ttl <= timedelta(0):
        raise ValidationError("a request token's lifetime must be positive")
    iat = int(now.timestamp())
    payload = {
        "iss": caller_id,
        "aud": audience,
        "iat": iat,
        "exp": iat + max(1, int(ttl.total_seconds())),
        "jti": secrets.token_urlsafe(16),
        "cred": credential_token,
    }
    return _jws.encode(payload, key.private_key, REQUEST_TYP, key.key_id)


class RequestVerifier:
    """Checks request tokens addressed to `audience` (this service's participant id).

    Checks, in order (the first failure decides the reason):

    1. an `Authorization: Bearer` header is present (token-missing, not-bearer);
    2. the token is a compact JWS of type hs-request+jwt (token-malformed) signed with EdDSA exactly
       (bad-algorithm: defeats "none" and HS256 with the public key as secret);
    3. its `cred` is a credential signed by the pinned authority key with `iss` = `authority_id`
       (untrusted-issuer, credential-malformed) and valid now (credential-expired, -not-yet-valid);
    4. the token's signature verifies with the key the credential binds (bad-signature);
    5. `iss` is the credential's participant (issuer-mismatch); `aud` is us (wrong-audience);
    6. `iat`/`exp` are integers, not expired, not issued in the future beyond `leeway`, and
       `exp - iat <= max_ttl` (expired, not-yet-valid, lifetime-too-long, token-malformed);
    7. the credential and participant are not revoked (403 revoked; 403 revocation-unknown when the
       checker cannot tell: an error in a check denies);
    8. the token id was not seen before (replayed); it is remembered until `exp + leeway`.

    Thread-safe. Credentials that verified are cached by their exact text (a credential is a few
    hundred bytes and members reuse theirs for months), which saves one signature check per request;
    the validity period and revocation are still checked on every request.
    """

    def __init__(
        self,
        authority_public_key_b64: str,
        authority_id: str,
        audience: str,
        revocations: RevocationChecker,
        replay: ReplayGuard,
        clock: Clock | None = None,
        max_ttl: timedelta = timedelta(minutes=5),
        leeway: timedelta = timedelta(seconds=30),
        credential_cache_size: int = 1024,
    ) -> None:
        try:
            self._authority_key = public_key_from_b64(authority_public_key_b64)
        except ValidationError as exc:
            raise ConfigurationError(f"the pinned authority public key is not valid: {exc.detail}") from None
        if max_ttl <= timedelta(0) or leeway < timedelta(0):
            raise ConfigurationError("max_ttl must be positive and leeway not negative")
        self.authority_id = authority_id
        self.audience = audience
        self._revocations = revocations
        self._replay = replay
        self._clock = clock or SystemClock()
        self._max_ttl = max_ttl
        self._leeway = leeway
        self._cache: OrderedDict[str, tuple[MembershipCredential, Ed25519PublicKey]] = OrderedDict()
        self._cache_size = credential_cache_size
        self._cache_lock = threading.Lock()

    def verify(self, authorization_header: str | None) -> Caller:
        """The authenticated caller of a request with this `Authorization` header value, or raise."""
        caller, use = self._authenticate(authorization_header)
        if not self._replay.first_use(use.issuer, use.token_id, use.remember_until, use.now):
            raise reject(Reason.REPLAYED, "request token was already used", participant_id=use.issuer)
        return caller

    def verify_deferring_replay(
        self, authorization_header: str | None, db: Database
    ) -> tuple[Caller, TokenUse | None]:
        """`verify`, except that when this verifier remembers tokens in `db` (a `SqlReplayGuard` on that
        database) the replay check is left to the caller's transaction there: the returned `TokenUse`
        must be recorded as its docstring says. That saves a transaction per request. With any other
        guard the check is made here, as in `verify`, and no `TokenUse` is returned."""
        caller, use = self._authenticate(authorization_header)
        guard = self._replay
        if isinstance(guard, SqlReplayGuard) and guard.database is db:
            guard.prune_if_due(use.now)
            return caller, TokenUse(guard, use.issuer, use.token_id, use.remember_until, use.now)
        if not guard.first_use(use.issuer, use.token_id, use.remember_until, use.now):
            raise reject(Reason.REPLAYED, "request token was already used", participant_id=use.issuer)
        return caller, None

    def _authenticate(self, authorization_header: str | None) -> tuple[Caller, _Use]:
        """Every check but replay (steps 1 to 7)."""
        token = _bearer(authorization_header)
        now = self._clock.now()
        parsed = _jws.parse_unverified(token, REQUEST_TYP, Reason.TOKEN_MALFORMED)
        credential_token = parsed.payload.get("cred")
        if not isinstance(credential_token, str):
            raise reject(Reason.TOKEN_MALFORMED, "request token carries no membership credential")
        credential, credential_key = self._credential(credential_token)
        _check_validity(credential, now, self._leeway)
        who = {"participant_id": credential.participant_id}

        payload = _jws.verify(parsed, credential_key, Reason.BAD_SIGNATURE)
        if payload.get("iss") != credential.participant_id:
            raise reject(Reason.ISSUER_MISMATCH, "token issuer is not the credential's participant", **who)
        if payload.get("aud") != self.audience:
            raise reject(Reason.WRONG_AUDIENCE, "token is addressed to another participant", **who)
        iat, exp, token_id = _times_and_id(payload)
        if now >= datetime.fromtimestamp(exp, UTC) + self._leeway:
            raise reject(Reason.EXPIRED, "request token has expired", **who)
        if datetime.fromtimestamp(iat, UTC) > now + self._leeway:
            raise reject(Reason.NOT_YET_VALID, "request token is issued in the future", **who)
        if timedelta(seconds=exp - iat) > self._max_ttl:
            raise reject(
                Reason.LIFETIME_TOO_LONG,
                f"request token lives longer than {int(self._max_ttl.total_seconds())} s",
                **who,
            )

        self._check_revocation(credential, who)
        expires_at = datetime.fromtimestamp(exp, UTC)
        use = _Use(credential.participant_id, token_id, expires_at + self._leeway, now)
        return Caller(
            participant_id=credential.participant_id,
            legal_name=credential.legal_name,
            participant_type=credential.participant_type,
            jurisdiction=credential.jurisdiction,
            roles=credential.roles,
            credential_id=credential.credential_id,
            token_id=token_id,
            token_expires_at=expires_at,
        ), use

    def _credential(self, credential_token: str) -> tuple[MembershipCredential, Ed25519PublicKey]:
        with self._cache_lock:
            cached = self._cache.get(credential_token)
            if cached is not None:
                self._cache.move_to_end(credential_token)
                return cached
        credential = _authenticate(credential_token, self._authority_key, self.authority_id)
        entry = (credential, public_key_from_b64(credential.public_key))
        with self._cache_lock:
            self._cache[credential_token] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return entry

    def _check_revocation(self, credential: MembershipCredential, who: dict[str, Any]) -> None:
        try:
            revoked = self._revocations.is_revoked(credential.credential_id, credential.participant_id)
        except MembershipDeniedError as exc:
            raise MembershipDeniedError(exc.reason, exc.detail, **who) from None
        except Exception as exc:  # fail closed: a check that cannot answer denies
            log.warning("revocation check failed: %s", type(exc).__name__)
            raise reject(Reason.REVOCATION_UNKNOWN, "revocation status unknown", **who) from None
        if revoked:
            raise reject(Reason.REVOKED, "membership credential is revoked", **who)


@dataclass(frozen=True, slots=True)
class _Use:
    """What the replay check needs: the pair to remember, until when, and the time of the check."""

    issuer: str
    token_id: str
    remember_until: datetime
    now: datetime


def _bearer(header: str | None) -> str:
    if header is None or not header.strip():
        raise TokenRejectedError(
            Reason.TOKEN_MISSING, "this call needs an Authorization: Bearer request token"
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenRejectedError(Reason.NOT_BEARER, "the Authorization header must use the Bearer scheme")
    return token.strip()


def _times_and_id(payload: dict[str, Any]) -> tuple[int, int, str]:
    iat, exp, token_id = payload.get("iat"), payload.get("exp"), payload.get("jti")
    if type(iat) is not int or type(exp) is not int or exp <= iat:
        raise reject(Reason.TOKEN_MALFORMED, "request token needs integer iat < exp")
    if not isinstance(token_id, str) or not 0 < len(token_id) <= _TOKEN_ID_CHARS:
        raise reject(
            Reason.TOKEN_MALFORMED, f"request token needs a jti of 1 to {_TOKEN_ID_CHARS} characters"
        )
    # Beyond year 9999 `datetime` cannot represent the time; such a token is not ours.
    if not 0 <= iat < exp < 253_402_300_799:
        raise reject(Reason.TOKEN_MALFORMED, "request token times are out of range")
    return iat, exp, token_id
