"""Revocation lists: signed by the authority, cached with a max age, failing closed past a hard limit."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from healthspace.core.clock import FixedClock
from healthspace.core.errors import ConfigurationError, ForbiddenError
from healthspace.identity.errors import Reason
from healthspace.identity.keys import SigningKey
from healthspace.identity.revocation import (
    InvalidRevocationListError,
    RevocationCache,
    RevocationList,
    sign_revocation_list,
    verify_revocation_list,
)

from .kit import AUTHORITY_ID, HOSPITAL_ID, START, UNIVERSITY_ID, b64, claims_of, header_of, raw_jws

MAX_AGE = timedelta(seconds=5)
HARD_LIMIT = timedelta(minutes=10)


def _list(
    at: datetime, credentials: tuple[str, ...] = (), participants: tuple[str, ...] = ()
) -> RevocationList:
    return RevocationList(
        issuer=AUTHORITY_ID,
        issued_at=at,
        credential_ids=frozenset(credentials),
        participant_ids=frozenset(participants),
    )


class Authority:
    """Serves signed revocation lists issued at the clock's time; can be made to fail."""

    def __init__(self, clock: FixedClock) -> None:
        self.key = SigningKey.generate()
        self.clock = clock
        self.revoked: set[str] = set()
        self.down = False
        self.fetches = 0

    def fetch(self) -> RevocationList:
        self.fetches += 1
        if self.down:
            raise ConnectionError("authority unreachable")
        token = sign_revocation_list(self.key, _list(self.clock.now(), tuple(self.revoked)))
        return verify_revocation_list(token, self.key.public_key_b64, AUTHORITY_ID)


@pytest.fixture
def authority(clock: FixedClock) -> Authority:
    return Authority(clock)


@pytest.fixture
def cache(authority: Authority, clock: FixedClock) -> RevocationCache:
    return RevocationCache(
        authority.fetch, clock=clock, max_age=MAX_AGE, hard_limit=HARD_LIMIT, retry_after=timedelta(seconds=5)
    )


# --- the signed list ---------------------------------------------------------------------------------


def test_signed_list_round_trips(clock: FixedClock) -> None:
    key = SigningKey.generate()
    original = _list(clock.now(), ("cred-1", "cred-2"), (HOSPITAL_ID,))
    token = sign_revocation_list(key, original)
    assert verify_revocation_list(token, key.public_key_b64, AUTHORITY_ID) == original
    assert header_of(token)["typ"] == "hs-revocations+jwt"


def test_list_revokes_by_credential_or_by_participant(clock: FixedClock) -> None:
    revocations = _list(clock.now(), ("cred-1",), (HOSPITAL_ID,))
    assert revocations.revokes("cred-1", UNIVERSITY_ID)
    assert revocations.revokes("cred-9", HOSPITAL_ID)
    assert not revocations.revokes("cred-9", UNIVERSITY_ID)


def test_tampered_list_signature_is_rejected(clock: FixedClock) -> None:
    key = SigningKey.generate()
    token = sign_revocation_list(key, _list(clock.now(), ("cred-1",)))
    header, _, signature = token.split(".")
    emptied = {**claims_of(token), "revoked_credentials": []}  # try to un-revoke cred-1
    forged = f"{header}.{b64(json.dumps(emptied).encode())}.{signature}"
    with pytest.raises(InvalidRevocationListError):
        verify_revocation_list(forged, key.public_key_b64, AUTHORITY_ID)


def test_list_signed_by_another_key_is_rejected(clock: FixedClock) -> None:
    token = sign_revocation_list(SigningKey.generate(), _list(clock.now()))
    with pytest.raises(InvalidRevocationListError):
        verify_revocation_list(token, SigningKey.generate().public_key_b64, AUTHORITY_ID)


def test_list_of_another_authority_is_rejected(clock: FixedClock) -> None:
    key = SigningKey.generate()
    token = sign_revocation_list(key, RevocationList(issuer="other-authority", issued_at=clock.now()))
    with pytest.raises(InvalidRevocationListError, match="another authority"):
        verify_revocation_list(token, key.public_key_b64, AUTHORITY_ID)


def test_list_with_alg_none_is_rejected(clock: FixedClock) -> None:
    payload = {
        "iss": AUTHORITY_ID,
        "iat": int(clock.now().timestamp()),
        "revoked_credentials": [],
        "revoked_participants": [],
    }
    token = raw_jws({"alg": "none", "typ": "hs-revocations+jwt"}, payload, None)
    with pytest.raises(InvalidRevocationListError):
        verify_revocation_list(token, SigningKey.generate().public_key_b64, AUTHORITY_ID)


# --- the cache ---------------------------------------------------------------------------------------


def test_cache_answers_from_the_fetched_list(cache: RevocationCache, authority: Authority) -> None:
    authority.revoked.add("cred-1")
    assert cache.is_revoked("cred-1", HOSPITAL_ID)
    assert not cache.is_revoked("cred-2", HOSPITAL_ID)
    assert authority.fetches == 1


def test_cache_does_not_refetch_within_max_age(
    cache: RevocationCache, authority: Authority, clock: FixedClock
) -> None:
    cache.current()
    clock.advance(MAX_AGE - timedelta(seconds=1))
    cache.current()
    assert authority.fetches == 1


def test_cache_refetches_when_stale_and_sees_new_revocations(
    cache: RevocationCache, authority: Authority, clock: FixedClock
) -> None:
    assert not cache.is_revoked("cred-1", HOSPITAL_ID)
    authority.revoked.add("cred-1")
    clock.advance(MAX_AGE)
    assert cache.is_revoked("cred-1", HOSPITAL_ID)
    assert authority.fetches == 2


def test_failed_fetch_within_hard_limit_keeps_the_held_list(
    cache: RevocationCache, authority: Authority, clock: FixedClock
) -> None:
    authority.revoked.add("cred-1")
    cache.current()
    authority.down = True
    clock.advance(HARD_LIMIT - timedelta(seconds=1))
    assert cache.is_revoked("cred-1", HOSPITAL_ID)


def test_failed_fetch_beyond_hard_limit_denies_everyone(
    cache: RevocationCache, authority: Authority, clock: FixedClock
) -> None:
    cache.current()
    authority.down = True
    clock.advance(HARD_LIMIT + timedelta(seconds=1))
    with pytest.raises(ForbiddenError) as info:
        cache.is_revoked("cred-unrevoked", UNIVERSITY_ID)
    assert info.value.extra["reason"] == Reason.REVOCATION_UNKNOWN


def test_no_list_ever_fetched_denies(cache: RevocationCache, authority: Authority) -> None:
    authority.down = True
    with pytest.raises(ForbiddenError) as info:
        cache.is_revoked("cred-1", HOSPITAL_ID)
    assert info.value.extra["reason"] == Reason.REVOCATION_UNKNOWN


def test_failed_fetch_is_not_retried_before_retry_after(
    cache: RevocationCache, authority: Authority, clock: FixedClock
) -> None:
    cache.current()
    authority.down = True
    clock.advance(MAX_AGE)
    cache.current()
    cache.current()
    assert authority.fetches == 2
    clock.advance(timedelta(seconds=5))
    cache.current()
    assert authority.fetches == 3


def test_cache_recovers_when_the_authority_returns(
    cache: RevocationCache, authority: Authority, clock: FixedClock
) -> None:
    cache.current()
    authority.down = True
    clock.advance(HARD_LIMIT + timedelta(seconds=1))
    with pytest.raises(ForbiddenError):
        cache.current()
    authority.down = False
    clock.advance(timedelta(seconds=5))
    assert not cache.is_revoked("cred-1", HOSPITAL_ID)


def test_an_older_list_does_not_replace_a_newer_one(clock: FixedClock) -> None:
    lists = [_list(clock.now(), ("cred-1",)), _list(clock.now() - timedelta(minutes=1))]
    cache = RevocationCache(lambda: lists.pop(0), clock=clock, max_age=MAX_AGE, hard_limit=HARD_LIMIT)
    assert cache.is_revoked("cred-1", HOSPITAL_ID)
    clock.advance(MAX_AGE)
    assert cache.is_revoked("cred-1", HOSPITAL_ID)  # the replayed older list, without it, is refused
    assert lists == []


def test_list_issued_long_ago_is_not_trusted_even_when_just_fetched(clock: FixedClock) -> None:
    stale = _list(clock.now() - HARD_LIMIT - timedelta(seconds=1))
    cache = RevocationCache(lambda: stale, clock=clock, max_age=MAX_AGE, hard_limit=HARD_LIMIT)
    with pytest.raises(ForbiddenError):
        cache.current()


def test_hard_limit_must_exceed_max_age() -> None:
    with pytest.raises(ConfigurationError):
        RevocationCache(lambda: _list(START), max_age=timedelta(minutes=10), hard_limit=timedelta(minutes=5))
