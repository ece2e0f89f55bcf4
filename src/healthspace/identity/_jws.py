"""Compact JWS plumbing shared by credentials, request tokens and revocation lists (private).

PyJWT encodes and signs tokens, and its EdDSA algorithm checks signatures. Parsing is done here, once,
because a request token must be read *before* we know which key verifies it (the key is in the
credential it carries), and because PyJWT's own segment decoding costs more than the Ed25519 check.
The parse is strict: canonical base64url only, JSON objects only, a header whitelist, alg = EdDSA.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from healthspace.identity.errors import Reason, reject

__all__ = [
    "ALGORITHM",
    "MAX_TOKEN_CHARS",
    "Parsed",
    "b64url_decode",
    "b64url_encode",
    "encode",
    "parse_unverified",
    "verify",
]

# The only algorithm accepted anywhere. Naming it once and comparing exactly is what defeats
# "alg": "none" and the HS256-with-the-public-key confusion attack.
ALGORITHM = "EdDSA"
# A request token carries a credential (~0.8 kB); anything far larger is not ours and is refused before
# any decoding work is spent on it.
MAX_TOKEN_CHARS = 8192
# Headers we write and understand. Anything else (crit, b64, jku, x5u, jwk, ...) could change how a
# library interprets the token, so a token carrying it is refused rather than half-understood.
_ALLOWED_HEADERS = frozenset({"alg", "typ", "kid"})
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")

_EDDSA = jwt.get_algorithm_by_name(ALGORITHM)


def b64url_encode(data: bytes) -> str:
    """URL-safe base64 without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict inverse of `b64url_encode`: raises ValueError on any non-alphabet or non-canonical input.

    The standard library decoder silently skips characters outside the alphabet; accepting two spellings
    of the same bytes would let a token be altered without touching its signature check.
    """
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if b64url_encode(data) != text:
        raise ValueError("not canonical base64url")
    return data


def encode(payload: dict[str, Any], key: Ed25519PrivateKey, typ: str, kid: str) -> str:
    """Sign `payload` as a compact JWS with EdDSA and the given `typ` and `kid` headers."""
    return jwt.encode(payload, key, algorithm=ALGORITHM, headers={"typ": typ, "kid": kid})


def _json_object(segment: str) -> dict[str, Any]:
    value = json.loads(b64url_decode(segment))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class Parsed:
    """A structurally valid token whose signature is not checked yet."""

    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


def parse_unverified(token: str, typ: str, malformed: Reason) -> Parsed:
    """Header and payload of `token`, unverified, after the structural checks every token must pass.

    Raises a rejection with reason `malformed` for anything that is not a compact JWS of type `typ`
    with only the headers we write, and `bad-algorithm` for any algorithm other than EdDSA.
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise reject(malformed, "token is too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise reject(malformed, "token is not a compact JWS")
    try:
        header = _json_object(parts[0])
        payload = _json_object(parts[1])
        signature = b64url_decode(parts[2])
    except ValueError:
        raise reject(malformed, "token is not valid base64url JSON") from None
    if "alg" not in header:
        raise reject(malformed, "token header names no algorithm")
    if header["alg"] != ALGORITHM:
        raise reject(Reason.BAD_ALGORITHM, f"only {ALGORITHM} signatures are accepted")
    if not set(header) <= _ALLOWED_HEADERS:
        raise reject(malformed, "token has headers this service does not understand")
    if header.get("typ") != typ:
        raise reject(malformed, f"token is not of type {typ}")
    return Parsed(header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def verify(parsed: Parsed, key: Ed25519PublicKey, bad_signature: Reason) -> dict[str, Any]:
    """Check the EdDSA signature of a parsed token with `key`; return its (now authentic) payload.

    The payload returned was decoded from exactly the bytes the signature covers. Raises a rejection
    with reason `bad_signature` when the signature does not verify.
    """
    if len(parsed.signature) != 64 or not _EDDSA.verify(parsed.signing_input, key, parsed.signature):
        raise reject(bad_signature, "signature does not verify")
    return parsed.payload
