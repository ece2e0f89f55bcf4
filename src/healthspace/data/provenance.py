"""Signed provenance of clinical data: what each ingest batch loaded, from where, when and by whom.

A record is a JSON object signed with Ed25519 over its canonical bytes (UTF-8 JSON, keys sorted, no
whitespace: `canonical_bytes`). It is kept in the control-plane database, its hash and signature go into
the audit log, and it is exported as a FHIR R4 Provenance resource that carries the signed bytes, so a
verifier needs only the resource and the signer's public key.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from healthspace.audit.models import format_time
from healthspace.core.errors import ValidationError
from healthspace.identity.keys import verify_signature

__all__ = [
    "PROVENANCE_FORMAT",
    "SIGNED_RECORD_EXTENSION",
    "SignedDocument",
    "Signer",
    "canonical_bytes",
    "file_sources",
    "sign_document",
    "to_fhir_provenance",
    "verify_document",
    "verify_fhir_provenance",
]

PROVENANCE_FORMAT = "healthspace-ingest-provenance/1"
SIGNED_RECORD_EXTENSION = "https://healthspace.dev/fhir/StructureDefinition/signed-record"
SIGNER_KEY_EXTENSION = "https://healthspace.dev/fhir/StructureDefinition/signer-key"
_ID_SYSTEM = "urn:healthspace"
# ASTM E1762-95 signature type "Source Signature" (FHIR R4 signature-type value set).
_SOURCE_SIGNATURE = {
    "system": "urn:iso-astm:E1762-95:2013",
    "code": "1.2.840.10065.1.12.1.14",
    "display": "Source Signature",
}
_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


class Signer(Protocol):
    @property
    def key_id(self) -> str: ...

    @property
    def public_key_b64(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


def canonical_bytes(doc: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: UTF-8 JSON with sorted keys and no whitespace."""
    return orjson.dumps(dict(doc), option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class SignedDocument:
    """A signed JSON document: the canonical bytes, the Ed25519 signature and who signed."""

    document: dict[str, Any]
    canonical: bytes
    signature: bytes
    key_id: str
    public_key: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical).hexdigest()

    @property
    def signature_b64(self) -> str:
        return base64.b64encode(self.signature).decode()

    def verifies(self) -> bool:
        return verify_document(self.canonical, self.signature, self.public_key)


def sign_document(doc: Mapping[str, Any], signer: Signer) -> SignedDocument:
    raw = canonical_bytes(doc)
    return SignedDocument(orjson.loads(raw), raw, signer.sign(raw), signer.key_id, signer.public_key_b64)


def verify_document(canonical: bytes, signature: bytes, public_key_b64: str) -> bool:
    """True when `signature` is the key's Ed25519 signature over exactly these bytes."""
    return verify_signature(public_key_b64, canonical, signature)


def file_sources(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Name, size and SHA-256 of each source file, read in blocks (bounded memory)."""
    out = []
    for p in paths:
        h = hashlib.sha256()
        size = 0
        with Path(p).open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
        out.append({"name": Path(p).name, "bytes": size, "sha256": h.hexdigest()})
    return out


def _ident(kind: str, value: str, display: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"identifier": {"system": f"{_ID_SYSTEM}:{kind}", "value": value}}
    if display:
        ref["display"] = display
    return ref


def _instant(s: str) -> str:
    return format_time(datetime.fromisoformat(s))


def to_fhir_provenance(signed: SignedDocument) -> dict[str, Any]:
    """The FHIR R4 Provenance of one ingest batch.

    target: the batch and the dataset; agent: the steward (enterer) on behalf of the organisation
    (custodian) and the source system (author); entity: each source file with its SHA-256; signature:
    the Ed25519 signature over the canonical record, which travels in an extension (base64).
    """
    d = signed.document
    if d.get("format") != PROVENANCE_FORMAT:
        raise ValidationError("not an ingest provenance record")
    recorded = _instant(d["recorded_at"])
    org = _ident("participant", d["organisation"])
    return {
        "resourceType": "Provenance",
        "id": d["batch_id"],
        "target": [
            _ident("batch", d["batch_id"], f"ingest batch {d['batch_id']}"),
            _ident("dataset", d["dataset_id"], f"dataset {d['dataset_id']}"),
        ],
        "occurredPeriod": {"start": _instant(d["started_at"]), "end": recorded},
        "recorded": recorded,
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                    "display": "create",
                }
            ]
        },
        "agent": [
            {
                "type": {"coding": [{"system": _PARTICIPANT, "code": "enterer", "display": "Enterer"}]},
                "who": _ident("actor", d["steward"]),
                "onBehalfOf": org,
            },
            {
                "type": {"coding": [{"system": _PARTICIPANT, "code": "custodian", "display": "Custodian"}]},
                "who": org,
            },
            {
                "type": {"coding": [{"system": _PARTICIPANT, "code": "author", "display": "Author"}]},
                "who": _ident("source-system", d["source_system"]),
            },
        ],
        "entity": [
            {"role": "source", "what": _ident("sha256", s["sha256"], f"{s['name']} ({s['bytes']} bytes)")}
            for s in d["sources"]
        ],
        "signature": [
            {
                "type": [_SOURCE_SIGNATURE],
                "when": recorded,
                "who": org,
                "targetFormat": "application/json",
                "sigFormat": "application/octet-stream",
                "data": signed.signature_b64,
                "extension": [
                    {
                        "url": SIGNED_RECORD_EXTENSION,
                        "valueBase64Binary": base64.b64encode(signed.canonical).decode(),
                    },
                    {
                        "url": SIGNER_KEY_EXTENSION,
                        "valueString": f"ed25519:{signed.key_id}:{signed.public_key}",
                    },
                ],
            }
        ],
    }


def verify_fhir_provenance(resource: Mapping[str, Any], public_key_b64: str) -> dict[str, Any]:
    """Check a Provenance made by `to_fhir_provenance` against a trusted public key; return the record.

    The signature must verify over the embedded canonical record, and the resource's batch, dataset
    and file hashes must be those of that record. Raises `ValidationError` on any mismatch.
    """
    try:
        sig = resource["signature"][0]
        ext = {e["url"]: e for e in sig["extension"]}
        canonical = base64.b64decode(ext[SIGNED_RECORD_EXTENSION]["valueBase64Binary"], validate=True)
        signature = base64.b64decode(sig["data"], validate=True)
        targets = [t["identifier"]["value"] for t in resource["target"]]
        hashes = [e["what"]["identifier"]["value"] for e in resource["entity"]]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValidationError(f"not a signed healthspace Provenance: {type(exc).__name__}") from None
    if not verify_document(canonical, signature, public_key_b64):
        raise ValidationError("the Provenance signature does not verify")
    record: dict[str, Any] = orjson.loads(canonical)
    if targets != [record["batch_id"], record["dataset_id"]] or hashes != [
        s["sha256"] for s in record["sources"]
    ]:
        raise ValidationError("the Provenance resource does not match its signed record")
    return record
