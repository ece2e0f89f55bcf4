"""Patient access tokens: how a patient proves who they are to the consent API, apart from staff keys.

A token is a compact JWS (EdDSA) signed by the connector's own key, issued by the hospital (a steward
hands it over, e.g. as a QR code on the patient portal letter). Claims: `iss` (the connector), `aud`
(`healthspace-consent-patient`), `sub` (the FHIR Patient id in this hospital), `iat`, `exp`, `jti`; header
`typ` = `hs-patient+jwt`. The distinct audience and type keep a patient token from being accepted
anywhere else, and any other token from being accepted here. See docs/consent.md.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from healthspace.core.clock import Clock, SystemClock
from healthspace.core.errors import AuthenticationError, ValidationError
from healthspace.identity.keys import SigningKey

__all__ = ["PATIENT_AUDIENCE", "PATIENT_TOKEN_TYPE", "IssuedPatientToken", "PatientTokens"]

PATIENT_AUDIENCE = "healthspace-consent-patient"
PATIENT_TOKEN_TYPE = "hs-patient+jwt"  # noqa: S105 (a JWS type name, not a secret)
_MAX_TOKEN = 2048
_MAX_TTL = timedelta(days=366)
_SUB = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # a FHIR id


@dataclass(frozen=True, slots=True)
class IssuedPatientToken:
    token: str
    patient_id: str
    expires_at: datetime


class PatientTokens:
    """Issue and check patient tokens signed by `key`.

    Contract: `authenticate` raises `AuthenticationError` for a missing, malformed, forged (other key,
    other algorithm, edited), expired or not-yet-valid token, or one with the wrong issuer, audience or
    type, and never says which secret part failed beyond a short reason.
    """

    def __init__(self, key: SigningKey, issuer: str, clock: Clock | None = None) -> None:
        if not issuer:
            raise ValidationError("patient tokens need an issuer (the connector's participant id)")
        self._key = key
        self._issuer = issuer
        self._clock: Clock = clock or SystemClock()

    def issue(self, patient_id: str, ttl: timedelta) -> IssuedPatientToken:
        if ttl <= timedelta(0) or ttl > _MAX_TTL:
            raise ValidationError(f"a patient token lives between 1 second and {_MAX_TTL.days} days")
        if not isinstance(patient_id, str) or not _SUB.fullmatch(patient_id):
            raise ValidationError("patient_id must be a FHIR id")
        now = self._clock.now()
        exp = int((now + ttl).timestamp())
        claims: dict[str, str | int] = {
            "iss": self._issuer,
            "aud": PATIENT_AUDIENCE,
            "sub": patient_id,
            "iat": int(now.timestamp()),
            "exp": exp,
            "jti": secrets.token_urlsafe(12),
        }
        token = jwt.encode(
            claims,
            self._key.private_key,
            algorithm="EdDSA",
            headers={"typ": PATIENT_TOKEN_TYPE, "kid": self._key.key_id},
        )
        return IssuedPatientToken(token, patient_id, datetime.fromtimestamp(exp, tz=UTC))

    def authenticate(self, token: str | None) -> str:
        """The FHIR Patient id of a valid token, else `AuthenticationError`."""
        if not token:
            raise AuthenticationError(
                "a patient token is required (Authorization: Bearer ...)", reason="token-missing"
            )
        if len(token) > _MAX_TOKEN:
            raise AuthenticationError("the patient token is not valid", reason="token-malformed")
        try:
            header = jwt.get_unverified_header(token)
            if header.get("typ") != PATIENT_TOKEN_TYPE or header.get("alg") != "EdDSA":
                raise AuthenticationError("the token is not a patient token", reason="token-type")
            # Expiry is checked below against the service clock (tests move it), not PyJWT's own.
            claims = jwt.decode(
                token,
                self._key.public_key,
                algorithms=["EdDSA"],
                audience=PATIENT_AUDIENCE,
                issuer=self._issuer,
                options={
                    "require": ["iss", "aud", "sub", "iat", "exp", "jti"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError:
            raise AuthenticationError("the patient token is not valid", reason="token-invalid") from None
        now = self._clock.now().timestamp()
        exp, iat, sub = claims.get("exp"), claims.get("iat"), claims.get("sub")
        if not isinstance(exp, int) or not isinstance(iat, int) or not isinstance(sub, str):
            raise AuthenticationError("the patient token is not valid", reason="token-invalid")
        if now >= exp:
            raise AuthenticationError("the patient token has expired", reason="token-expired")
        if iat > now + 60:
            raise AuthenticationError("the patient token is not valid yet", reason="token-not-yet-valid")
        if not _SUB.fullmatch(sub):
            raise AuthenticationError("the patient token is not valid", reason="token-invalid")
        return sub
