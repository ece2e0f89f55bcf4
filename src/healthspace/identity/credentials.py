"""Membership credentials: the authority's signed statement of who a participant is and which key it holds.

A credential is a compact JWS (EdDSA, header `typ: hs-membership+jwt`, `kid`: the authority's key id)
with these claims:

    iss  authority id            sub  participant id          jti  credential id ("cred-" + 32 hex)
    iat  issued (s since epoch)  exp  expires
    name legal name              participant_type  one of ParticipantType
    jurisdiction  e.g. CN-GD     roles  list of ParticipantRole
    cnf  {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": <participant public key>}}   (RFC 7800)

`cnf` binds the credential to the participant's key: a request token is only believed when it is signed
by that key (see tokens.py), so a copied credential is worthless without the private key.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic import ValidationError as PydanticValidationError

from healthspace.core.errors import ValidationError
from healthspace.identity import _jws
from healthspace.identity.errors import Reason, reject
from healthspace.identity.keys import SigningKey, key_id_of, public_key_from_b64

__all__ = [
    "CREDENTIAL_TYP",
    "CredentialClaims",
    "Jurisdiction",
    "MembershipCredential",
    "ParticipantId",
    "ParticipantRole",
    "ParticipantType",
    "issue_credential",
    "verify_credential",
]

CREDENTIAL_TYP = "hs-membership+jwt"

# The same slug rule as the authority's registry: lower case, digits and hyphens, 3 to 64 characters.
ParticipantId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,62}[a-z0-9]$")]

# ISO 3166-1 alpha-2 country or area ("HK", "MO") or ISO 3166-2 subdivision ("CN-GD"). The pattern
# checks the shape only; which codes a data space admits is the operator's decision.
_JURISDICTION = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")


class ParticipantType(StrEnum):
    """What kind of organisation a participant is."""

    HOSPITAL = "hospital"
    HEALTH_BUREAU = "health_bureau"
    UNIVERSITY = "university"
    COMPANY = "company"
    SERVICE_PROVIDER = "service_provider"
    REGULATOR = "regulator"


class ParticipantRole(StrEnum):
    """What a participant may do in the data space; policies and routes check these.

    A participant may hold several (a university hospital both provides and consumes data).
    """

    DATA_PROVIDER = "data-provider"
    """Holds data, publishes datasets and offers, and answers compute jobs on its own store."""
    DATA_CONSUMER = "data-consumer"
    """Negotiates access for a registered scenario and runs studies on providers' data."""
    SERVICE_PROVIDER = "service-provider"
    """Offers a data service (de-identification, quality checks, hosted compute) to other members."""
    OPERATOR = "operator"
    """Runs shared infrastructure of the data space (the authority, a clearing house)."""
    AUDITOR = "auditor"
    """Reads audit evidence across participants (regulators, appointed auditors)."""


def _jurisdiction(value: str) -> str:
    if not _JURISDICTION.match(value):
        raise ValueError(
            "jurisdiction must be an ISO 3166-1 alpha-2 code (e.g. HK, MO) or an ISO 3166-2 "
            "subdivision code (e.g. CN-GD), in upper case"
        )
    return value


Jurisdiction = Annotated[str, StringConstraints(max_length=16), Field(description="e.g. CN-GD, HK, MO")]


class CredentialClaims(BaseModel):
    """What the authority asserts about a participant when it issues a credential."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    participant_id: ParticipantId
    legal_name: str = Field(min_length=2, max_length=200)
    participant_type: ParticipantType
    jurisdiction: Jurisdiction
    roles: tuple[ParticipantRole, ...] = ()
    public_key: str = Field(description="Ed25519 public key: raw 32 bytes, base64url without padding")

    @field_validator("jurisdiction")
    @classmethod
    def _check_jurisdiction(cls, v: str) -> str:
        return _jurisdiction(v)

    @field_validator("roles")
    @classmethod
    def _unique_roles(cls, v: tuple[ParticipantRole, ...]) -> tuple[ParticipantRole, ...]:
        # One canonical order, so the same grant always signs to the same claim.
        return tuple(sorted(set(v)))

    @field_validator("public_key")
    @classmethod
    def _check_public_key(cls, v: str) -> str:
        try:
            public_key_from_b64(v)
        except ValidationError as exc:
            raise ValueError(exc.detail) from None
        return v

    def has_role(self, role: ParticipantRole) -> bool:
        return role in self.roles


class MembershipCredential(CredentialClaims):
    """A verified (or just issued) credential: the claims plus who issued it, its id and validity."""

    credential_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    issuer: ParticipantId
    issued_at: datetime
    expires_at: datetime

    @property
    def key_id(self) -> str:
        """Key id of the participant's public key (as `SigningKey.key_id`)."""
        return key_id_of(public_key_from_b64(self.public_key).public_bytes_raw())


def _epoch(t: datetime) -> int:
    if t.tzinfo is None:
        raise ValidationError("times must be timezone-aware")
    return int(t.timestamp())


def issue_credential(
    authority_key: SigningKey,
    authority_id: str,
    claims: CredentialClaims,
    now: datetime,
    ttl: timedelta,
) -> tuple[str, MembershipCredential]:
    """Sign a membership credential for `claims`, valid from `now` (whole seconds) for `ttl`.

    Returns the compact JWS and the credential it encodes. `authority_id` must be a participant-id slug.
    """
    if ttl <= timedelta(0):
        raise ValidationError("a credential's lifetime must be positive")
    iat = _epoch(now)
    exp = iat + max(1, int(ttl.total_seconds()))
    credential_id = f"cred-{secrets.token_hex(16)}"
    try:
        credential = MembershipCredential(
            **claims.model_dump(),
            credential_id=credential_id,
            issuer=authority_id,
            issued_at=datetime.fromtimestamp(iat, UTC),
            expires_at=datetime.fromtimestamp(exp, UTC),
        )
    except PydanticValidationError as exc:
        raise ValidationError(f"cannot issue a credential: {_errors(exc)}") from None
    payload = {
        "iss": authority_id,
        "sub": claims.participant_id,
        "jti": credential_id,
        "iat": iat,
        "exp": exp,
        "name": claims.legal_name,
        "participant_type": claims.participant_type.value,
        "jurisdiction": claims.jurisdiction,
        "roles": [r.value for r in credential.roles],
        "cnf": {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": claims.public_key}},
    }
    return _jws.encode(payload, authority_key.private_key, CREDENTIAL_TYP, authority_key.key_id), credential


def _errors(exc: PydanticValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def _int_claim(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    if type(value) is not int:
        raise reject(Reason.CREDENTIAL_MALFORMED, f"credential claim {name!r} is missing or not an integer")
    return value


def _from_payload(payload: dict[str, Any]) -> MembershipCredential:
    """The credential a verified payload states; rejects (credential-malformed) anything incomplete."""
    iat, exp = _int_claim(payload, "iat"), _int_claim(payload, "exp")
    cnf = payload.get("cnf")
    jwk = cnf.get("jwk") if isinstance(cnf, dict) else None
    if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise reject(Reason.CREDENTIAL_MALFORMED, "credential does not bind an Ed25519 key (cnf.jwk)")
    try:
        return MembershipCredential(
            participant_id=payload.get("sub"),
            legal_name=payload.get("name"),
            participant_type=payload.get("participant_type"),
            jurisdiction=payload.get("jurisdiction"),
            roles=payload.get("roles"),
            public_key=jwk.get("x"),
            credential_id=payload.get("jti"),
            issuer=payload.get("iss"),
            issued_at=datetime.fromtimestamp(iat, UTC),
            expires_at=datetime.fromtimestamp(exp, UTC),
        )
    except (PydanticValidationError, OverflowError, OSError, ValueError):
        raise reject(Reason.CREDENTIAL_MALFORMED, "credential claims are incomplete or invalid") from None


def verify_credential(
    token: str,
    authority_public_key_b64: str,
    authority_id: str,
    now: datetime,
    *,
    leeway: timedelta = timedelta(0),
) -> MembershipCredential:
    """Check a credential's signature (the authority's key), issuer and validity at `now` ± `leeway`.

    Raises `TokenRejectedError` with reason bad-algorithm, credential-malformed, untrusted-issuer,
    credential-expired or credential-not-yet-valid.
    """
    credential = _authenticate(token, public_key_from_b64(authority_public_key_b64), authority_id)
    _check_validity(credential, now, leeway)
    return credential


def _authenticate(token: str, authority_key: Ed25519PublicKey, authority_id: str) -> MembershipCredential:
    """Signature and issuer checks only; the validity period is `_check_validity`'s (it depends on now)."""
    parsed = _jws.parse_unverified(token, CREDENTIAL_TYP, Reason.CREDENTIAL_MALFORMED)
    # A credential signed by any key but the pinned one is self-issued or from another data space.
    payload = _jws.verify(parsed, authority_key, Reason.UNTRUSTED_ISSUER)
    if payload.get("iss") != authority_id:
        raise reject(Reason.UNTRUSTED_ISSUER, "credential was not issued by this data space's authority")
    return _from_payload(payload)


def _check_validity(credential: MembershipCredential, now: datetime, leeway: timedelta) -> None:
    if now >= credential.expires_at + leeway:
        raise reject(
            Reason.CREDENTIAL_EXPIRED,
            "membership credential has expired",
            participant_id=credential.participant_id,
        )
    if credential.issued_at > now + leeway:
        raise reject(
            Reason.CREDENTIAL_NOT_YET_VALID,
            "membership credential is not valid yet",
            participant_id=credential.participant_id,
        )
