"""Signed consent receipts: what a patient keeps as proof of each change, verifiable offline.

A receipt document is JSON: `{"payload": {...}, "alg": "EdDSA", "key_id": ..., "signature": ...}`.
The signature is Ed25519 over the payload's canonical bytes (UTF-8 JSON, keys sorted, no whitespace),
base64url without padding. Each payload names the SHA-256 (hex) of the canonical bytes of the whole
previous receipt document of the same patient, so a patient's receipts form a chain: a removed,
reordered or altered receipt breaks it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from healthspace.audit.models import Signer, b64decode, b64encode
from healthspace.core.errors import ValidationError
from healthspace.identity.keys import verify_signature

__all__ = [
    "RECEIPT_FORMAT",
    "canonical",
    "digest_of",
    "parse_receipt",
    "sign_receipt",
    "verify_chain",
    "verify_receipt",
]

RECEIPT_FORMAT = "healthspace-consent-receipt/1"
_PAYLOAD_KEYS = frozenset(
    {
        "format",
        "receipt_id",
        "issuer",
        "patient",
        "scenario_id",
        "decision",
        "decided_at",
        "valid_from",
        "valid_until",
        "data_classes",
        "decision_id",
        "chain_seq",
        "previous_receipt_hash",
    }
)


def canonical(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def digest_of(document: Mapping[str, Any]) -> str:
    """SHA-256 hex of a receipt document's canonical bytes (what the next receipt chains to)."""
    return hashlib.sha256(canonical(dict(document))).hexdigest()


def sign_receipt(signer: Signer, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The receipt document for `payload`, signed by `signer`. The payload must have exactly the
    receipt's fields (see `_PAYLOAD_KEYS`) and `format` = RECEIPT_FORMAT."""
    body = dict(payload)
    if set(body) != _PAYLOAD_KEYS or body.get("format") != RECEIPT_FORMAT:
        raise ValidationError("a receipt payload has exactly the receipt fields and the receipt format")
    return {
        "payload": body,
        "alg": "EdDSA",
        "key_id": signer.key_id,
        "signature": b64encode(signer.sign(canonical(body))),
    }


def parse_receipt(document: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    """A receipt document as a dict, with its shape checked (not its signature)."""
    if isinstance(document, str | bytes):
        try:
            document = orjson.loads(document)
        except orjson.JSONDecodeError:
            raise ValidationError("the receipt is not JSON") from None
    if not isinstance(document, Mapping):
        raise ValidationError("a receipt is a JSON object")
    doc = dict(document)
    if set(doc) != {"payload", "alg", "key_id", "signature"} or doc["alg"] != "EdDSA":
        raise ValidationError("a receipt has exactly payload, alg (EdDSA), key_id and signature")
    payload = doc["payload"]
    if not isinstance(payload, dict) or set(payload) != _PAYLOAD_KEYS:
        raise ValidationError("the receipt payload does not have the receipt fields")
    if payload["format"] != RECEIPT_FORMAT:
        raise ValidationError(f"unsupported receipt format {payload['format']!r}")
    if not isinstance(doc["signature"], str):
        raise ValidationError("the receipt signature must be a string")
    return doc


def verify_receipt(document: str | bytes | Mapping[str, Any], public_key_b64: str) -> dict[str, Any]:
    """Check a receipt's signature with the issuer's public key; returns its payload.

    Raises `ValidationError` if the document is malformed or the signature does not verify (any edit
    to the payload, or a signature by another key).
    """
    doc = parse_receipt(document)
    try:
        signature = b64decode(doc["signature"])
    except ValidationError:
        raise ValidationError("the receipt signature is not base64url") from None
    if not verify_signature(public_key_b64, canonical(doc["payload"]), signature):
        raise ValidationError(
            "the receipt signature does not verify: it was altered or not issued by this key"
        )
    payload: dict[str, Any] = doc["payload"]
    return payload


def verify_chain(documents: Sequence[str | bytes | Mapping[str, Any]], public_key_b64: str) -> int:
    """Verify a patient's receipts in order: every signature, and each link to the previous receipt.

    Returns the number of receipts verified; raises `ValidationError` naming the first broken one.
    """
    previous: str | None = None
    patient: str | None = None
    for i, d in enumerate(documents):
        payload = verify_receipt(d, public_key_b64)
        if payload["chain_seq"] != i:
            raise ValidationError(
                f"receipt {i} has chain position {payload['chain_seq']}: a receipt is missing"
            )
        if payload["previous_receipt_hash"] != previous:
            raise ValidationError(f"receipt {i} does not link to the receipt before it")
        if patient is not None and payload["patient"] != patient:
            raise ValidationError(f"receipt {i} belongs to another patient")
        patient = payload["patient"]
        previous = digest_of(parse_receipt(d))
    return len(documents)
