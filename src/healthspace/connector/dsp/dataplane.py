"""Short-lived data-plane access tokens bound to one agreement and transfer (EdDSA JWTs, our own key)."""

from __future__ import annotations

import secrets
import threading
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


# Tokens whose signature, type, audience and issuer checked out, by (public key, provider, token): a lab
# sends the same token with every job of a transfer, and decoding and verifying it (Ed25519) is about a
# tenth of a millisecond each time. Only what never changes for a given token is kept; its expiry is
# checked against `now` on every use. Bounded: the oldest entries go first.
_VERIFIED: dict[tuple[str, str, str], tuple[int, str, str, str]] = {}
_VERIFIED_MAX = 1024
_VERIFIED_LOCK = threading.Lock()


def verify_access_token(key: SigningKey, provider: str, token: str, now: datetime) -> AccessGrant:
    """Check signature, type, audience and expiry against `now`; raises `AuthenticationError` (401).

    A token verified before under the same public key and provider is not decoded again (see `_VERIFIED`);
    its expiry is still checked against `now`."""
    cache_key = (key.public_key_b64, provider, token)
    hit = _VERIFIED.get(cache_key)
    if hit is None:
        hit = _verify_signed(key, provider, token)
        with _VERIFIED_LOCK:
            while len(_VERIFIED) >= _VERIFIED_MAX:
                del _VERIFIED[next(iter(_VERIFIED))]
            _VERIFIED[cache_key] = hit
    exp, consumer, agreement_id, transfer_id = hit
    if exp <= int(now.timestamp()):
        raise AuthenticationError("the data-plane token has expired", reason="token-expired")
    return AccessGrant(
        provider=provider,
        consumer=consumer,
        agreement_id=agreement_id,
        transfer_id=transfer_id,
        expires_at=datetime.fromtimestamp(exp, tz=now.tzinfo),
    )


def _verify_signed(key: SigningKey, provider: str, token: str) -> tuple[int, str, str, str]:
    """Expiry, consumer, agreement and transfer of a token whose signature and claims check out."""
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
        return (
            int(claims["exp"]),
            str(claims["sub"]),
            str(claims["agreement"]),
            str(claims["transfer"]),
        )
    except (jwt.PyJWTError, TypeError, ValueError) as exc:
        raise AuthenticationError("the data-plane token is not valid", reason="token-invalid") from exc
