"""Offline verification of an exported audit log: no database, only the export, a tree head and a key.

An export directory holds `entries.jsonl` (one canonical line per entry:
{"entry":{...},"index":i,"leaf_hash":"<hex>"}), `tree-head.json` and `public-key.json` (ADR 0003).
The recorded leaf hashes are never trusted; they only pinpoint which entry was edited.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import orjson

from healthspace.audit import merkle
from healthspace.audit.models import AuditEntry, SignedTreeHead, VerifyReport, b64decode
from healthspace.core.errors import ValidationError

__all__ = [
    "ENTRIES_FILE",
    "HEAD_FILE",
    "KEY_FILE",
    "load_head",
    "load_public_key",
    "verify_entry_inclusion",
    "verify_export",
    "verify_lines",
]

ENTRIES_FILE = "entries.jsonl"
HEAD_FILE = "tree-head.json"
KEY_FILE = "public-key.json"
_CHUNK = 8192


def load_head(path: Path) -> SignedTreeHead:
    """Read a signed tree head from a JSON file (as written by export or served by the API)."""
    try:
        obj = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"{path.name} is not JSON") from exc
    return SignedTreeHead.from_json(obj)


def load_public_key(value: str) -> str:
    """A public key given as URL-safe base64, or as a path to public-key.json or a file holding it."""
    path = Path(value)
    if path.is_file():
        raw = path.read_text().strip()
        if raw.startswith("{"):
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise ValidationError(f"{path.name} is not JSON") from exc
            if not isinstance(doc, dict) or not isinstance(doc.get("public_key"), str):
                raise ValidationError(f"{path.name} has no public_key")
            raw = doc["public_key"]
        value = raw
    if len(b64decode(value)) != 32:
        raise ValidationError("an Ed25519 public key is 32 bytes")
    return value


def verify_lines(lines: Iterable[bytes], head: SignedTreeHead, public_key_b64: str) -> VerifyReport:
    """Verify export lines against a signed tree head and the key that should have signed it.

    Stops at the first problem. Lines beyond the head's size are counted as unsigned entries.
    """
    frontier = merkle.Frontier()
    size = 0

    def fail(index: int | None, reason: str) -> VerifyReport:
        return VerifyReport(
            ok=False,
            entries=size,
            heads=0,
            root_hash=frontier.root().hex(),
            latest_head=head,
            first_bad_index=index,
            reason=reason,
        )

    if not head.verify(public_key_b64):
        return fail(
            None,
            f"the tree head signature does not verify with the given public key (key id {head.key_id!r})",
        )
    if head.tree_size == 0 and head.root != merkle.EMPTY_ROOT:
        return fail(0, "the tree head of size 0 does not carry the empty-tree root")
    sort = orjson.OPT_SORT_KEYS
    pending: list[bytes] = []

    def flush() -> str | None:
        nonlocal size
        before = size
        cut = head.tree_size - before
        if 0 < cut <= len(pending):
            frontier.extend(pending[:cut])
            if frontier.root() != head.root:
                return (
                    f"entries {0}..{head.tree_size - 1} do not match the signed root (an entry was "
                    f"edited, reordered, inserted or removed and its recorded hash rewritten)"
                )
            frontier.extend(pending[cut:])
        else:
            frontier.extend(pending)
        size += len(pending)
        pending.clear()
        return None

    for index, raw in enumerate(lines):
        line = raw
        if line.endswith(b"\n"):
            line = line[:-1]
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return fail(index, f"line {index + 1} is not JSON")
        if not isinstance(obj, dict) or set(obj) != {"entry", "index", "leaf_hash"}:
            return fail(index, f"line {index + 1} is not an export line (entry, index, leaf_hash)")
        if obj["index"] != index:
            return fail(
                index,
                f"expected entry {index} on line {index + 1} but found index {obj['index']!r} "
                f"(an entry is missing, duplicated or out of order)",
            )
        if orjson.dumps(obj, option=sort) != line:
            return fail(index, f"entry {index} is not in canonical form (the line was edited)")
        try:
            AuditEntry.from_json(obj["entry"])
        except ValidationError as exc:
            return fail(index, f"entry {index} is not a valid audit entry: {exc.detail}")
        leaf = merkle.leaf_hash(orjson.dumps(obj["entry"], option=sort))
        if obj["leaf_hash"] != leaf.hex():
            return fail(
                index, f"entry {index} does not hash to its recorded leaf hash (the entry was edited)"
            )
        pending.append(leaf)
        if len(pending) >= _CHUNK and (problem := flush()) is not None:
            return fail(None, problem)
    if (problem := flush()) is not None:
        return fail(None, problem)
    if size < head.tree_size:
        return fail(
            size,
            f"the tree head covers {head.tree_size} entries but the export holds only {size}: "
            f"entries from {size} on are missing",
        )
    return VerifyReport(
        ok=True,
        entries=size,
        heads=1,
        root_hash=frontier.root().hex(),
        latest_head=head,
        unsigned_entries=size - head.tree_size,
    )


def verify_export(
    directory: Path, head: SignedTreeHead | None = None, public_key_b64: str | None = None
) -> VerifyReport:
    """Verify an export directory. `head` and `public_key_b64` default to the files in the export,
    which proves only that the export is self-consistent: pass a head and key from a trusted source
    (the clearing house, the participant registry) to prove it is the log that was signed."""
    entries = directory / ENTRIES_FILE
    if not entries.is_file():
        raise ValidationError(f"{directory} has no {ENTRIES_FILE}")
    if head is None:
        head = load_head(directory / HEAD_FILE)
    if public_key_b64 is None:
        public_key_b64 = load_public_key(str(directory / KEY_FILE))
    with entries.open("rb") as f:
        return verify_lines(f, head, public_key_b64)


def verify_entry_inclusion(
    entry: AuditEntry, index: int, proof: list[str], head: SignedTreeHead, public_key_b64: str
) -> bool:
    """True when the signed head is genuine and `proof` (hex audit path) puts `entry` at `index`."""
    if not head.verify(public_key_b64):
        return False
    try:
        path = [bytes.fromhex(p) for p in proof]
    except ValueError:
        return False
    leaf = merkle.leaf_hash(entry.canonical_bytes())
    return merkle.verify_inclusion(leaf, index, head.tree_size, path, head.root)
