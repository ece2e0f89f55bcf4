"""Request tokens: the happy path, and every attack the verifier must refuse, each with its reason."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta
from typing import Any

import pytest

from healthspace.core.errors import AuthenticationError, ForbiddenError, HealthspaceError
from healthspace.identity.credentials import ParticipantRole, ParticipantType
from healthspace.identity.errors import Reason
from healthspace.identity.keys import SigningKey
from healthspace.identity.tokens import mint_request_token

from .kit import (
    AUTHORITY_ID,
    HOSPITAL_ID,
    UNIVERSITY_ID,
    Space,
    b64,
    claims_of,
    header_of,
    raw_jws,
    unb64,
)

LEEWAY = timedelta(seconds=30)


def _mint(space: Space, audience: str = UNIVERSITY_ID, **kw: Any) -> str:
    return mint_request_token(
        space.hospital, space.credentials[HOSPITAL_ID], HOSPITAL_ID, audience, space.clock.now(), **kw
    )


def _refused(space: Space, header: str | None, **verifier_kw: Any) -> HealthspaceError:
    with pytest.raises(HealthspaceError) as info:
        space.verifier(**verifier_kw).verify(header)
    return info.value


def _reason(error: HealthspaceError) -> str:
    return str(error.extra["reason"])


def _eddsa(space: Space, payload: dict[str, Any], key: SigningKey | None = None) -> str:
    return raw_jws({"alg": "EdDSA", "typ": "hs-request+jwt"}, payload, (key or space.hospital).sign)


# --- the happy path ------------------------------------------------------------------------------


def test_valid_token_yields_the_caller_its_credential_describes(space: Space) -> None:
    token = _mint(space)
    caller = space.verifier().verify(f"Bearer {token}")
    assert caller.participant_id == HOSPITAL_ID
    assert caller.participant_type is ParticipantType.HOSPITAL
    assert caller.jurisdiction == "CN-GD"
    assert caller.roles == (ParticipantRole.DATA_PROVIDER,)
    assert caller.credential_id == claims_of(space.credentials[HOSPITAL_ID])["jti"]
    assert caller.token_id == claims_of(token)["jti"]


def test_minted_token_has_the_documented_shape(space: Space) -> None:
    token = _mint(space)
    assert header_of(token) == {"alg": "EdDSA", "typ": "hs-request+jwt", "kid": space.hospital.key_id}
    payload = claims_of(token)
    assert payload["iss"] == HOSPITAL_ID
    assert payload["aud"] == UNIVERSITY_ID
    assert payload["exp"] - payload["iat"] == 60
    assert payload["cred"] == space.credentials[HOSPITAL_ID]
    assert len(unb64(payload["jti"])) == 16


def test_each_minted_token_has_a_new_id(space: Space) -> None:
    assert len({claims_of(_mint(space))["jti"] for _ in range(50)}) == 50


def test_bearer_scheme_is_case_insensitive(space: Space) -> None:
    assert space.verifier().verify(f"bearer {_mint(space)}").participant_id == HOSPITAL_ID


def test_token_is_accepted_within_the_leeway_after_expiry(space: Space) -> None:
    token = _mint(space)
    space.clock.advance(timedelta(seconds=60) + LEEWAY - timedelta(seconds=1))
    assert space.verifier(leeway=LEEWAY).verify(f"Bearer {token}").participant_id == HOSPITAL_ID


# --- missing or malformed ------------------------------------------------------------------------


def test_missing_header_is_401_token_missing(space: Space) -> None:
    error = _refused(space, None)
    assert isinstance(error, AuthenticationError)
    assert _reason(error) == Reason.TOKEN_MISSING


def test_empty_header_is_401_token_missing(space: Space) -> None:
    assert _reason(_refused(space, "  ")) == Reason.TOKEN_MISSING


def test_other_scheme_is_401_not_bearer(space: Space) -> None:
    error = _refused(space, f"Basic {_mint(space)}")
    assert isinstance(error, AuthenticationError)
    assert _reason(error) == Reason.NOT_BEARER


def test_bearer_without_token_is_401_not_bearer(space: Space) -> None:
    assert _reason(_refused(space, "Bearer ")) == Reason.NOT_BEARER


@pytest.mark.parametrize("garbage", ["abc", "a.b.c", "e30.e30.", "!!!.???.###", "x" * 10_000])
def test_garbage_token_is_401_token_malformed(space: Space, garbage: str) -> None:
    error = _refused(space, f"Bearer {garbage}")
    assert isinstance(error, AuthenticationError)
    assert _reason(error) == Reason.TOKEN_MALFORMED


def test_credential_presented_as_a_request_token_is_refused(space: Space) -> None:
    error = _refused(space, f"Bearer {space.credentials[HOSPITAL_ID]}")
    assert _reason(error) == Reason.TOKEN_MALFORMED


def test_token_without_credential_is_refused(space: Space) -> None:
    payload = space.request_payload()
    del payload["cred"]
    assert _reason(_refused(space, f"Bearer {_eddsa(space, payload)}")) == Reason.TOKEN_MALFORMED


def test_token_with_unknown_critical_header_is_refused(space: Space) -> None:
    token = raw_jws(
        {"alg": "EdDSA", "typ": "hs-request+jwt", "crit": ["exp"]},
        space.request_payload(),
        space.hospital.sign,
    )
    assert _reason(_refused(space, f"Bearer {token}")) == Reason.TOKEN_MALFORMED


def test_token_with_non_integer_expiry_is_refused(space: Space) -> None:
    payload = space.request_payload(exp="tomorrow")
    assert _reason(_refused(space, f"Bearer {_eddsa(space, payload)}")) == Reason.TOKEN_MALFORMED


# --- forged --------------------------------------------------------------------------------------


def test_tampered_claims_break_the_signature(space: Space) -> None:
    header, _, signature = _mint(space, audience="some-other-member").split(".")
    tampered = {**claims_of(_mint(space, audience="some-other-member")), "aud": UNIVERSITY_ID}
    error = _refused(space, f"Bearer {header}.{b64(json.dumps(tampered).encode())}.{signature}")
    assert isinstance(error, AuthenticationError)
    assert _reason(error) == Reason.BAD_SIGNATURE


def test_token_signed_by_a_key_other_than_the_credentials_is_refused(space: Space) -> None:
    # The university presents the hospital's (public) credential, signing with its own key.
    token = _eddsa(space, space.request_payload(), key=space.university)
    assert _reason(_refused(space, f"Bearer {token}")) == Reason.BAD_SIGNATURE


def test_self_issued_credential_is_refused(space: Space) -> None:
    mallory = SigningKey.generate()
    credential = space.issue(HOSPITAL_ID, mallory, "hospital", "CN-GD", ["data-provider"], authority=mallory)
    token = _eddsa(space, space.request_payload(cred=credential), key=mallory)
    error = _refused(space, f"Bearer {token}")
    assert isinstance(error, AuthenticationError)
    assert _reason(error) == Reason.UNTRUSTED_ISSUER


def test_credential_of_another_data_space_is_refused(space: Space) -> None:
    other_authority = SigningKey.generate()
    credential = space.issue(
        HOSPITAL_ID,
        space.hospital,
        "hospital",
        "CN-GD",
        [],
        authority=other_authority,
        authority_id="other-space-authority",
    )
    token = _eddsa(space, space.request_payload(cred=credential))
    assert _reason(_refused(space, f"Bearer {token}")) == Reason.UNTRUSTED_ISSUER


def test_credential_with_another_issuer_id_under_the_authority_key_is_refused(space: Space) -> None:
    credential = space.issue(
        HOSPITAL_ID, space.hospital, "hospital", "CN-GD", [], authority_id="gba-health-data-authority-2"
    )
    token = _eddsa(space, space.request_payload(cred=credential))
    assert _reason(_refused(space, f"Bearer {token}")) == Reason.UNTRUSTED_ISSUER


def test_token_whose_issuer_is_not_the_credential_holder_is_refused(space: Space) -> None:
    token = _eddsa(space, space.request_payload(iss=UNIVERSITY_ID))
    assert _reason(_refused(space, f"Bearer {token}")) == Reason.ISSUER_MISMATCH


# --- algorithm confusion -------------------------------------------------------------------------


def test_alg_none_is_refused(space: Space) -> None:
    token = raw_jws({"alg": "none", "typ": "hs-request+jwt"}, space.request_payload(), None)
    error = _refused(space, f"Bearer {token}")
    assert isinstance(error, AuthenticationError)
    assert _reason(error) == Reason.BAD_ALGORITHM


@pytest.mark.parametrize("secret_form", ["base64url", "raw"])
def test_hs256_signed_with_the_public_key_is_refused(space: Space, secret_form: str) -> None:
    public = space.hospital.public_key_b64
    secret = public.encode() if secret_form == "base64url" else unb64(public)
    token = raw_jws(
        {"alg": "HS256", "typ": "hs-request+jwt"},
        space.request_payload(),
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )
    assert _reason(_refused(space, f"Bearer {token}")) == Reason.BAD_ALGORITHM


def test_hs256_credential_signed_with_the_authority_public_key_is_refused(space: Space) -> None:
    secret = space.authority.public_key_b64.encode()
    credential = raw_jws(
        {"alg": "HS256", "typ": "hs-membership+jwt"},
        claims_of(space.credentials[HOSPITAL_ID]),
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )
    token = _eddsa(space, space.request_payload(cred=credential))
    assert _reason(_refused(space, f"Bearer {token}")) == Reason.BAD_ALGORITHM


# --- time ----------------------------------------------------------------------------------------


def test_expired_token_is_refused(space: Space) -> None:
    token = _mint(space)
    space.clock.advance(timedelta(seconds=60) + LEEWAY)
    error = _refused(space, f"Bearer {token}", leeway=LEEWAY)
    assert isinstance(error, AuthenticationError)
    assert _reason(error) == Reason.EXPIRED


def test_token_with_an_expired_credential_is_refused(space: Space) -> None:
    space.credentials[HOSPITAL_ID] = space.issue(
        HOSPITAL_ID, space.hospital, "hospital", "CN-GD", [], ttl=timedelta(days=9)
    )  # the clock is START + 10 days
    assert _reason(_refused(space, f"Bearer {_mint(space)}")) == Reason.CREDENTIAL_EXPIRED


def test_token_living_longer_than_max_ttl_is_refused(space: Space) -> None:
    token = _mint(space, ttl=timedelta(minutes=10))
    error = _refused(space, f"Bearer {token}", max_ttl=timedelta(minutes=5))
    assert _reason(error) == Reason.LIFETIME_TOO_LONG


def test_token_issued_in_the_future_beyond_leeway_is_refused(space: Space) -> None:
    iat = int((space.clock.now() + LEEWAY + timedelta(seconds=5)).timestamp())
    token = _eddsa(space, space.request_payload(iat=iat, exp=iat + 60))
    assert _reason(_refused(space, f"Bearer {token}", leeway=LEEWAY)) == Reason.NOT_YET_VALID


# --- audience, replay, revocation ----------------------------------------------------------------


def test_token_for_another_audience_is_refused(space: Space) -> None:
    error = _refused(space, f"Bearer {_mint(space, audience='hk-harbour-hospital')}")
    assert isinstance(error, AuthenticationError)
    assert _reason(error) == Reason.WRONG_AUDIENCE


def test_token_for_the_authority_is_refused_by_a_member(space: Space) -> None:
    assert _reason(_refused(space, f"Bearer {_mint(space, audience=AUTHORITY_ID)}")) == Reason.WRONG_AUDIENCE


def test_same_token_twice_is_refused_the_second_time(space: Space) -> None:
    verifier = space.verifier()
    header = f"Bearer {_mint(space)}"
    verifier.verify(header)
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(header)
    assert info.value.extra["reason"] == Reason.REPLAYED


def test_revoked_credential_is_403(space: Space) -> None:
    space.revocations.credentials.add(claims_of(space.credentials[HOSPITAL_ID])["jti"])
    error = _refused(space, f"Bearer {_mint(space)}")
    assert isinstance(error, ForbiddenError)
    assert _reason(error) == Reason.REVOKED
    assert error.extra["participant_id"] == HOSPITAL_ID


def test_revoked_participant_is_403(space: Space) -> None:
    space.revocations.participants.add(HOSPITAL_ID)
    error = _refused(space, f"Bearer {_mint(space)}")
    assert isinstance(error, ForbiddenError)
    assert _reason(error) == Reason.REVOKED


def test_revocation_check_that_fails_denies(space: Space) -> None:
    space.revocations.error = ConnectionError("authority unreachable")
    error = _refused(space, f"Bearer {_mint(space)}")
    assert isinstance(error, ForbiddenError)
    assert _reason(error) == Reason.REVOCATION_UNKNOWN


def test_refused_token_is_not_burned_for_later(space: Space) -> None:
    # A revoked-then-reinstated member's token must not have been spent by the refusal.
    verifier = space.verifier()
    header = f"Bearer {_mint(space)}"
    space.revocations.participants.add(HOSPITAL_ID)
    with pytest.raises(ForbiddenError):
        verifier.verify(header)
    space.revocations.participants.clear()
    assert verifier.verify(header).participant_id == HOSPITAL_ID


# --- secrets stay out of errors ------------------------------------------------------------------


def test_no_refusal_echoes_the_token(space: Space) -> None:
    token = _mint(space)
    verifier = space.verifier()
    verifier.verify(f"Bearer {token}")
    refusals = [
        _refused(space, f"Basic {token}"),
        _refused(space, f"Bearer {token}", audience="hk-harbour-hospital"),
        _refused(space, f"Bearer {token[:-4]}AAAA"),
    ]
    with pytest.raises(HealthspaceError) as replay:
        verifier.verify(f"Bearer {token}")
    refusals.append(replay.value)
    signature = token.rsplit(".", 1)[1]
    for error in refusals:
        text = str(error.to_problem())
        assert signature not in text
        assert space.credentials[HOSPITAL_ID] not in text
