"""Study sites: a provider's data-plane endpoint and token, from the consumer's STARTED transfers."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import httpx

from healthspace.compute import canonical_json
from healthspace.core.errors import AuthenticationError, ValidationError
from healthspace.identity.keys import key_id_of, verify_signature

__all__ = ["Site", "fetch_public_key", "site_from_transfer", "verify_envelope"]


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


def verify_envelope(envelope: dict[str, Any], public_key_b64: str) -> dict[str, Any]:
    """The payload of a provider's signed envelope, after checking key id and Ed25519 signature."""
    try:
        payload = envelope["payload"]
        kid, sig = str(envelope["kid"]), _b64url(str(envelope["signature"]))
        key_id = key_id_of(_b64url(public_key_b64))
    except (KeyError, TypeError, ValueError) as exc:
        raise AuthenticationError("the result is not a signed envelope", reason="bad-envelope") from exc
    if envelope.get("alg") != "EdDSA" or kid != key_id:
        raise AuthenticationError(
            f"the result is signed with key {kid!r}, not {key_id!r}", reason="wrong-key"
        )
    if not isinstance(payload, dict) or not verify_signature(public_key_b64, canonical_json(payload), sig):
        raise AuthenticationError("the result's signature does not verify", reason="bad-signature")
    return payload


def fetch_public_key(http: httpx.Client, site: Site) -> str:
    """The provider's published public key (base64), for sites that do not pin one."""
    if site.public_key is not None:
        return site.public_key
    r = http.get(f"{site.base_url}/.well-known/healthspace")
    r.raise_for_status()
    return str(r.json()["public_key"])
