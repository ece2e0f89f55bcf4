"""Audit log domain types: entries and their canonical bytes, signed tree heads, signers and reports.

The canonical encoding of an entry is the Merkle leaf data, so it is fixed forever for a given format
version: UTF-8 JSON, keys sorted, no whitespace (orjson), times as "YYYY-MM-DDTHH:MM:SS.ffffffZ" in UTC.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from healthspace.core.errors import ValidationError

__all__ = [
    "ENTRY_FORMAT_VERSION",
    "MAX_DETAILS_BYTES",
    "AuditEntry",
    "Outcome",
    "Receipt",
    "SignedTreeHead",
    "Signer",
    "VerifyReport",
    "b64decode",
    "b64encode",
    "format_time",
    "parse_time",
    "verify_signature",
]

ENTRY_FORMAT_VERSION = 1
MAX_DETAILS_BYTES = 4096
MAX_NAME = 256
MAX_REASON = 2000
TREE_HEAD_CONTEXT = "healthspace-audit-tree-head-v1"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class Outcome(StrEnum):
    """How the audited action ended: an operation succeeded or failed; a decision allowed or denied."""

    SUCCESS = "success"
    FAILURE = "failure"
    ALLOWED = "allowed"
    DENIED = "denied"


def format_time(t: datetime) -> str:
    """The one time format of the audit log (UTC, microseconds, 'Z'); naive datetimes are refused."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValidationError("audit times must be timezone-aware")
    if t.tzinfo is not UTC:
        t = t.astimezone(UTC)
    # isoformat pads years below 1000 (strftime does not) and is several times faster.
    return t.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(s: str) -> datetime:
    """Inverse of `format_time`; anything but the exact format is refused."""
    try:
        t = datetime.strptime(s, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise ValidationError(f"not an audit time (YYYY-MM-DDTHH:MM:SS.ffffffZ): {s!r}") from exc
    if format_time(t) != s:
        raise ValidationError(f"not an audit time (YYYY-MM-DDTHH:MM:SS.ffffffZ): {s!r}")
    return t


def b64encode(raw: bytes) -> str:
    """URL-safe base64 without padding (the encoding of keys and signatures in healthspace)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Inverse of `b64encode`; raises ValidationError on anything that is not such base64."""
    if not isinstance(text, str) or "=" in text:
        raise ValidationError("expected URL-safe base64 without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValidationError("expected URL-safe base64 without padding") from exc


def _text(name: str, value: object, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"audit entry {name} must be a string")
    if not value and not empty:
        raise ValidationError(f"audit entry {name} must not be empty")
    if len(value) > limit:
        raise ValidationError(f"audit entry {name} is longer than {limit} characters")
    if "\x00" in value:
        raise ValidationError(f"audit entry {name} contains a NUL character")
    return value


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited event. `time` is when it happened (aware; stored in UTC to the microsecond).

    `details` is a small JSON object (at most MAX_DETAILS_BYTES encoded) for facts that have no field;
    it must never hold secrets or patient data, only identifiers and reasons.
    """

    time: datetime
    actor: str
    action: str
    subject: str
    outcome: Outcome
    reason: str = ""
    scenario_id: str | None = None
    agreement_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.time, datetime):
            raise ValidationError("audit entry time must be a datetime")
        format_time(self.time)
        _text("actor", self.actor, MAX_NAME)
        _text("action", self.action, MAX_NAME)
        _text("subject", self.subject, MAX_NAME)
        _text("reason", self.reason, MAX_REASON, empty=True)
        for name in ("scenario_id", "agreement_id"):
            value = getattr(self, name)
            if value is not None:
                _text(name, value, MAX_NAME)
        try:
            object.__setattr__(self, "outcome", Outcome(self.outcome))
        except ValueError as exc:
            raise ValidationError(f"unknown audit outcome {self.outcome!r}") from exc
        if not isinstance(self.details, dict):
            raise ValidationError("audit entry details must be a JSON object")
        try:
            encoded = orjson.dumps(self.details, option=orjson.OPT_SORT_KEYS)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise ValidationError(f"audit entry details are not plain JSON: {exc}") from exc
        if len(encoded) > MAX_DETAILS_BYTES:
            raise ValidationError(f"audit entry details exceed {MAX_DETAILS_BYTES} bytes")
        # A private copy, so a caller mutating its dict cannot change an entry already hashed.
        object.__setattr__(self, "details", orjson.loads(encoded))

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON object (the leaf content), with `v` the format version."""
        return {
            "action": self.action,
            "actor": self.actor,
            "agreement_id": self.agreement_id,
            "details": self.details,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "scenario_id": self.scenario_id,
            "subject": self.subject,
            "time": format_time(self.time),
            "v": ENTRY_FORMAT_VERSION,
        }

    def canonical_bytes(self) -> bytes:
        """The Merkle leaf data: `to_json()` as orjson with sorted keys and no whitespace."""
        return orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, obj: object) -> AuditEntry:
        """Rebuild an entry from its canonical object; refuses unknown keys and other format versions."""
        if not isinstance(obj, dict):
            raise ValidationError("an audit entry must be a JSON object")
        expected = {
            "action",
            "actor",
            "agreement_id",
            "details",
            "outcome",
            "reason",
            "scenario_id",
            "subject",
            "time",
            "v",
        }
        if set(obj) != expected:
            raise ValidationError(f"audit entry keys must be exactly {sorted(expected)}")
        if obj["v"] != ENTRY_FORMAT_VERSION:
            raise ValidationError(f"unsupported audit entry format version {obj['v']!r}")
        if not isinstance(obj["time"], str):
            raise ValidationError("audit entry time must be a string")
        return cls(
            time=parse_time(obj["time"]),
            actor=obj["actor"],
            action=obj["action"],
            subject=obj["subject"],
            outcome=obj["outcome"],
            reason=obj["reason"],
            scenario_id=obj["scenario_id"],
            agreement_id=obj["agreement_id"],
            details=obj["details"],
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> AuditEntry:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValidationError("audit entry is not JSON") from exc
        return cls.from_json(obj)


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where an appended entry landed: its leaf index and leaf hash (hex)."""

    index: int
    leaf_hash: str


@runtime_checkable
class Signer(Protocol):
    """An Ed25519 signing key. `public_key_b64` is the raw 32-byte key, URL-safe base64, no padding."""

    @property
    def key_id(self) -> str: ...

    @property
    def public_key_b64(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


def verify_signature(public_key_b64: str, data: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `data` by the key; False for any defect."""
    try:
        raw = b64decode(public_key_b64)
        key = Ed25519PublicKey.from_public_bytes(raw)
        key.verify(signature, data)
    except (ValidationError, ValueError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True, slots=True)
class SignedTreeHead:
    """A signed commitment to the first `tree_size` entries of a log.

    The signature is Ed25519 over `signed_bytes()`, which is exactly the UTF-8 of these five lines,
    each ending in a line feed (0x0A):

        healthspace-audit-tree-head-v1
        <tree_size, decimal, no leading zeros>
        <timestamp, YYYY-MM-DDTHH:MM:SS.ffffffZ in UTC>
        <root_hash, 64 lowercase hex digits>
        <key_id>

    `signature` is URL-safe base64 without padding of the 64 signature bytes.
    """

    tree_size: int
    root_hash: str
    timestamp: datetime
    key_id: str
    signature: str

    def __post_init__(self) -> None:
        if isinstance(self.tree_size, bool) or not isinstance(self.tree_size, int) or self.tree_size < 0:
            raise ValidationError("tree_size must be a non-negative integer")
        if (
            not isinstance(self.root_hash, str)
            or len(self.root_hash) != 64
            or self.root_hash.strip("0123456789abcdef")
        ):
            raise ValidationError("root_hash must be 64 lowercase hex digits")
        if not isinstance(self.timestamp, datetime):
            raise ValidationError("timestamp must be a datetime")
        format_time(self.timestamp)
        if not isinstance(self.key_id, str) or not self.key_id or "\n" in self.key_id:
            raise ValidationError("key_id must be a non-empty single-line string")
        if not isinstance(self.signature, str):
            raise ValidationError("signature must be a string")

    @staticmethod
    def message(tree_size: int, root_hash: str, timestamp: datetime, key_id: str) -> bytes:
        return f"{TREE_HEAD_CONTEXT}\n{tree_size}\n{format_time(timestamp)}\n{root_hash}\n{key_id}\n".encode()

    def signed_bytes(self) -> bytes:
        return self.message(self.tree_size, self.root_hash, self.timestamp, self.key_id)

    @property
    def root(self) -> bytes:
        return bytes.fromhex(self.root_hash)

    def verify(self, public_key_b64: str) -> bool:
        try:
            sig = b64decode(self.signature)
        except ValidationError:
            return False
        return verify_signature(public_key_b64, self.signed_bytes(), sig)

    @classmethod
    def sign(cls, signer: Signer, tree_size: int, root: bytes, timestamp: datetime) -> SignedTreeHead:
        root_hash = root.hex()
        msg = cls.message(tree_size, root_hash, timestamp, signer.key_id)
        return cls(
            tree_size=tree_size,
            root_hash=root_hash,
            timestamp=timestamp,
            key_id=signer.key_id,
            signature=b64encode(signer.sign(msg)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "root_hash": self.root_hash,
            "timestamp": format_time(self.timestamp),
            "key_id": self.key_id,
            "signature": self.signature,
        }

    @classmethod
    def from_json(cls, obj: object) -> SignedTreeHead:
        if not isinstance(obj, dict):
            raise ValidationError("a signed tree head must be a JSON object")
        try:
            ts = obj["timestamp"]
            if not isinstance(ts, str):
                raise ValidationError("timestamp must be a string")
            return cls(
                tree_size=obj["tree_size"],
                root_hash=obj["root_hash"],
                timestamp=parse_time(ts),
                key_id=obj["key_id"],
                signature=obj["signature"],
            )
        except KeyError as exc:
            raise ValidationError(f"signed tree head lacks {exc.args[0]!r}") from exc


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of verifying a log. When `ok` is false, `first_bad_index` is the first entry index
    that is (or, for a root mismatch, may be) wrong, and `reason` says why in words."""

    ok: bool
    entries: int
    heads: int
    root_hash: str
    latest_head: SignedTreeHead | None = None
    unsigned_entries: int = 0
    first_bad_index: int | None = None
    reason: str | None = None

    def summary(self) -> str:
        if self.ok:
            tail = (
                f"; {self.unsigned_entries} newest entries not yet covered by a signed head"
                if self.unsigned_entries
                else ""
            )
            return (
                f"valid: {self.entries} entries, {self.heads} signed tree heads checked, "
                f"root {self.root_hash}{tail}"
            )
        where = "" if self.first_bad_index is None else f" at index {self.first_bad_index}"
        return f"INVALID{where}: {self.reason}"
