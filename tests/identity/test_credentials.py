"""Membership credentials: what is signed, and what verification refuses."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError as PydanticValidationError

from healthspace.core.errors import ValidationError
from healthspace.identity.credentials import (
    CredentialClaims,
    MembershipCredential,
    ParticipantRole,
    ParticipantType,
    issue_credential,
    verify_credential,
)
from healthspace.identity.errors import Reason, TokenRejectedError
from healthspace.identity.keys import SigningKey, verify_signature

from .kit import AUTHORITY_ID, HOSPITAL_ID, START, Space, claims_of, header_of, raw_jws, unb64


def _claims(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "participant_id": HOSPITAL_ID,
        "legal_name": "Pearl River General Hospital",
        "participant_type": "hospital",
        "jurisdiction": "CN-GD",
        "roles": ["data-provider"],
        "public_key": SigningKey.generate().public_key_b64,
    }
    base.update(overrides)
    return base


def _verify(space: Space, token: str) -> MembershipCredential:
    return verify_credential(token, space.authority.public_key_b64, AUTHORITY_ID, space.clock.now())


def test_the_six_participant_types() -> None:
    assert {t.value for t in ParticipantType} == {
        "hospital",
        "health_bureau",
        "university",
        "company",
        "service_provider",
        "regulator",
    }


@pytest.mark.parametrize("jurisdiction", ["CN-GD", "HK", "MO", "CN-44", "PT"])
def test_jurisdiction_accepts_iso_3166_codes_and_subdivisions(jurisdiction: str) -> None:
    assert CredentialClaims.model_validate(_claims(jurisdiction=jurisdiction)).jurisdiction == jurisdiction


@pytest.mark.parametrize("jurisdiction", ["", "cn-gd", "HKG", "Hong Kong", "CN_GD", "CN-GDXX", "CN-"])
def test_jurisdiction_refuses_other_shapes(jurisdiction: str) -> None:
    with pytest.raises(PydanticValidationError, match="ISO 3166"):
        CredentialClaims.model_validate(_claims(jurisdiction=jurisdiction))


def test_unknown_participant_type_is_refused() -> None:
    with pytest.raises(PydanticValidationError):
        CredentialClaims.model_validate(_claims(participant_type="pharmacy"))


def test_unknown_role_is_refused() -> None:
    with pytest.raises(PydanticValidationError):
        CredentialClaims.model_validate(_claims(roles=["superuser"]))


def test_roles_are_deduplicated_in_one_order() -> None:
    claims = CredentialClaims.model_validate(
        _claims(roles=["data-provider", "data-consumer", "data-provider"])
    )
    assert claims.roles == (ParticipantRole.DATA_CONSUMER, ParticipantRole.DATA_PROVIDER)


def test_public_key_must_be_an_ed25519_key() -> None:
    with pytest.raises(PydanticValidationError, match="32 bytes"):
        CredentialClaims.model_validate(_claims(public_key="AAAA"))


def test_participant_id_must_be_a_slug() -> None:
    with pytest.raises(PydanticValidationError):
        CredentialClaims.model_validate(_claims(participant_id="Pearl River!"))


def test_issued_credential_is_an_eddsa_jws_of_membership_type_signed_by_the_authority(space: Space) -> None:
    token, _ = issue_credential(
        space.authority, AUTHORITY_ID, CredentialClaims.model_validate(_claims()), START, timedelta(days=30)
    )
    header = header_of(token)
    assert header == {"alg": "EdDSA", "typ": "hs-membership+jwt", "kid": space.authority.key_id}
    signing_input, signature = token.rsplit(".", 1)
    assert verify_signature(space.authority.public_key_b64, signing_input.encode(), unb64(signature))


def test_issued_credential_carries_the_claims_and_binds_the_key(space: Space) -> None:
    claims = CredentialClaims.model_validate(_claims())
    token, credential = issue_credential(space.authority, AUTHORITY_ID, claims, START, timedelta(days=30))
    payload = claims_of(token)
    assert payload["iss"] == AUTHORITY_ID
    assert payload["sub"] == HOSPITAL_ID
    assert payload["jti"] == credential.credential_id
    assert payload["exp"] - payload["iat"] == 30 * 86400
    assert payload["iat"] == int(START.timestamp())
    assert payload["name"] == "Pearl River General Hospital"
    assert payload["participant_type"] == "hospital"
    assert payload["jurisdiction"] == "CN-GD"
    assert payload["roles"] == ["data-provider"]
    assert payload["cnf"] == {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": claims.public_key}}


def test_credential_ids_are_unique(space: Space) -> None:
    claims = CredentialClaims.model_validate(_claims())
    ids = {
        issue_credential(space.authority, AUTHORITY_ID, claims, START, timedelta(days=1))[1].credential_id
        for _ in range(20)
    }
    assert len(ids) == 20


def test_verify_returns_what_was_issued(space: Space) -> None:
    claims = CredentialClaims.model_validate(_claims())
    token, issued = issue_credential(space.authority, AUTHORITY_ID, claims, START, timedelta(days=30))
    verified = _verify(space, token)
    assert verified == issued
    assert verified.expires_at == START + timedelta(days=30)
    assert verified.issuer == AUTHORITY_ID


def test_credential_key_id_matches_the_participant_signing_key(space: Space) -> None:
    assert _verify(space, space.credentials[HOSPITAL_ID]).key_id == space.hospital.key_id


def test_expired_credential_is_refused(space: Space) -> None:
    token = space.issue(HOSPITAL_ID, space.hospital, "hospital", "CN-GD", [], ttl=timedelta(days=1))
    with pytest.raises(TokenRejectedError) as info:
        _verify(space, token)  # the clock is START + 10 days
    assert info.value.reason is Reason.CREDENTIAL_EXPIRED


def test_credential_signed_by_another_key_is_refused(space: Space) -> None:
    token = space.issue(HOSPITAL_ID, space.hospital, "hospital", "CN-GD", [], authority=SigningKey.generate())
    with pytest.raises(TokenRejectedError) as info:
        _verify(space, token)
    assert info.value.reason is Reason.UNTRUSTED_ISSUER


def test_credential_from_another_issuer_id_is_refused(space: Space) -> None:
    token = space.issue(HOSPITAL_ID, space.hospital, "hospital", "CN-GD", [], authority_id="other-authority")
    with pytest.raises(TokenRejectedError) as info:
        _verify(space, token)
    assert info.value.reason is Reason.UNTRUSTED_ISSUER


def test_credential_with_missing_claims_is_refused_even_when_signed(space: Space) -> None:
    payload = claims_of(space.credentials[HOSPITAL_ID])
    del payload["cnf"]
    token = raw_jws({"alg": "EdDSA", "typ": "hs-membership+jwt"}, payload, space.authority.sign)
    with pytest.raises(TokenRejectedError) as info:
        _verify(space, token)
    assert info.value.reason is Reason.CREDENTIAL_MALFORMED


def test_issue_refuses_a_naive_time(space: Space) -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        issue_credential(
            space.authority,
            AUTHORITY_ID,
            CredentialClaims.model_validate(_claims()),
            START.replace(tzinfo=None),
            timedelta(days=1),
        )
