"""Revocation: the authority's signed revocation list, and a cache of it that fails closed when stale.

The list names revoked credentials and revoked participants. Wire form: a compact JWS (EdDSA,
`typ: hs-revocations+jwt`) with claims `iss` (authority id), `iat` (issued, whole seconds),
`revoked_credentials` and `revoked_participants` (lists of ids).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from healthspace.core.clock import Clock, SystemClock
from healthspace.core.errors import ConfigurationError, HealthspaceError
from healthspace.identity import _jws
from healthspace.identity.errors import MembershipDeniedError, Reason, TokenRejectedError
from healthspace.identity.keys import SigningKey, public_key_from_b64

__all__ = [
    "REVOCATION_TYP",
    "InvalidRevocationListError",
    "RevocationCache",
    "RevocationChecker",
    "RevocationList",
    "sign_revocation_list",
    "verify_revocation_list",
]

log = logging.getLogger(__name__)

REVOCATION_TYP = "hs-revocations+jwt"


class RevocationChecker(Protocol):
    """Answers whether a credential or its participant is revoked.

    `is_revoked` MAY raise when it cannot tell; `RequestVerifier` then denies (revocation-unknown).
    The authority's own registry and `RevocationCache` both satisfy this.
    """

    def is_revoked(self, credential_id: str, participant_id: str) -> bool: ...


class InvalidRevocationListError(HealthspaceError):
    """A revocation list that is not signed by the pinned authority key, or is malformed or stale."""

    status = 502
    code = "revocation-list-invalid"
    title = "The authority's revocation list could not be trusted"


class RevocationList(BaseModel):
    """Credentials and participants the authority has revoked, as of `issued_at`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer: str = Field(min_length=1, max_length=64)
    issued_at: datetime
    credential_ids: frozenset[str] = frozenset()
    participant_ids: frozenset[str] = frozenset()

    @field_validator("issued_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("issued_at must be timezone-aware")
        return v

    def revokes(self, credential_id: str, participant_id: str) -> bool:
        """True if the credential, or the participant (any of its credentials), is revoked."""
        return credential_id in self.credential_ids or participant_id in self.participant_ids


def sign_revocation_list(authority_key: SigningKey, revocations: RevocationList) -> str:
    """The list as a compact JWS signed by the authority. `issued_at` is kept to whole seconds."""
    payload = {
        "iss": revocations.issuer,
        "iat": int(revocations.issued_at.timestamp()),
        "revoked_credentials": sorted(revocations.credential_ids),
        "revoked_participants": sorted(revocations.participant_ids),
    }
    return _jws.encode(payload, authority_key.private_key, REVOCATION_TYP, authority_key.key_id)


def verify_revocation_list(token: str, authority_public_key_b64: str, authority_id: str) -> RevocationList:
    """Check the list's signature against the pinned authority key and its issuer; raise
    `InvalidRevocationListError` otherwise (never returns an unverified list)."""
    if not isinstance(token, str):
        raise InvalidRevocationListError("revocation list is not a string")
    try:
        parsed = _jws.parse_unverified(token, REVOCATION_TYP, Reason.TOKEN_MALFORMED)
        payload = _jws.verify(parsed, public_key_from_b64(authority_public_key_b64), Reason.BAD_SIGNATURE)
    except (TokenRejectedError, MembershipDeniedError) as exc:
        raise InvalidRevocationListError(f"revocation list refused: {exc.detail}") from None
    if payload.get("iss") != authority_id:
        raise InvalidRevocationListError("revocation list was issued by another authority")
    iat = payload.get("iat")
    credentials, participants = (
        _str_list(payload.get("revoked_credentials")),
        _str_list(payload.get("revoked_participants")),
    )
    if type(iat) is not int or credentials is None or participants is None:
        raise InvalidRevocationListError("revocation list claims are missing or of the wrong type")
    try:
        issued_at = datetime.fromtimestamp(iat, UTC)
    except (OverflowError, OSError, ValueError):
        raise InvalidRevocationListError("revocation list has an impossible issue time") from None
    return RevocationList(
        issuer=authority_id,
        issued_at=issued_at,
        credential_ids=frozenset(credentials),
        participant_ids=frozenset(participants),
    )


def _str_list(value: object) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


@dataclass(frozen=True)
class _Held:
    revocations: RevocationList
    fetched_at: datetime


class RevocationCache:
    """Keeps the authority's revocation list fresh and answers `is_revoked` from it.

    - The list is fetched anew once it was fetched more than `max_age` ago (`max_age=0`: every check).
    - `fetch` returns a *verified* list (`verify_revocation_list`) or raises. A failed fetch keeps the
      list held; the next attempt waits `retry_after`, so an authority outage does not make every
      request wait on a timeout.
    - A list older than the one held (by `issued_at`) is refused: an old signed list replayed by
      someone in the path must not undo a revocation.
    - Fail closed: when no list is held, or the held list was issued more than `hard_limit` ago,
      `is_revoked` raises `MembershipDeniedError` (revocation-unknown) for everyone.
    """

    def __init__(
        self,
        fetch: Callable[[], RevocationList],
        *,
        clock: Clock | None = None,
        max_age: timedelta = timedelta(seconds=5),
        hard_limit: timedelta = timedelta(minutes=10),
        retry_after: timedelta = timedelta(seconds=5),
    ) -> None:
        if max_age < timedelta(0) or hard_limit <= max_age:
            raise ConfigurationError("revocation cache needs 0 <= max_age < hard_limit")
        self._fetch = fetch
        self._clock = clock or SystemClock()
        self._max_age = max_age
        self._hard_limit = hard_limit
        self._retry_after = retry_after
        self._held: _Held | None = None
        self._next_attempt: datetime | None = None
        self._lock = threading.Lock()

    def current(self) -> RevocationList:
        """The list to decide with, fetching first when it is due. Raises when the answer is unknown."""
        now = self._clock.now()
        held = self._held
        if held is None or now - held.fetched_at >= self._max_age:
            self._refresh(now, wait=held is None or self._too_old(held, now))
            held = self._held
        if held is None:
            raise MembershipDeniedError(
                Reason.REVOCATION_UNKNOWN,
                "revocation status unknown: no revocation list could be fetched from the authority",
            )
        if self._too_old(held, now):
            raise MembershipDeniedError(
                Reason.REVOCATION_UNKNOWN,
                "revocation status unknown: the authority's "
                "revocation list is out of date and cannot be refreshed",
            )
        return held.revocations

    def is_revoked(self, credential_id: str, participant_id: str) -> bool:
        return self.current().revokes(credential_id, participant_id)

    def _too_old(self, held: _Held, now: datetime) -> bool:
        return now - held.revocations.issued_at > self._hard_limit

    def _refresh(self, now: datetime, *, wait: bool) -> None:
        # While a usable list is held, one thread refreshes and the others go on with the held list.
        if not self._lock.acquire(blocking=wait):
            return
        try:
            held = self._held
            if held is not None and now - held.fetched_at < self._max_age:
                return  # another thread refreshed while we waited
            if self._next_attempt is not None and now < self._next_attempt:
                return
            try:
                fresh = self._fetch()
            except Exception as exc:  # any failure to fetch is handled the same way: keep, retry later
                log.warning("revocation list fetch failed: %s", type(exc).__name__)
                self._next_attempt = now + self._retry_after
                return
            if held is not None and fresh.issued_at < held.revocations.issued_at:
                log.warning("refused a revocation list older than the one held")
                self._next_attempt = now + self._retry_after
                return
            self._held = _Held(fresh, now)
            self._next_attempt = None
        finally:
            self._lock.release()
