"""The quarantine: every record an ingest refused, with its reasons, for a steward to fix and re-submit."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel

from healthspace.core.clock import utcnow
from healthspace.core.errors import ConflictError, NotFoundError, ValidationError
from healthspace.data.ingest import IngestReport, ingest_records
from healthspace.data.profile import StandardProfile
from healthspace.data.store import ClinicalStore

__all__ = ["QuarantineEntry", "get", "list_entries", "resubmit"]


class QuarantineEntry(BaseModel):
    quarantine_id: str
    batch_id: str
    source: str | None
    line: int | None
    resource_type: str | None
    resource_id: str | None
    rules: list[str]
    reason: str
    raw: str
    created_at: datetime
    resolved_by: str | None = None

    @property
    def resolved(self) -> bool:
        return self.resolved_by is not None


def _entries(store: ClinicalStore, where: str = "", params: list[Any] | None = None) -> list[QuarantineEntry]:
    con = store.connect()
    rows = (
        con.execute(
            "SELECT quarantine_id, batch_id, source, line, resource_type, resource_id, rules, reason, raw, "  # noqa: S608
            f"epoch_us(created_at) FROM quarantine {where} ORDER BY created_at, source, line",
            params or [],
        )
    ).fetchall()
    resolved = store.resolved
    from datetime import UTC

    out = []
    for qid, batch, source, line, rtype, rid, rules, reason, raw, us in rows:
        out.append(
            QuarantineEntry(
                quarantine_id=qid,
                batch_id=batch,
                source=source,
                line=line,
                resource_type=rtype,
                resource_id=rid,
                rules=list(rules),
                reason=reason,
                raw=bytes(raw).decode("utf-8", errors="replace"),
                created_at=datetime.fromtimestamp(us / 1e6, tz=UTC),
                resolved_by=resolved.get(qid, {}).get("batch_id"),
            )
        )
    return out


def list_entries(
    store: ClinicalStore,
    *,
    include_resolved: bool = False,
    rule: str | None = None,
    batch_id: str | None = None,
    limit: int | None = None,
) -> list[QuarantineEntry]:
    """Quarantined records, oldest first; open ones only unless `include_resolved`."""
    clauses, params = [], []
    if rule:
        clauses.append("list_contains(rules, ?)")
        params.append(rule)
    if batch_id:
        clauses.append("batch_id = ?")
        params.append(batch_id)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    entries = _entries(store, where, params)
    if not include_resolved:
        entries = [e for e in entries if not e.resolved]
    return entries[:limit] if limit is not None else entries


def get(store: ClinicalStore, quarantine_id: str) -> QuarantineEntry:
    found = _entries(store, "WHERE quarantine_id = ?", [quarantine_id])
    if not found:
        raise NotFoundError(f"no quarantined record {quarantine_id!r}")
    return found[0]


def resubmit(
    store: ClinicalStore,
    quarantine_id: str,
    resource: Mapping[str, Any] | bytes | str | None = None,
    standard: StandardProfile | None = None,
) -> IngestReport:
    """Re-ingest a quarantined record, corrected (`resource`) or as it was (e.g. after a profile change).

    On success the entry is marked resolved by the new batch, atomically with the insert. If the record is
    still refused, `ValidationError` says why and nothing changes. A resolved entry cannot be re-submitted.
    """
    entry = get(store, quarantine_id)
    if entry.resolved:
        raise ConflictError(f"quarantined record {quarantine_id} was already resolved by {entry.resolved_by}")
    if resource is None:
        raw = entry.raw.encode()
    elif isinstance(resource, bytes | str):
        raw = resource.encode() if isinstance(resource, str) else resource
    else:
        raw = orjson.dumps(dict(resource))
    raw = raw.strip()
    if not raw:
        raise ValidationError("the corrected resource is empty")
    digest = hashlib.sha256(quarantine_id.encode() + b"\x00" + raw).digest()
    source = f"quarantine:{quarantine_id}"
    resolution = {quarantine_id: {"batch_id": "", "at": utcnow().isoformat()}}
    report = ingest_records(
        store,
        [[(0, entry.line or 1, raw)]],
        [source],
        digest,
        standard,
        fail_on_reject=True,
        resolves=resolution,
    )
    return report
