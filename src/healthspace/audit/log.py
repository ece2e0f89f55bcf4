"""The audit log service: durable group-committed appends, signed tree heads, proofs, verification, export.

Each `AuditLog` keeps the tree's frontier (and the hashes of every complete subtree of 256 leaves or
more) in memory, rebuilt from stored content on open, so an append costs O(log n) hashes and a proof
reads at most two 256-leaf blocks of leaf hashes. Concurrent `append` calls are serialised into
batches: whichever caller finds no write in progress commits everything queued so far in one
transaction (group commit), and every caller returns only after the transaction holding its entry
has committed.

Several `AuditLog`s (several processes) may append to one database: the next index lives in the
database (`audit_counter`), advanced in the transaction that inserts the entries it numbers, so
indexes follow commit order and stay gap-free whoever writes. A log learns of entries others
appended by reading them back (their leaves recomputed from content) before it extends its tree past
them, and signs a head only while holding the counter, so every head covers a committed prefix.
"""

from __future__ import annotations

import gc
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, cast

import orjson
from sqlalchemy import Connection, Table, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import PoolProxiedConnection

from healthspace.audit import merkle
from healthspace.audit.models import (
    AuditEntry,
    Outcome,
    Receipt,
    SignedTreeHead,
    Signer,
    VerifyReport,
    format_time,
    parse_time,
)
from healthspace.audit.tables import AuditCounterRow, AuditEntryRow, AuditKeyRow, AuditTreeHeadRow
from healthspace.core.clock import Clock, SystemClock
from healthspace.core.db import Database, set_autocommit
from healthspace.core.errors import HealthspaceError, ValidationError

__all__ = [
    "AuditBatch",
    "AuditIntegrityError",
    "AuditLog",
    "AuditRecorder",
    "AuditUnavailableError",
    "ConsistencyProof",
    "InclusionProof",
    "LoggedEntry",
    "export_database",
    "verify_database",
]

_ENTRIES = cast(Table, AuditEntryRow.__table__)
_HEADS = cast(Table, AuditTreeHeadRow.__table__)
_KEYS = cast(Table, AuditKeyRow.__table__)
_COUNTER = cast(Table, AuditCounterRow.__table__)
_CACHE_LEVEL = 8  # keep subtree hashes from 256 leaves up: ~n/128 hashes in memory
_BLOCK = 1 << _CACHE_LEVEL
_PAGE = 20_000
_MAX_AHEAD = 4096  # own leaves kept past a gap before an append reads back (`AuditLog._grow`)
_PG_MAX_PARAMS = 65_535  # parameters per statement: the protocol counts them in 16 bits


class AuditUnavailableError(HealthspaceError):
    """The entry could not be committed (database down or busy); the audited action must not proceed."""

    status = 503
    code = "audit-unavailable"
    title = "Audit log unavailable"


class AuditIntegrityError(HealthspaceError):
    """The stored audit log is not what was appended (tampering, or lost rows)."""

    status = 500
    code = "audit-integrity"
    title = "Audit log integrity failure"


@dataclass(frozen=True, slots=True)
class LoggedEntry:
    """An entry as stored: its leaf index, the entry, and its leaf hash recomputed from content (hex)."""

    index: int
    entry: AuditEntry
    leaf_hash: str


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """RFC 6962 audit path (hex hashes, leaf upwards) of entry `index` in the tree of `tree_size`."""

    index: int
    tree_size: int
    leaf_hash: str
    path: list[str]


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """RFC 6962 consistency proof (hex hashes) that tree `first` is a prefix of tree `second`."""

    first: int
    second: int
    path: list[str]


# --- reading and verifying what is stored ---------------------------------------------------------


def _read_heads(conn: Connection) -> list[SignedTreeHead]:
    return _read_heads_rows(conn.execute(select(_HEADS).order_by(_HEADS.c.tree_size)).all())


def _next_index(conn: Connection, *, lock: bool = False) -> int:
    """The index the next entry will get (`audit_counter`); with `lock`, its row stays locked until
    the transaction ends (PostgreSQL: `FOR UPDATE`)."""
    query = select(_COUNTER.c.next_seq).where(_COUNTER.c.id == 1)
    return _counted(conn.execute(query.with_for_update() if lock else query).first())


def _counted(found: Any) -> int:
    """The counter value in a fetched row (None: no counter row, which only tampering removes)."""
    if found is None:
        raise AuditIntegrityError("the audit log's counter row is missing", first_bad_index=None)
    return int(found[0])


def _read_heads_rows(rows: Sequence[Any]) -> list[SignedTreeHead]:
    heads = []
    for r in rows:
        try:
            heads.append(
                SignedTreeHead(
                    tree_size=r.tree_size,
                    root_hash=r.root_hash,
                    timestamp=parse_time(r.timestamp),
                    key_id=r.key_id,
                    signature=r.signature,
                )
            )
        except ValidationError as exc:
            raise AuditIntegrityError(
                f"stored tree head of size {r.tree_size} is malformed: {exc.detail}", first_bad_index=None
            ) from exc
    return heads


def _pages(conn: Connection, stop: int | None = None) -> Iterator[list[tuple[int, str, bytes]]]:
    """Stored rows in index order, in pages, as (seq, data, cached leaf hash) straight from the driver:
    verification speed is bounded by row fetching, so SQLAlchemy's row layer is skipped."""
    dbapi = conn.connection.dbapi_connection
    if dbapi is None:
        raise AuditUnavailableError("no database connection")
    ph = "?" if conn.dialect.name == "sqlite" else "%s"
    limit = f" AND seq < {int(stop)}" if stop is not None else ""
    sql = (
        f"SELECT seq, data, leaf_hash FROM audit_entries WHERE seq >= {ph}{limit} "  # noqa: S608
        f"ORDER BY seq LIMIT {_PAGE}"
    )
    cur = dbapi.cursor()
    try:
        start = 0
        while True:
            cur.execute(sql, (start,))
            rows = cur.fetchall()
            if not rows:
                return
            yield cast(list[tuple[int, str, bytes]], rows)
            start = rows[-1][0] + 1
    finally:
        cur.close()


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic collector during a scan: it allocates millions of acyclic tuples, bytes and
    strings, whose allocation counts trigger collections that cost a third of the scan and free nothing."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _scan(
    conn: Connection,
    keys: Mapping[str, str],
    *,
    all_signatures: bool,
    keep_from_level: int | None = None,
) -> tuple[VerifyReport, merkle.Frontier]:
    with _cyclic_gc_paused():
        return _scan_unpaused(conn, keys, all_signatures=all_signatures, keep_from_level=keep_from_level)


def _scan_unpaused(
    conn: Connection,
    keys: Mapping[str, str],
    *,
    all_signatures: bool,
    keep_from_level: int | None = None,
) -> tuple[VerifyReport, merkle.Frontier]:
    """Recompute every leaf from stored content, rebuild the tree, and check it against the stored heads.

    Stops at the first problem. `keys` maps key ids to trusted public keys; with `all_signatures`
    false only the newest head's signature is checked (the open path: older heads are still checked
    against the recomputed roots, which the newest signature vouches for).
    """
    heads = _read_heads(conn)
    frontier = merkle.Frontier(keep_from_level)
    sha = hashlib.sha256
    hi = 0
    checked = 0
    prev_good = 0
    prev_head: SignedTreeHead | None = None
    size = 0

    def fail(index: int | None, reason: str) -> tuple[VerifyReport, merkle.Frontier]:
        return (
            VerifyReport(
                ok=False,
                entries=size,
                heads=checked,
                root_hash=frontier.root().hex(),
                latest_head=heads[-1] if heads else None,
                first_bad_index=index,
                reason=reason,
            ),
            frontier,
        )

    def check_head(h: SignedTreeHead) -> str | None:
        if frontier.root().hex() != h.root_hash:
            return (
                f"entries {prev_good}..{h.tree_size - 1} do not match the root signed in the tree "
                f"head of size {h.tree_size} (an entry in that range was edited, reordered, "
                f"inserted or removed)"
            )
        if prev_head is not None and h.timestamp < prev_head.timestamp:
            return f"tree head of size {h.tree_size} is dated before the head of size {prev_head.tree_size}"
        if all_signatures or h is heads[-1]:
            key = keys.get(h.key_id)
            if key is None:
                return f"tree head of size {h.tree_size} is signed by key {h.key_id!r}, which is not trusted"
            if not h.verify(key):
                return f"signature of the tree head of size {h.tree_size} does not verify"
        return None

    while hi < len(heads) and heads[hi].tree_size == 0:
        if (bad := check_head(heads[hi])) is not None:
            return fail(0, bad)
        prev_head, checked, hi = heads[hi], checked + 1, hi + 1

    for page in _pages(conn):
        first_seq, last_seq = page[0][0], page[-1][0]
        if first_seq != size or last_seq != size + len(page) - 1:
            i = next(i for i, row in enumerate(page) if row[0] != size + i)
            return fail(size + i, f"entry {size + i} is missing (the next stored index is {page[i][0]})")
        _, datas, cached = zip(*page, strict=True)  # transposed in C: cheaper than three passes
        leaves = [sha(b"\x00" + d.encode()).digest() for d in datas]
        i = -1
        if leaves != list(cached):
            i = next(j for j, (a, b) in enumerate(zip(leaves, cached, strict=True)) if a != bytes(b))
        pos = 0
        n = len(leaves)
        while hi < len(heads) and heads[hi].tree_size <= size + n:
            h = heads[hi]
            cut = h.tree_size - size
            if 0 <= i < cut:
                break  # the pinpointed leaf comes before this head: report it below
            frontier.extend(leaves[pos:cut])
            pos = cut
            if (bad := check_head(h)) is not None:
                return fail(prev_good, bad)
            prev_good, prev_head, checked, hi = h.tree_size, h, checked + 1, hi + 1
        if i >= 0:
            frontier.extend(leaves[pos:i])
            size += i
            return fail(
                size,
                f"entry {size} does not hash to its stored leaf hash: the entry or its "
                f"leaf_hash was changed after it was appended",
            )
        frontier.extend(leaves[pos:])
        size += n
    if hi < len(heads):
        return fail(
            size,
            f"the tree head of size {heads[hi].tree_size} covers entries up to "
            f"{heads[hi].tree_size - 1} but only {size} are stored: entries from {size} on "
            f"were deleted",
        )
    latest = heads[-1] if heads else None
    report = VerifyReport(
        ok=True,
        entries=size,
        heads=checked,
        root_hash=frontier.root().hex(),
        latest_head=latest,
        unsigned_entries=size - (latest.tree_size if latest else 0),
    )
    return report, frontier


def verify_database(db: Database, trusted_keys: Mapping[str, str]) -> VerifyReport:
    """Verify the audit log stored in `db` without opening it for writing (a regulator's check).

    `trusted_keys` maps key id to public key (URL-safe base64); a head signed by any other key fails.
    """
    with db.engine.connect() as conn:
        report, _ = _scan(conn, trusted_keys, all_signatures=True)
    return report


def _export_lines(conn: Connection, stop: int) -> Iterator[bytes]:
    for page in _pages(conn, stop):
        for seq, data, cached in page:
            # Canonical (sorted keys, no spaces): verification refuses any other spelling of a line.
            yield f'{{"entry":{data},"index":{seq},"leaf_hash":"{bytes(cached).hex()}"}}\n'.encode()


def export_database(
    db: Database, out: Path, head: SignedTreeHead | None = None, public_key: tuple[str, str] | None = None
) -> SignedTreeHead:
    """Write an export directory: `entries.jsonl`, `tree-head.json`, `public-key.json` (see ADR 0003).

    Without `head`, the newest stored signed head is used and entries up to its size are written;
    without `public_key` (key_id, key) the stored key for the head's key id is written. The exported
    key is a convenience: verifiers should take the key from a trusted source.
    """
    with db.engine.connect() as conn:
        if head is None:
            heads = _read_heads(conn)
            if not heads:
                raise ValidationError("the audit log has no signed tree head to export")
            head = heads[-1]
        if public_key is None:
            row = conn.execute(select(_KEYS).where(_KEYS.c.key_id == head.key_id)).first()
            if row is None:
                raise ValidationError(f"no public key stored for key id {head.key_id!r}")
            public_key = (row.key_id, row.public_key)
        out.mkdir(parents=True, exist_ok=True)
        written = 0
        with (out / "entries.jsonl").open("wb") as f:
            for line in _export_lines(conn, head.tree_size):
                f.write(line)
                written += 1
    if written != head.tree_size:
        raise AuditIntegrityError(
            f"the tree head covers {head.tree_size} entries but only {written} are stored"
        )
    (out / "tree-head.json").write_bytes(orjson.dumps(head.to_json(), option=orjson.OPT_INDENT_2))
    key_doc = {"algorithm": "Ed25519", "key_id": public_key[0], "public_key": public_key[1]}
    (out / "public-key.json").write_bytes(orjson.dumps(key_doc, option=orjson.OPT_INDENT_2))
    return head


# --- the service ----------------------------------------------------------------------------------


class _Pending:
    """Entries waiting for a commit. `wake` is a lock held from creation: releasing it wakes the one
    thread waiting for these entries, either because they are committed or to make it the writer."""

    __slots__ = ("datas", "done", "error", "hashes", "start", "wake")

    def __init__(self, datas: list[bytes], hashes: list[bytes]) -> None:
        self.datas = datas
        self.hashes = hashes
        self.start = -1
        self.done = False
        self.error: BaseException | None = None
        self.wake = threading.Lock()
        self.wake.acquire()


class AuditRecorder(Protocol):
    """What a service needs of the audit log: `AuditLog.record`'s signature (tests pass a list's append)."""

    def __call__(
        self,
        actor: str,
        action: str,
        subject: str,
        outcome: Outcome,
        reason: str = "",
        *,
        scenario_id: str | None = None,
        agreement_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> object: ...


def _stamped(
    clock: Clock,
    actor: str,
    action: str,
    subject: str,
    outcome: Outcome | str,
    reason: str,
    scenario_id: str | None = None,
    agreement_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """An entry stamped with `clock` now: the one shape `record`, `record_many` and `AuditBatch` build."""
    return AuditEntry(
        time=clock.now(),
        actor=actor,
        action=action,
        subject=subject,
        outcome=Outcome(outcome),
        reason=reason,
        scenario_id=scenario_id,
        agreement_id=agreement_id,
        details=details or {},
    )


class AuditBatch:
    """An `AuditRecorder` that holds entries (stamped when recorded) until `flush` appends them together.

    With `append_many` (`AuditLog.append_many`: one transaction, one fsync) the entries of one step
    cost one durable commit instead of one each, all or none; without it they go to `record` one by
    one, in order (tests and tools that pass a plain recorder).
    """

    def __init__(
        self,
        record: AuditRecorder,
        append_many: Callable[[Sequence[AuditEntry]], object] | None,
        clock: Clock,
    ) -> None:
        self._record, self._many, self._clock = record, append_many, clock
        self._entries: list[AuditEntry] = []

    def __call__(
        self,
        actor: str,
        action: str,
        subject: str,
        outcome: Outcome | str,
        reason: str = "",
        *,
        scenario_id: str | None = None,
        agreement_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self._entries.append(
            _stamped(self._clock, actor, action, subject, outcome, reason, scenario_id, agreement_id, details)
        )

    def flush(self) -> None:
        """Append every held entry now; raises if the log refuses (then nothing of them is appended
        with `append_many`)."""
        entries, self._entries = self._entries, []
        if not entries:
            return
        if self._many is not None:
            self._many(entries)
            return
        for e in entries:
            self._record(
                e.actor,
                e.action,
                e.subject,
                e.outcome,
                e.reason,
                scenario_id=e.scenario_id,
                agreement_id=e.agreement_id,
                details=e.details,
            )


class AuditLog:
    """The append-only audit log of one service, over the `audit` tables of `db`.

    Contract: `append` returns only after its entry is committed (on SQLite with synchronous=FULL);
    indexes are gap-free and in commit order, whichever log (process) appends; a failed commit
    appends nothing and raises; nothing updates or deletes a stored row. Opening verifies the stored
    log (content against every stored head, the newest head's signature, and that the stored entries
    are exactly those the counter numbered) and raises `AuditIntegrityError` when it does not verify,
    so a service never signs on top of a tampered history. Heads signed by earlier keys verify only if
    their keys are in `trusted_keys`.
    """

    def __init__(
        self,
        db: Database,
        signer: Signer,
        clock: Clock | None = None,
        trusted_keys: Mapping[str, str] | None = None,
    ) -> None:
        self._db = db
        self._signer = signer
        self._clock: Clock = clock or SystemClock()
        self._keys = {**(trusted_keys or {}), signer.key_id: signer.public_key_b64}
        self._sqlite = db.dialect == "sqlite"
        self._ph = "?" if self._sqlite else "%s"
        ph = self._ph
        self._insert_sql = f"INSERT INTO audit_entries (seq, data, leaf_hash) VALUES ({ph}, {ph}, {ph})"  # noqa: S608
        self._values_sql: dict[int, str] = {}  # multi-row INSERTs by number of rows
        # Rows one INSERT may carry (3 parameters each); larger batches take a transaction. Set
        # from the driver when the writer connection opens (`_writer`).
        self.max_rows_per_statement = _PG_MAX_PARAMS // 3
        dbapi_module = db.engine.dialect.loaded_dbapi
        self._driver_errors: tuple[type[BaseException], ...] = (dbapi_module.Error,)
        self._lock = threading.Lock()
        self._head_lock = threading.Lock()
        # Extends the frontier: with this log's own batches, or with entries read back from the
        # database (`_catch_up`), whichever comes first; never both for one index.
        self._grow_lock = threading.Lock()
        # This log's own leaves committed past a gap other writers' entries leave in the frontier,
        # by index, until a read-back fills the gap (`_grow`).
        self._ahead: dict[int, bytes] = {}
        self._queue: list[_Pending] = []
        self._writing = False
        self._closed = False
        with db.engine.connect() as conn:
            report, self._frontier = _scan(
                conn, self._keys, all_signatures=False, keep_from_level=_CACHE_LEVEL
            )
            if not report.ok:
                raise AuditIntegrityError(
                    f"the stored audit log does not verify: {report.summary()}",
                    first_bad_index=report.first_bad_index,
                )
            counter = _next_index(conn)
            if counter < report.entries:
                raise AuditIntegrityError(
                    f"the stored audit log does not verify: entry {counter} is in the database but "
                    f"was never numbered by the log's counter (a forged row)",
                    first_bad_index=counter,
                )
            known = conn.execute(select(_KEYS.c.key_id).where(_KEYS.c.key_id == signer.key_id)).first()
        if known is None:
            try:
                with db.engine.begin() as conn:
                    conn.execute(
                        _KEYS.insert().values(key_id=signer.key_id, public_key=signer.public_key_b64)
                    )
            except IntegrityError:
                pass  # another writer with the same key, opening at the same moment, stored it
        self._wconn: PoolProxiedConnection | None = None
        # Entries numbered but not seen by the scan were appended meanwhile by another writer, or
        # deleted: reading them back tells which.
        self._catch_up(counter)

    # -- writing --

    @property
    def size(self) -> int:
        """Size of this log's tree: the committed entries up to the last time it read back other
        writers' entries (`tree_head`, the proofs and `entries` read back first), and its own that
        followed on without a gap."""
        return self._frontier.size

    @property
    def public_key(self) -> tuple[str, str]:
        return self._signer.key_id, self._signer.public_key_b64

    def append(self, entry: AuditEntry) -> Receipt:
        """Append one entry durably; returns its index and leaf hash."""
        return self.append_many([entry])[0]

    def record(
        self,
        actor: str,
        action: str,
        subject: str,
        outcome: Outcome | str,
        reason: str = "",
        *,
        scenario_id: str | None = None,
        agreement_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> Receipt:
        """Append an entry stamped with the log's clock (the usual call from a service)."""
        return self.append(
            _stamped(self._clock, actor, action, subject, outcome, reason, scenario_id, agreement_id, details)
        )

    def record_many(self, entries: Sequence[tuple[str, str, str, Outcome | str, str]]) -> list[Receipt]:
        """`record` for several (actor, action, subject, outcome, reason) at once: one contiguous run
        in one durable commit (`append_many`: all or none). Added so a service that audits several
        things of one step pays one fsync for them, not one each; the log's contract is unchanged."""
        return self.append_many([_stamped(self._clock, *e) for e in entries])

    def append_many(self, entries: Sequence[AuditEntry]) -> list[Receipt]:
        """Append entries as one contiguous run in one transaction (all or none)."""
        if not entries:
            return []
        for e in entries:
            if not isinstance(e, AuditEntry):
                raise ValidationError("only AuditEntry objects can be appended")
        # Encoding and leaf hashing happen before the queue, in the caller's thread.
        datas = [e.canonical_bytes() for e in entries]
        sha = hashlib.sha256
        pending = _Pending(datas, [sha(b"\x00" + d).digest() for d in datas])
        with self._lock:
            if self._closed:
                raise AuditUnavailableError("the audit log is closed")
            self._queue.append(pending)
            leader = not self._writing
            self._writing = True
        if not leader:
            pending.wake.acquire()  # until committed, or until handed the writer's role
        if not pending.done:
            self._write_queued()
        if pending.error is not None:
            if isinstance(pending.error, HealthspaceError):
                raise pending.error
            raise AuditUnavailableError("the audit entry could not be committed") from pending.error
        return [Receipt(pending.start + i, h.hex()) for i, h in enumerate(pending.hashes)]

    def _write_queued(self) -> None:
        """Commit everything queued in one transaction, as this log's one writer (group commit).

        Waiters are woken one by one (no broadcast), and the writer's role passes to the first entry
        queued meanwhile, so batches grow with the number of concurrent callers.
        """
        with self._lock:
            batch, self._queue = self._queue, []
        rows = [(d.decode(), h) for p in batch for d, h in zip(p.datas, p.hashes, strict=True)]
        error: BaseException | None = None
        try:
            start = self._write(rows)
            offset = 0
            for p in batch:
                p.start = start + offset
                offset += len(p.hashes)
            self._grow(start, [h for _, h in rows])
        except BaseException as exc:  # every waiter must learn the outcome, whatever it was
            error = exc
        with self._lock:
            for p in batch:
                p.error = error
                p.done = True
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._writing = False
        # batch[0] is this writer's own entries: a writer is always the head of the queue it takes.
        for p in batch[1:]:
            p.wake.release()
        if successor is not None:
            successor.wake.release()

    def _grow(self, start: int, hashes: list[bytes]) -> None:
        """Extend the tree with committed leaves `start ..`, unless a read-back (`_catch_up`) already
        took them. Where other writers' entries come first, the leaves wait in `_ahead` for the
        next read-back: the tree is read only to sign a head or to prove, so reading back at every
        append would cost a query per append whenever several processes write (about as much CPU
        as the append itself). At most `_MAX_AHEAD` wait; then this append reads back."""
        with self._grow_lock:
            have = self._frontier.size
            if have < start:
                for i, h in enumerate(hashes):
                    self._ahead[start + i] = h
                if len(self._ahead) > _MAX_AHEAD:
                    self._read_back(start)
                return
            if have < start + len(hashes):
                self._frontier.extend(hashes[have - start :])

    def _catch_up(self, upto: int | None = None) -> None:
        """Read back every entry committed before `upto` (default: the counter now) that this log has
        not seen, checking each stored leaf hash against its recomputed content."""
        with self._grow_lock:
            if upto is None:
                with self._db.engine.connect() as conn:
                    upto = _next_index(conn)
            if self._frontier.size < upto:
                self._read_back(upto)

    def _read_back(self, upto: int) -> None:
        start = self._frontier.size
        with self._db.engine.connect() as conn:
            rows = conn.execute(
                select(_ENTRIES.c.seq, _ENTRIES.c.data, _ENTRIES.c.leaf_hash)
                .where(_ENTRIES.c.seq >= start, _ENTRIES.c.seq < upto)
                .order_by(_ENTRIES.c.seq)
            ).all()
        leaves: list[bytes] = []
        for i, (seq, data, cached) in enumerate(rows):
            if seq != start + i:
                break
            # This log's own leaves were hashed when appended; the stored one must still match.
            leaf = self._ahead.pop(seq, None) or merkle.leaf_hash(data.encode())
            if leaf != bytes(cached):
                raise AuditIntegrityError(
                    f"entry {seq} does not hash to its stored leaf hash: the entry or its leaf_hash "
                    f"was changed after it was appended",
                    first_bad_index=seq,
                )
            leaves.append(leaf)
        if len(leaves) != upto - start:
            missing = start + len(leaves)
            raise AuditIntegrityError(
                f"entry {missing} was numbered by the log's counter but is not in the database "
                f"(entries from {missing} on were deleted)",
                first_bad_index=missing,
            )
        self._frontier.extend(leaves)
        follow: list[bytes] = []  # own leaves right after what was read back
        while (upto + len(follow)) in self._ahead:
            follow.append(self._ahead.pop(upto + len(follow)))
        self._frontier.extend(follow)

    def _writer(self) -> PoolProxiedConnection:
        if self._wconn is None:
            conn = self._db.engine.raw_connection()
            dbapi = cast(Any, conn.dbapi_connection)
            if self._sqlite:
                # Durable means committed before append returns, power loss included.
                cur = conn.cursor()
                cur.execute("PRAGMA synchronous=FULL")
                cur.close()
                conn.commit()
                # SQLite's variable limit is a compile-time setting (32,766 by default since 3.32).
                limit = dbapi.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
                self.max_rows_per_statement = min(self.max_rows_per_statement, limit // 3)
            set_autocommit(dbapi, True, sqlite=self._sqlite)  # see `_write`
            self._wconn = conn
        return self._wconn

    def _release_writer(self) -> None:
        """Give the writer connection back to the pool as the pool handed it out (not in autocommit)."""
        conn, self._wconn = self._wconn, None
        if conn is None:
            return
        dbapi = cast(Any, conn.dbapi_connection)
        try:
            if dbapi is not None:
                set_autocommit(dbapi, False, sqlite=self._sqlite)
        finally:
            conn.close()

    def _values(self, n: int) -> str:
        """PostgreSQL: one statement that takes `n` indexes from the counter and inserts the rows
        there; SQLite: the multi-row INSERT of `n` rows at given indexes (see `_write`)."""
        sql = self._values_sql.get(n)
        if sql is None:
            ph = self._ph
            if self._sqlite:
                rows = ", ".join([f"({ph}, {ph}, {ph})"] * n)
                sql = f"INSERT INTO audit_entries (seq, data, leaf_hash) VALUES {rows}"  # noqa: S608
            else:
                rows = ", ".join(f"({i}, %s::text, %s::bytea)" for i in range(n))
                sql = (
                    f"WITH c AS (UPDATE audit_counter SET next_seq = next_seq + {n} WHERE id = 1 "  # noqa: S608
                    f"RETURNING next_seq - {n} AS base) "
                    f"INSERT INTO audit_entries (seq, data, leaf_hash) "
                    f"SELECT c.base + v.i, v.d, v.h FROM c CROSS JOIN (VALUES {rows}) AS v (i, d, h) "
                    f"RETURNING seq"
                )
            if len(self._values_sql) < 64:  # group-commit batches are small: keep the usual sizes
                self._values_sql[n] = sql
        return sql

    def _write(self, rows: list[tuple[str, bytes]]) -> int:
        """Commit `rows` (data, leaf hash) at the next indexes of the counter; returns the first.

        The driver directly, on a connection kept for writing: at one row per transaction,
        SQLAlchemy's statement and transaction layers cost as much as the insert itself.

        The counter row is what orders writers (several processes may append): it is advanced in
        the transaction that inserts the rows, and its row lock (PostgreSQL) or the database's write
        lock (SQLite, `BEGIN IMMEDIATE`) is held until that commits, so indexes follow commit order
        and a failed commit takes nothing. On PostgreSQL a batch that fits one statement is ONE
        statement on an autocommit connection (a data-modifying CTE: advance the counter, insert
        the rows numbered from it): a transaction of its own, all rows or none, one round trip.
        A batch beyond the driver's parameter limit, and every batch on SQLite, is an explicit
        transaction (on SQLite, with synchronous=FULL: durable at commit).
        """
        conn = self._writer()
        n = len(rows)
        failures: tuple[type[BaseException], ...] = (*self._driver_errors, AuditIntegrityError)
        try:
            with self._db.write_lock:
                cur = conn.cursor()
                try:
                    if not self._sqlite and n <= self.max_rows_per_statement:
                        cur.execute(self._values(n), [v for row in rows for v in row])
                        seqs = [r[0] for r in cur.fetchall()]
                        return _counted(None if len(seqs) != n else (min(seqs),))
                    cur.execute("BEGIN IMMEDIATE" if self._sqlite else "BEGIN")
                    ph = self._ph
                    if self._sqlite:
                        # The write lock is held from BEGIN IMMEDIATE: nobody moves the counter
                        # between this read and the update below.
                        cur.execute("SELECT next_seq FROM audit_counter WHERE id = 1")
                        start = _counted(cur.fetchone())
                        cur.execute(f"UPDATE audit_counter SET next_seq = {ph} WHERE id = 1", (start + n,))  # noqa: S608
                    else:
                        cur.execute(
                            f"UPDATE audit_counter SET next_seq = next_seq + {ph} WHERE id = 1 "  # noqa: S608
                            f"RETURNING next_seq - {ph}",
                            (n, n),
                        )
                        start = _counted(cur.fetchone())
                    numbered = [(start + i, d, h) for i, (d, h) in enumerate(rows)]
                    if self._sqlite and n <= self.max_rows_per_statement:
                        cur.execute(self._values(n), [v for row in numbered for v in row])
                    else:
                        cur.executemany(self._insert_sql, numbered)
                    cur.execute("COMMIT")
                    return start
                finally:
                    cur.close()
        except failures as exc:
            try:
                conn.rollback()  # an explicit transaction left open; nothing to undo after one statement
            finally:
                conn.invalidate()
                self._wconn = None
            # A clash on the primary key means a row sits at an index the counter had not reached.
            with self._db.engine.connect() as c:
                taken = c.execute(
                    text(
                        "SELECT count(*) FROM audit_entries WHERE seq >= (SELECT next_seq FROM audit_counter)"
                    )
                ).scalar_one()
            if taken:
                raise AuditIntegrityError(
                    "an entry already exists in the database at an index the log's counter had "
                    "not reached, so it was never appended by this log or any other (a forged "
                    "row); appends are refused"
                ) from exc
            raise

    # -- tree heads --

    def tree_head(self) -> SignedTreeHead:
        """The signed head of the current tree. A new head is signed and stored only when the tree
        has grown since the newest stored head (whoever stored it); otherwise that head is returned.

        Signed while holding the counter (its row lock, or SQLite's write lock), so the head covers
        exactly the entries committed so far, by any writer, and is dated no earlier than the newest
        stored head: heads of several writers never go back in time."""
        with self._head_lock, self._db.write_lock, self._db.engine.connect() as conn:
            if self._sqlite:
                set_autocommit(conn.connection.dbapi_connection, True, sqlite=True)
                try:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                    try:
                        head = self._sign_head(conn)
                        conn.exec_driver_sql("COMMIT")
                    except BaseException:
                        conn.exec_driver_sql("ROLLBACK")
                        raise
                finally:
                    set_autocommit(conn.connection.dbapi_connection, False, sqlite=True)
                return head
            with conn.begin():
                return self._sign_head(conn, lock=True)

    def _sign_head(self, conn: Connection, *, lock: bool = False) -> SignedTreeHead:
        size = _next_index(conn, lock=lock)
        self._catch_up(size)
        with self._grow_lock:
            if self._frontier.size != size:  # cannot be: nothing commits past the counter we hold
                raise AuditIntegrityError(f"the log holds {self._frontier.size} entries, the counter {size}")
            root = self._frontier.root()
        latest = conn.execute(select(_HEADS).order_by(_HEADS.c.tree_size.desc()).limit(1)).first()
        if latest is not None and latest.tree_size == size:
            # One head per size; after a key change the new key signs on growth.
            return _read_heads_rows([latest])[0]
        now = self._clock.now()
        if latest is not None:
            now = max(now, parse_time(latest.timestamp))  # heads must never go back in time
        head = SignedTreeHead.sign(self._signer, size, root, now)
        conn.execute(
            _HEADS.insert().values(
                tree_size=head.tree_size,
                root_hash=head.root_hash,
                timestamp=format_time(head.timestamp),
                key_id=head.key_id,
                signature=head.signature,
            )
        )
        return head

    def tree_heads(self) -> list[SignedTreeHead]:
        """Every stored signed head, smallest tree first."""
        with self._db.engine.connect() as conn:
            return _read_heads(conn)

    # -- reading and proofs --

    def entries(self, start: int, stop: int) -> list[LoggedEntry]:
        """Entries with start <= index < stop (stop is clipped to the log size)."""
        if start < 0 or stop < start:
            raise ValidationError("entries need 0 <= start <= stop")
        self._catch_up()
        stop = min(stop, self.size)
        if start >= stop:
            return []
        with self._db.engine.connect() as conn:
            rows = conn.execute(
                select(_ENTRIES.c.seq, _ENTRIES.c.data)
                .where(_ENTRIES.c.seq >= start, _ENTRIES.c.seq < stop)
                .order_by(_ENTRIES.c.seq)
            ).all()
        out: list[LoggedEntry] = []
        for i, (seq, data) in enumerate(rows):
            if seq != start + i:
                raise AuditIntegrityError(f"entry {start + i} is missing from the database")
            raw = data.encode()
            try:
                entry = AuditEntry.from_bytes(raw)
            except ValidationError as exc:
                raise AuditIntegrityError(f"stored entry {seq} is not a valid entry: {exc.detail}") from exc
            out.append(LoggedEntry(seq, entry, merkle.leaf_hash(raw).hex()))
        if len(out) != stop - start:
            raise AuditIntegrityError(f"entries {start + len(out)}..{stop - 1} are missing from the database")
        return out

    def _range_hasher(self, conn: Connection) -> merkle.RangeHasher:
        """MTH of any proof range: complete subtrees of >= 256 leaves from memory, the rest from the
        stored leaf hashes (a cache: a wrong one yields a proof that fails verification, never a false
        one)."""
        nodes = self._frontier.nodes
        blocks: dict[int, list[bytes]] = {}

        def leaves(a: int, b: int) -> list[bytes]:
            out: list[bytes] = []
            for blk in range(a // _BLOCK, (b - 1) // _BLOCK + 1):
                if blk not in blocks:
                    lo = blk * _BLOCK
                    rows = (
                        conn.execute(
                            select(_ENTRIES.c.leaf_hash)
                            .where(_ENTRIES.c.seq >= lo, _ENTRIES.c.seq < lo + _BLOCK)
                            .order_by(_ENTRIES.c.seq)
                        )
                        .scalars()
                        .all()
                    )
                    blocks[blk] = [bytes(h) for h in rows]
                blk_leaves = blocks[blk]
                lo = blk * _BLOCK
                out.extend(blk_leaves[max(a, lo) - lo : min(b, lo + _BLOCK) - lo])
            if len(out) != b - a:
                raise AuditIntegrityError(f"leaf hashes {a}..{b - 1} are missing from the database")
            return out

        def hash_range(a: int, b: int) -> bytes:
            n = b - a
            if n & (n - 1) == 0 and a % n == 0 and n >= _BLOCK:
                level = n.bit_length() - 1
                node = nodes.get((level, a >> level))
                if node is not None:
                    return node
            if n <= _BLOCK:
                return merkle.tree_root(leaves(a, b))
            k = merkle._split(n)
            return merkle.node_hash(hash_range(a, a + k), hash_range(a + k, b))

        return hash_range

    def inclusion_proof(self, index: int, tree_size: int | None = None) -> InclusionProof:
        """Audit path of entry `index` in the tree of `tree_size` entries (default: the current tree)."""
        self._catch_up()
        size = self.size if tree_size is None else tree_size
        if size > self.size:
            raise ValidationError(f"tree_size {size} exceeds the log size {self.size}")
        if not 0 <= index < size:
            raise ValidationError(f"index {index} is not in a tree of size {size}")
        with self._db.engine.connect() as conn:
            hasher = self._range_hasher(conn)
            path = merkle.inclusion_proof(index, size, hasher)
            data = conn.execute(select(_ENTRIES.c.data).where(_ENTRIES.c.seq == index)).scalar_one_or_none()
        if data is None:
            raise AuditIntegrityError(f"entry {index} is missing from the database")
        return InclusionProof(index, size, merkle.leaf_hash(data.encode()).hex(), [p.hex() for p in path])

    def consistency_proof(self, first: int, second: int | None = None) -> ConsistencyProof:
        """Proof that the tree of `first` entries is a prefix of the tree of `second` (default: current)."""
        self._catch_up()
        second = self.size if second is None else second
        if second > self.size:
            raise ValidationError(f"second {second} exceeds the log size {self.size}")
        if not 0 < first <= second:
            raise ValidationError(f"consistency needs 0 < first <= second, got {first} and {second}")
        with self._db.engine.connect() as conn:
            path = merkle.consistency_proof(first, second, self._range_hasher(conn))
        return ConsistencyProof(first, second, [p.hex() for p in path])

    def root_at(self, tree_size: int) -> bytes:
        """MTH of the first `tree_size` entries (from cached hashes; for tests and tools)."""
        self._catch_up()
        if not 0 <= tree_size <= self.size:
            raise ValidationError(f"tree_size {tree_size} is outside 0..{self.size}")
        if tree_size == 0:
            return merkle.EMPTY_ROOT
        with self._db.engine.connect() as conn:
            return self._range_hasher(conn)(0, tree_size)

    # -- verification and export --

    def verify(self) -> VerifyReport:
        """Recompute every leaf from stored content, rebuild the tree, check every stored head (root,
        order, signature) and that the database holds exactly the entries the counter numbered."""
        with self._db.engine.connect() as conn:
            # Entries numbered before the scan must all be there; a stored entry at or beyond
            # every index numbered by the end of the scan was never appended through the counter.
            before = _next_index(conn)
            report, _ = _scan(conn, self._keys, all_signatures=True)
            after = _next_index(conn)
        if not report.ok:
            return report
        if report.entries < before:
            return replace(
                report,
                ok=False,
                first_bad_index=report.entries,
                reason=f"{before} entries were appended but only {report.entries} are "
                f"stored: entries from {report.entries} on were deleted",
            )
        if report.entries > after:
            return replace(
                report,
                ok=False,
                first_bad_index=after,
                reason=f"entry {after} is in the database but was never appended by this log "
                f"or any other (a forged row: the log's counter never numbered it)",
            )
        return report

    def export(self, out: Path) -> SignedTreeHead:
        """Sign the current tree head and export every entry it covers to the directory `out`."""
        head = self.tree_head()
        return export_database(self._db, out, head, self.public_key)

    def close(self) -> None:
        """Refuse further appends, let the batch in flight finish, and give the writer connection back."""
        with self._lock:
            self._closed = True
        while True:
            with self._lock:
                if not self._writing:
                    break
            time.sleep(0.001)
        self._release_writer()
