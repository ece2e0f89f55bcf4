"""Persistence of DSP processes: one SQL store whose rows change state only through the DSP machines.

Contract (what MUST fail; `tests/dsp/test_store.py` checks each on SQLite and PostgreSQL):

* creating a negotiation in a state other than REQUESTED or OFFERED, or a transfer in a state other than
  REQUESTED, raises `InvalidTransitionError`;
* creating a second process of the same role with the same counterparty and consumerPid raises
  `ConflictError` (the caller answers the existing one instead: idempotent requests);
* `move_*` to a state the machine does not allow from the current one raises `InvalidTransitionError`
  and leaves the row unchanged; a final state is never left;
* reading an unknown process raises `NotFoundError`;
* an outbox row is handed to one worker at a time: `claim_outbox` leases rows, and a leased row is not
  claimed again until its lease runs out.

The store never commits: the service's `Database.session()` is the transaction. The exceptions are
the outbox's one-statement writes (lease, release, settle), which commit by themselves and, on
PostgreSQL, without waiting for the WAL flush (`Database.writing_statement(durable=False)`): a crash
of PostgreSQL that loses one leaves a message to be sent again, and the manager counts a repeat the
peer already took as delivered (`DspManager._peer_already_there`). The next handler commit on the
database flushes them anyway.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import orjson
from sqlalchemy import (
    CursorResult,
    Insert,
    Select,
    Table,
    Update,
    bindparam,
    case,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from healthspace.connector.dsp.tables import (
    AgreementRow,
    DatasetRow,
    NegotiationRow,
    OutboxRow,
    TransferRow,
)
from healthspace.core.db import Database
from healthspace.core.errors import ConflictError, InvalidTransitionError, NotFoundError
from healthspace.protocol.states import NEGOTIATION, TRANSFER, NegotiationState, TransferState

__all__ = ["DspStore", "Outgoing", "restore", "snapshot"]

_NEGOTIATION_INITIAL = frozenset({NegotiationState.REQUESTED, NegotiationState.OFFERED})
_OUTBOX = cast(Table, OutboxRow.__table__)
_DATASETS = cast(Table, DatasetRow.__table__)
_P = TypeVar("_P", NegotiationRow, TransferRow)
_MISSING = object()
_PROCESS_TABLES = {
    "negotiation": cast(Table, NegotiationRow.__table__),
    "transfer": cast(Table, TransferRow.__table__),
}
_OUTGOING = ("seq", "process_id", "kind", "peer_id", "url", "message_type", "body", "attempts")


# Hot statements built once with bound parameters: building a statement and its cache key on every
# call costs more than running it on SQLite.
def _by_id(t: Table, *, lock: bool) -> Select[Any]:
    q = select(t).where(t.c.id == bindparam("pid"))
    return q.with_for_update() if lock else q


def _by_consumer_pid(t: Table) -> Select[Any]:
    return select(t).where(
        t.c.role == bindparam("role"),
        t.c.counterparty_id == bindparam("counterparty"),
        t.c.consumer_pid == bindparam("consumer_pid"),
    )


_FETCH = {(t, lock): _by_id(t, lock=lock) for t in _PROCESS_TABLES.values() for lock in (False, True)}
_BY_CONSUMER_PID = {t: _by_consumer_pid(t) for t in _PROCESS_TABLES.values()}
_DATASET = select(_DATASETS).where(_DATASETS.c.id == bindparam("pid"))
_SETTLE = update(_OUTBOX).where(_OUTBOX.c.seq == bindparam("b_seq"))
_INSERTS = {t: t.insert() for t in (*_PROCESS_TABLES.values(), _OUTBOX, cast(Table, AgreementRow.__table__))}


def _enqueue_leased() -> Insert:
    """An outbox insert that leases the new message to the worker at hand unless an earlier message of
    the process is still pending (then it waits its turn, unleased): the check and the insert in one
    statement, one round trip instead of two."""
    t = _OUTBOX
    # Parameters named apart from the columns (SQLAlchemy reserves those names for VALUES).
    earlier = exists().where(t.c.process_id == bindparam("b_pid"), t.c.status == "pending")
    until = bindparam("b_until", type_=t.c.lease_until.type)
    return (
        t.insert()
        .values(
            lease_until=case((earlier, null()), else_=until),
            attempts=case((earlier, literal(0)), else_=literal(1)),
        )
        .returning(t.c.seq, t.c.attempts)
    )


_ENQUEUE_LEASED = _enqueue_leased()


# The SET clause comes from the parameters' names (compiled once per set of changed columns).
_UPDATES = {t: update(t).where(t.c.id == bindparam("b_id")) for t in _PROCESS_TABLES.values()}


def _claim_next() -> Update:
    t = _OUTBOX
    now, until = bindparam("now", type_=t.c.next_at.type), bindparam("until", type_=t.c.next_at.type)
    oldest = (
        select(func.min(t.c.seq))
        .where(t.c.process_id == bindparam("pid"), t.c.status == "pending")
        .scalar_subquery()
    )
    return (
        update(t)
        .where(
            t.c.seq == oldest,
            # Repeated here: PostgreSQL re-checks only these conditions on a row that another
            # worker settled while we waited for its lock (the subquery keeps its old answer).
            t.c.status == "pending",
            t.c.next_at <= now,
            or_(t.c.lease_until.is_(None), t.c.lease_until < now),
        )
        .values(lease_until=until, attempts=t.c.attempts + 1)
        .returning(*(t.c[name] for name in _OUTGOING))
    )


_CLAIM_NEXT = _claim_next()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A leased outbox message as the deliverer needs it (a plain value: no session behind it)."""

    seq: int
    process_id: str
    kind: str
    peer_id: str
    url: str
    message_type: str
    body: str
    attempts: int

    @classmethod
    def of(cls, row: OutboxRow) -> Outgoing:
        return cls(
            row.seq, row.process_id, row.kind, row.peer_id, row.url, row.message_type, row.body, row.attempts
        )


_DATASET_CACHE_SIZE = 1024


class DspStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        # Committed dataset rows by id. Datasets are never changed in place nor deleted, so a row
        # once committed stays as read: every negotiation request reads its dataset, and this saves
        # that statement. Only rows other transactions committed are kept (`put_dataset` marks the
        # session that inserts one: a row read there could still roll back).
        self._datasets: dict[str, dict[str, Any]] = {}
        self._datasets_lock = threading.Lock()

    def writing(self) -> AbstractContextManager[Session]:
        """A write transaction (see `Database.write_lock`)."""
        return self.db.writing()

    # --- datasets ------------------------------------------------------------------------------------

    def put_dataset(self, s: Session, row: DatasetRow) -> None:
        if s.get(DatasetRow, row.id) is not None:
            raise ConflictError(f"dataset {row.id!r} already exists")
        s.info["dsp_dataset_written"] = True
        s.add(row)
        s.flush()

    def dataset(self, s: Session, dataset_id: str) -> DatasetRow:
        """The dataset as a detached row of its own (datasets are never changed in place)."""
        values = self._datasets.get(dataset_id)
        if values is None:
            r = s.connection().execute(_DATASET, {"pid": dataset_id}).mappings().first()
            if r is None:
                raise NotFoundError(f"no dataset {dataset_id!r}")
            values = {k: _frozen(v) for k, v in r.items()}
            if not s.info.get("dsp_dataset_written"):
                with self._datasets_lock:
                    if len(self._datasets) >= _DATASET_CACHE_SIZE:
                        self._datasets.clear()
                    self._datasets[dataset_id] = values
        # A copy each time: callers may change the row's JSON members; the cache must not see that.
        return DatasetRow(**_thawed(values))

    def datasets(self, s: Session) -> Sequence[DatasetRow]:
        return s.scalars(select(DatasetRow).order_by(DatasetRow.created_at, DatasetRow.id)).all()

    # --- negotiations --------------------------------------------------------------------------------

    def create_negotiation(self, s: Session, row: NegotiationRow, *, insert: bool = True) -> NegotiationRow:
        """Check the first state and insert. `insert=False` only checks: the caller inserts the row
        later in the same transaction (`insert_negotiation`), with what the transaction made of it."""
        if NegotiationState(row.state) not in _NEGOTIATION_INITIAL:
            raise InvalidTransitionError(f"a negotiation cannot begin in {row.state}")
        if insert:
            self.insert_negotiation(s, row)
        return row

    @staticmethod
    def insert_negotiation(s: Session, row: NegotiationRow) -> None:
        """Insert a negotiation checked by `create_negotiation`, in whatever state it is now."""
        _insert(s, row, f"negotiation with consumerPid {row.consumer_pid!r}")

    def negotiation(self, s: Session, pid: str, *, lock: bool = False) -> NegotiationRow:
        q = select(NegotiationRow).where(NegotiationRow.id == pid)
        row = s.scalars(q.with_for_update() if lock else q).one_or_none()
        if row is None:
            raise NotFoundError(f"no contract negotiation {pid!r}")
        return row

    def negotiation_by_consumer_pid(
        self, s: Session, role: str, counterparty: str, consumer_pid: str
    ) -> NegotiationRow | None:
        """The process (detached) a peer named by its consumerPid, if there is one."""
        return _by_peer(s, NegotiationRow, role, counterparty, consumer_pid)

    def negotiations(self, s: Session, limit: int = 100, offset: int = 0) -> Sequence[NegotiationRow]:
        q = select(NegotiationRow).order_by(NegotiationRow.created_at.desc(), NegotiationRow.id)
        return s.scalars(q.offset(offset).limit(limit)).all()

    def move_negotiation(
        self, row: NegotiationRow, target: NegotiationState, now: datetime, reason: str | None = None
    ) -> None:
        NEGOTIATION.transition(NegotiationState(row.state), target)
        row.state = target.value
        row.updated_at = now
        if NEGOTIATION.is_final(target):
            row.pending = None
            row.terminal_reason = reason

    # --- processes without the ORM: what the service's hot paths use ---------------------------------
    # A process row is read into a detached `NegotiationRow`/`TransferRow` (no session keeps it) and
    # its changes are written back by `save` as one UPDATE of the columns that changed: per
    # statement, the ORM's identity map, flush and unit of work cost several times the SQL itself.

    def fetch(self, s: Session, cls: type[_P], pid: str, *, lock: bool = False) -> _P:
        """A process by id, detached; `lock` takes the row lock (PostgreSQL) until the transaction ends."""
        t = cast(Table, cls.__table__)
        r = s.connection().execute(_FETCH[t, lock], {"pid": pid}).mappings().first()
        if r is None:
            what = "contract negotiation" if cls is NegotiationRow else "transfer process"
            raise NotFoundError(f"no {what} {pid!r}")
        return cls(**r)

    @staticmethod
    def save(s: Session, row: NegotiationRow | TransferRow, before: dict[str, Any]) -> dict[str, Any]:
        """Write the columns of a detached process row that differ from `before` (its `snapshot` as
        read or last saved); returns the snapshot of those columns (empty: nothing written)."""
        now = snapshot(row)
        changed = {k: v for k, v in now.items() if before.get(k, _MISSING) != v}
        if changed:
            t = cast(Table, type(row).__table__)
            s.connection().execute(_UPDATES[t], {**{k: getattr(row, k) for k in changed}, "b_id": row.id})
        return changed

    # --- agreements ----------------------------------------------------------------------------------

    def add_agreement(self, s: Session, row: AgreementRow) -> None:
        _insert(s, row, f"agreement {row.id!r}")

    def agreement(self, s: Session, agreement_id: str) -> AgreementRow:
        row = s.get(AgreementRow, agreement_id)
        if row is None:
            raise NotFoundError(f"no agreement {agreement_id!r}")
        return row

    def agreements(self, s: Session) -> Sequence[AgreementRow]:
        return s.scalars(select(AgreementRow).order_by(AgreementRow.signed_at.desc())).all()

    # --- transfers -----------------------------------------------------------------------------------

    def create_transfer(self, s: Session, row: TransferRow) -> TransferRow:
        if TransferState(row.state) is not TransferState.REQUESTED:
            raise InvalidTransitionError(f"a transfer cannot begin in {row.state}")
        _insert(s, row, f"transfer with consumerPid {row.consumer_pid!r}")
        return row

    def transfer(self, s: Session, pid: str, *, lock: bool = False) -> TransferRow:
        q = select(TransferRow).where(TransferRow.id == pid)
        row = s.scalars(q.with_for_update() if lock else q).one_or_none()
        if row is None:
            raise NotFoundError(f"no transfer process {pid!r}")
        return row

    def transfer_by_consumer_pid(
        self, s: Session, role: str, counterparty: str, consumer_pid: str
    ) -> TransferRow | None:
        """The process (detached) a peer named by its consumerPid, if there is one."""
        return _by_peer(s, TransferRow, role, counterparty, consumer_pid)

    def transfers(self, s: Session, limit: int = 100, offset: int = 0) -> Sequence[TransferRow]:
        q = select(TransferRow).order_by(TransferRow.created_at.desc(), TransferRow.id)
        return s.scalars(q.offset(offset).limit(limit)).all()

    def move_transfer(
        self, row: TransferRow, target: TransferState, now: datetime, reason: str | None = None
    ) -> None:
        TRANSFER.transition(TransferState(row.state), target)
        row.state = target.value
        row.updated_at = now
        if TRANSFER.is_final(target):
            row.pending = None
            row.terminal_reason = reason

    # --- work owed -----------------------------------------------------------------------------------

    def pending_ids(self, s: Session, limit: int = 50) -> list[tuple[str, str]]:
        """(kind, id) of processes on which this side owes an action, oldest first."""
        neg = s.execute(
            select(NegotiationRow.id)
            .where(NegotiationRow.pending.is_not(None))
            .order_by(NegotiationRow.updated_at)
            .limit(limit)
        ).scalars()
        tra = s.execute(
            select(TransferRow.id)
            .where(TransferRow.pending.is_not(None))
            .order_by(TransferRow.updated_at)
            .limit(limit)
        ).scalars()
        return [("negotiation", i) for i in neg] + [("transfer", i) for i in tra]

    def enqueue(
        self,
        s: Session,
        *,
        process_id: str,
        kind: str,
        peer_id: str,
        url: str,
        message_type: str,
        body: bytes,
        now: datetime,
        lease_until: datetime | None = None,
    ) -> Outgoing:
        """Queue a message. With `lease_until` it is leased to the worker that will send it, unless
        an earlier message of the process is still pending: then it waits its turn unleased (a
        process's messages leave in order). The returned `attempts` says which (1 leased, 0 not)."""
        text = body.decode()
        values = {
            "process_id": process_id,
            "kind": kind,
            "peer_id": peer_id,
            "url": url,
            "message_type": message_type,
            "body": text,
            "status": "pending",
            "next_at": now,
            "last_error": None,
            "created_at": now,
        }
        if lease_until is None:
            result = s.connection().execute(_INSERTS[_OUTBOX], {**values, "attempts": 0, "lease_until": None})
            (seq,) = result.inserted_primary_key or (None,)
            attempts = 0
        else:
            row = s.connection().execute(
                _ENQUEUE_LEASED, {**values, "b_pid": process_id, "b_until": lease_until}
            )
            seq, attempts = row.one()
        if not isinstance(seq, int):
            raise RuntimeError("the outbox insert returned no sequence number")
        return Outgoing(seq, process_id, kind, peer_id, url, message_type, text, attempts)

    def claim_outbox(self, now: datetime, lease: timedelta, limit: int = 20) -> list[OutboxRow]:
        """Lease due messages, at most one per process (the oldest), so a process's messages stay in order.

        On PostgreSQL rows are selected `FOR UPDATE SKIP LOCKED`, so workers sharing a database never
        take the same row; SQLite has one writer at a time, which gives the same guarantee.
        """
        with self.writing() as s:
            q = (
                select(OutboxRow)
                .where(
                    OutboxRow.status == "pending",
                    OutboxRow.next_at <= now,
                    or_(OutboxRow.lease_until.is_(None), OutboxRow.lease_until < now),
                )
                .order_by(OutboxRow.seq)
                .limit(limit * 4)
            )
            if self.db.dialect == "postgresql":
                q = q.with_for_update(skip_locked=True)
            rows = s.scalars(q).all()
            taken: list[OutboxRow] = []
            seen: set[str] = set()
            for row in rows:
                if row.process_id in seen or self._has_earlier_pending(s, row):
                    seen.add(row.process_id)
                    continue
                seen.add(row.process_id)
                row.lease_until = now + lease
                row.attempts += 1
                taken.append(row)
                if len(taken) >= limit:
                    break
            return taken

    def claim_next(self, process_id: str, now: datetime, lease: timedelta) -> Outgoing | None:
        """Lease the oldest pending message of one process if it is due and not leased: one statement.

        The manager's fast path after a hint: the same guarantees as `claim_outbox` (oldest first per
        process, one holder per row: the UPDATE re-checks the lease under the row lock on PostgreSQL,
        and SQLite has one writer), without a scan of the whole outbox. SQL expression language on a
        plain connection: it runs once per message, and an ORM session costs more than the statement.
        """
        with self.db.writing_statement(durable=False) as conn:
            r = conn.execute(_CLAIM_NEXT, {"pid": process_id, "now": now, "until": now + lease}).first()
        return None if r is None else Outgoing(*r)

    @staticmethod
    def _has_earlier_pending(s: Session, row: OutboxRow) -> bool:
        earlier = s.scalars(
            select(OutboxRow.seq)
            .where(
                OutboxRow.process_id == row.process_id,
                OutboxRow.status == "pending",
                OutboxRow.seq < row.seq,
            )
            .limit(1)
        ).first()
        return earlier is not None

    def settle_outbox(self, seq: int, *, sent: bool, error: str | None, retry_at: datetime | None) -> None:
        """Mark a leased message sent, schedule a retry (`retry_at`), or give up (no `retry_at`)."""
        values: dict[str, Any] = {"lease_until": None, "last_error": error}
        if sent:
            values["status"] = "sent"
        elif retry_at is not None:
            values["next_at"] = retry_at
        else:
            values["status"] = "dead"
        with self.db.writing_statement(durable=False) as conn:
            result = cast(CursorResult[Any], conn.execute(_SETTLE, {**values, "b_seq": seq}))
            if result.rowcount != 1:
                raise NotFoundError(f"no outbox message {seq}")

    @staticmethod
    def settle_answered(s: Session, process_id: str, message_types: tuple[str, ...]) -> None:
        """Mark sent, in the caller's transaction, the pending messages of these types of a process
        that the peer has evidently received, because it answered them (a consumer's initial request
        once the provider names its pid; a provider's agreement once the consumer verifies it).

        The caller holds the process row's lock; the outbox row comes second, as in
        `settle_delivered`, so there is no lock-order deadlock with the message's deliverer, whose
        settling then changes nothing that matters (a retry or failure it records keeps "sent")."""
        t = _OUTBOX
        s.connection().execute(
            update(t)
            .where(
                t.c.process_id == process_id,
                t.c.status == "pending",
                t.c.message_type.in_(message_types),
            )
            .values(status="sent", lease_until=None)
        )

    def release_lease(self, seq: int) -> None:
        """Give back the lease of a pending message nobody will deliver (a manager stopping)."""
        with self.db.writing_statement(durable=False) as conn:
            conn.execute(
                update(_OUTBOX)
                .where(_OUTBOX.c.seq == seq, _OUTBOX.c.status == "pending")
                .values(lease_until=None)
            )

    def settle_delivered(
        self, seq: int, kind: str, process_id: str, provider_pid: str | None, consumer_pid: str | None
    ) -> str:
        """Mark a leased message sent and fill in the process's missing pids from the peer's
        acknowledgement (a pid already known is kept). Returns the process's state as this leaves it
        (waiters need not read the row to learn it).

        Two statements, each committed by itself (no BEGIN and COMMIT round trips): both are
        idempotent, so a crash between them only leaves the message leased; when the lease runs out
        it is delivered again, the peer answers the repeat with the same process, and this runs
        again. The process row first, then the outbox row, as in a handler's transaction
        (`settle_answered`); here no statement waits for a lock while holding another."""
        t = _PROCESS_TABLES[kind]
        with self.db.writing_statement(durable=False) as conn:
            state = conn.execute(
                update(t)
                .where(t.c.id == process_id)
                .values(
                    provider_pid=func.coalesce(t.c.provider_pid, provider_pid),
                    consumer_pid=func.coalesce(t.c.consumer_pid, consumer_pid),
                )
                .returning(t.c.state)
            ).scalar_one_or_none()
            if state is None:
                what = "contract negotiation" if kind == "negotiation" else "transfer process"
                raise NotFoundError(f"no {what} {process_id!r}")  # the message stays leased
            settled = cast(
                CursorResult[Any],
                conn.execute(
                    _SETTLE, {"lease_until": None, "last_error": None, "status": "sent", "b_seq": seq}
                ),
            )
            if settled.rowcount != 1:
                raise NotFoundError(f"no outbox message {seq}")
        return str(state)

    def process_values(self, kind: str, pid: str) -> dict[str, Any]:
        """A process's columns by name, read on a plain autocommit connection (the read waiters
        repeat; one statement, so no transaction around it)."""
        t = _PROCESS_TABLES[kind]
        with self.db.autocommit() as conn:
            r = conn.execute(_FETCH[t, False], {"pid": pid}).mappings().first()
        if r is None:
            what = "contract negotiation" if kind == "negotiation" else "transfer process"
            raise NotFoundError(f"no {what} {pid!r}")
        return dict(r)

    def outbox(self, s: Session, process_id: str | None = None) -> Sequence[OutboxRow]:
        q = select(OutboxRow).order_by(OutboxRow.seq)
        if process_id is not None:
            q = q.where(OutboxRow.process_id == process_id)
        return s.scalars(q).all()


def _by_peer(s: Session, cls: type[_P], role: str, counterparty: str, consumer_pid: str) -> _P | None:
    t = cast(Table, cls.__table__)
    params = {"role": role, "counterparty": counterparty, "consumer_pid": consumer_pid}
    rows = s.connection().execute(_BY_CONSUMER_PID[t], params).mappings().all()
    if len(rows) > 1:  # the unique constraint makes this impossible; say so rather than pick one
        raise ConflictError(f"{len(rows)} processes with consumerPid {consumer_pid!r}")
    return cls(**rows[0]) if rows else None


class _Frozen:
    """A JSON member as it stood when a snapshot was taken, serialised: a later change in place is
    seen as a change, and `restore` gives the value back. orjson serialises a policy several times
    faster than `copy.deepcopy` copies it (three snapshots per step, on every DSP message)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen) and other.data == self.data

    __hash__ = None  # type: ignore[assignment]  # compared, never hashed

    def thaw(self) -> Any:
        return orjson.loads(self.data)


def _frozen(value: Any) -> Any:
    if not isinstance(value, dict | list):
        return value
    try:
        return _Frozen(orjson.dumps(value))
    except TypeError:  # not plain JSON (a type orjson does not write): compared and restored as a copy
        return copy.deepcopy(value)


def snapshot(row: Any) -> dict[str, Any]:
    """A row's column values, JSON members frozen (`_Frozen`): what `save` compares and `restore` sets."""
    return {c.key: _frozen(getattr(row, c.key)) for c in row.__table__.columns}


def _thawed(values: dict[str, Any]) -> dict[str, Any]:
    """Values of a `snapshot` as a row holds them: frozen JSON members decoded, copies made anew."""
    return {
        k: v.thaw() if isinstance(v, _Frozen) else copy.deepcopy(v) if isinstance(v, dict | list) else v
        for k, v in values.items()
    }


def restore(row: Any, values: dict[str, Any]) -> None:
    """Set a row's columns back to a `snapshot` of it."""
    for key, value in _thawed(values).items():
        setattr(row, key, value)


def _insert(s: Session, row: Any, what: str) -> None:
    """Insert a row's values with one statement; the row object stays detached.

    No savepoint: a clash raises `ConflictError`, which ends the caller's transaction (or the
    savepoint the caller opened); nothing carries on in a transaction after a failed insert."""
    t = cast(Table, type(row).__table__)
    try:
        s.connection().execute(_INSERTS[t], {c.key: getattr(row, c.key) for c in t.columns})
    except IntegrityError as exc:
        raise ConflictError(f"{what} already exists") from exc
