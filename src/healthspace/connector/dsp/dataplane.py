"""Short-lived data-plane access tokens bound to one agreement and transfer (EdDSA JWTs, our own key)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt

from healthspace.core.errors import AuthenticationError, ValidationError
from healthspace.identity.keys import SigningKey

__all__ = ["ACCESS_TYP", "AccessGrant", "mint_access_token", "verify_access_token"]

ACCESS_TYP = "hs-dataplane+jwt"
DEFAULT_ACCESS_TTL = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class AccessGrant:
    """What a verified data-plane token grants: `consumer` may use `agreement_id` via `transfer_id`."""

    provider: str
    consumer: str
    agreement_id: str
    transfer_id: str
    expires_at: datetime


def mint_access_token(
    key: SigningKey,
    provider: str,
    consumer: str,
    agreement_id: str,
    transfer_id: str,
    now: datetime,
    ttl: timedelta = DEFAULT_ACCESS_TTL,
) -> str:
    """A token for the provider's own data plane (issuer and audience are the provider)."""
    if now.tzinfo is None:
        raise ValidationError("times must be timezone-aware")
    iat = int(now.timestamp())
    payload = {
        "iss": provider,
        "aud": provider,
        "sub": consumer,
        "agreement": agreement_id,
        "transfer": transfer_id,
        "iat": iat,
        "exp": iat + max(1, int(ttl.total_seconds())),
        "jti": secrets.token_urlsafe(12),
    }
    return jwt.encode(
        payload, key.private_key, algorithm="EdDSA", headers={"typ": ACCESS_TYP, "kid": key.key_id}
    )


def verify_access_token(key: SigningKey, provider: str, token: str, now: datetime) -> AccessGrant:
    """Check signature, type, audience and expiry against `now`; raises `AuthenticationError` (401)."""
    try:
        header = jwt.get_unverified_header(token)
        if header.get("typ") != ACCESS_TYP:
            raise AuthenticationError("not a data-plane token", reason="wrong-token-type")
        claims = jwt.decode(
            token,
            key.public_key,
            algorithms=["EdDSA"],
            audience=provider,
            issuer=provider,
            options={"verify_exp": False, "require": ["exp", "sub", "agreement", "transfer"]},
        )
    except jwt.PyJWTError as exc:
        raise AuthenticationError("the data-plane token is not valid", reason="token-invalid") from exc
    if int(claims["exp"]) <= int(now.timestamp()):
        raise AuthenticationError("the data-plane token has expired", reason="token-expired")
    return AccessGrant(
        provider=provider,
        consumer=str(claims["sub"]),
        agreement_id=str(claims["agreement"]),
        transfer_id=str(claims["transfer"]),
        expires_at=datetime.fromtimestamp(int(claims["exp"]), tz=now.tzinfo),
    )
