"""DSP use cases of one connector, as provider and as consumer. Owns the transactions; does no peer I/O.

Every change of a process happens in one transaction that also writes the messages it owes its peer
to the outbox (`dsp_outbox`); the manager (`manager.py`) delivers them after commit, so a crash between
the two loses nothing and a process never waits on a peer while holding a database lock. A side that
owes a decision (agree, verify, finalise, start) marks the process `pending`; the manager takes it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import event
from sqlalchemy.orm import Session

from healthspace.audit.models import Outcome
from healthspace.connector.dsp.dataplane import mint_access_token
from healthspace.connector.dsp.store import DspStore, Outgoing, restore, snapshot
from healthspace.connector.dsp.tables import (
    AgreementRow,
    DatasetRow,
    NegotiationRow,
    TransferRow,
)
from healthspace.core.apikeys import Role as StaffRole
from healthspace.core.clock import Clock
from healthspace.core.db import Database
from healthspace.core.errors import (
    ConflictError,
    ForbiddenError,
    HealthspaceError,
    InvalidTransitionError,
    NotFoundError,
    ValidationError,
)
from healthspace.identity.keys import SigningKey
from healthspace.identity.tokens import TokenUse
from healthspace.protocol.messages import (
    Agreement,
    CatalogRequestMessage,
    CatalogResponse,
    ContractAgreementMessage,
    ContractAgreementVerificationMessage,
    ContractNegotiation,
    ContractNegotiationEventMessage,
    ContractNegotiationTerminationMessage,
    ContractOfferMessage,
    ContractRequestMessage,
    DataAddress,
    DataService,
    DatasetResponse,
    DspMessage,
    EndpointProperty,
    Offer,
    TransferCompletionMessage,
    TransferProcess,
    TransferRequestMessage,
    TransferStartMessage,
    TransferSuspensionMessage,
    TransferTerminationMessage,
    agreement_timestamp,
    message_key,
    to_json,
)
from healthspace.protocol.states import (
    NEGOTIATION,
    TRANSFER,
    NegotiationState,
    Role,
    TransferState,
    can_send,
    negotiation_next_state,
    transfer_next_state,
)

__all__ = [
    "AGREEMENT_RETIRED",
    "PULL_FORMAT",
    "AgreementPublic",
    "Approval",
    "DatasetCreate",
    "DatasetPublic",
    "DspRequestRefusedError",
    "DspService",
    "NegotiationPublic",
    "TransferPublic",
    "policy_acceptable",
]

PULL_FORMAT = "HttpData-PULL"
# Termination code of a transfer ended because its agreement was retired; the receiver retires its copy.
AGREEMENT_RETIRED = "agreement-retired"
ENDPOINT_TYPE = "https://w3id.org/idsa/v4.1/HTTP"
_N, _T = NegotiationState, TransferState
_P, _C = Role.PROVIDER, Role.CONSUMER


class Approval(StrEnum):
    """How a provider decides requests for a dataset.

    auto: agree when the requested policy is acceptable, else terminate; finalise on verification.
    manual: a steward approves or rejects each request; the rest of the protocol runs by itself.
    stepwise: the connector takes no step by itself; a steward sends every message (operators, TCK).
    """

    AUTO = "auto"
    MANUAL = "manual"
    STEPWISE = "stepwise"


class DspRequestRefusedError(HealthspaceError):
    """A well-formed DSP message the provider refuses (unknown target, no valid agreement, ...)."""

    status = 400
    code = "dsp-request-refused"
    title = "The DSP request is refused"


# --- public models (management API) ----------------------------------------------------------------


class DatasetCreate(BaseModel):
    id: str = Field(min_length=1, max_length=200, description="Dataset id, e.g. a URN")
    title: str = Field(min_length=1, max_length=300)
    description: str = ""
    keywords: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict, description="Further DCAT members")
    offer: dict[str, Any] = Field(description="ODRL offer policy (DSP Offer JSON; `@id` required)")
    approval: Approval = Approval.AUTO


class DatasetPublic(DatasetCreate):
    created_at: datetime


class NegotiationPublic(BaseModel):
    id: str
    role: Role
    state: NegotiationState
    provider_pid: str | None
    consumer_pid: str | None
    counterparty_id: str
    counterparty_address: str
    dataset_id: str | None
    offer: dict[str, Any]
    agreement_id: str | None
    auto: bool
    pending: str | None
    terminal_reason: str | None
    created_at: datetime
    updated_at: datetime


class AgreementPublic(BaseModel):
    id: str
    negotiation_id: str
    role: Role
    provider_id: str
    consumer_id: str
    dataset_id: str
    policy: dict[str, Any]
    signed_at: datetime
    retired_at: datetime | None
    retired_reason: str | None


class TransferPublic(BaseModel):
    id: str
    role: Role
    state: TransferState
    provider_pid: str | None
    consumer_pid: str | None
    counterparty_id: str
    agreement_id: str
    format: str
    data_address: dict[str, Any] | None
    auto: bool
    pending: str | None
    terminal_reason: str | None
    created_at: datetime
    updated_at: datetime


# --- policy ------------------------------------------------------------------------------------------

_RULE_KEYS = ("permission", "prohibition", "obligation", "profile")


def _rules(policy: Mapping[str, Any]) -> dict[str, Any]:
    return {k: policy[k] for k in _RULE_KEYS if policy.get(k) is not None}


def policy_acceptable(requested: Mapping[str, Any], offered: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether a requested policy may be agreed for an offer: the same rules, or at least as restrictive.

    Uses `healthspace.policy.restrict` when importable; any failure there counts as "not acceptable".
    """
    if _rules(requested) == _rules(offered):
        return True, []
    try:
        from healthspace.policy.restrict import is_at_least_as_restrictive
    except ImportError:  # pragma: no cover - the policy package ships with the connector
        return False, ["policies differ and no restriction checker is installed"]
    try:
        decision = is_at_least_as_restrictive(dict(requested), dict(offered))
    except Exception as exc:  # fail closed: a checker fault never agrees to anything
        return False, [f"policy check failed: {type(exc).__name__}"]
    return decision.allowed, list(decision.reasons)


# --- the service -------------------------------------------------------------------------------------


def new_pid() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


# The first message of a consumer's process: pending only until the provider's pid is known.
_INITIAL_REQUESTS = ("ContractRequestMessage", "TransferRequestMessage")

Work = tuple[str, str, str]
"""A hint for the manager: ("step", kind, pid) = a step is owed on pid; ("send", kind, pid) = pid has a
message waiting in the outbox. Hints only say where to look; the rows say whether there is work."""

_Process = NegotiationRow | TransferRow


def _kind(row: _Process) -> str:
    return "negotiation" if isinstance(row, NegotiationRow) else "transfer"


@dataclass
class _Tx:
    """One DSP transaction. Process rows are read detached (`negotiation`, `transfer`) and written back
    by `save` (at the end of the transaction, or earlier by the caller); the hints for the manager are
    collected here from what is saved and queued, not from an ORM flush."""

    s: Session
    store: DspStore
    audits: list[tuple[str, str, str, Outcome, str]] = field(default_factory=list)
    # Set when a manager worker takes the step and will deliver what it sends itself: messages are
    # written already leased to it (one transaction less per hop; after a crash the lease runs out
    # and the next full pass sends them).
    lease_until: datetime | None = None
    leased: list[Outgoing] = field(default_factory=list)
    # Set when the manager takes hand-offs (`DspService.hand_off`): the steps this transaction leaves
    # owed are taken in it, and what they send is written leased and handed to a worker after commit.
    handed: bool = False
    datasets: dict[str, DatasetRow] = field(default_factory=dict)  # read in this transaction
    # New negotiations of a handed transaction: inserted at its end, after the steps taken in it,
    # with one INSERT of what they became instead of an INSERT and an UPDATE.
    inserts: list[NegotiationRow] = field(default_factory=list)
    work: list[Work] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    states: dict[str, str] = field(default_factory=dict)  # of the rows created here, as created
    # Detached rows read in this transaction, with their values as last written.
    rows: list[tuple[_Process, dict[str, Any]]] = field(default_factory=list)
    # While a step runs inline (`DspService._steps_inline`): its inserts, held back until it succeeds.
    deferred: list[Callable[[], None]] | None = None

    def write(self, insert: Callable[[], None]) -> None:
        """Run an insert now, or hold it back while a step runs inline (see `deferred`)."""
        if self.deferred is None:
            insert()
        else:
            self.deferred.append(insert)

    def audit(self, actor: str, action: str, subject: str, outcome: Outcome, reason: str = "") -> None:
        self.audits.append((actor, action, subject, outcome, reason))

    def negotiation(self, pid: str, *, lock: bool = True) -> NegotiationRow:
        row = self.store.fetch(self.s, NegotiationRow, pid, lock=lock)
        self.rows.append((row, snapshot(row)))
        return row

    def transfer(self, pid: str, *, lock: bool = True) -> TransferRow:
        row = self.store.fetch(self.s, TransferRow, pid, lock=lock)
        self.rows.append((row, snapshot(row)))
        return row

    def begin_negotiation(
        self,
        *,
        own: str,
        role: Role,
        state: NegotiationState,
        provider_pid: str | None,
        consumer_pid: str | None,
        counterparty: str,
        address: str,
        dataset_id: str | None,
        offer: dict[str, Any],
        auto: bool,
        now: datetime,
        pending: str | None = None,
    ) -> NegotiationRow:
        """Insert a new negotiation process (`DspStore.create_negotiation` checks its first state)."""
        row = NegotiationRow(
            id=own,
            role=role.value,
            provider_pid=provider_pid,
            consumer_pid=consumer_pid,
            state=state.value,
            counterparty_id=counterparty,
            counterparty_address=address.rstrip("/"),
            dataset_id=dataset_id,
            offer=offer,
            agreement_id=None,
            auto=auto,
            pending=pending,
            terminal_reason=None,
            created_at=now,
            updated_at=now,
        )
        self.store.create_negotiation(self.s, row, insert=not self.handed)
        self.created(row)
        if self.handed:
            self.inserts.append(row)
        return row

    def insert_deferred(self) -> None:
        """Insert the new negotiations held back (`begin_negotiation`), as they are now."""
        for row in self.inserts:
            self.store.insert_negotiation(self.s, row)
            self.states[row.id] = row.state
            if row.pending:
                self.work.append(("step", _kind(row), row.id))
        self.inserts = []

    def created(self, row: _Process) -> None:
        """A process row this transaction inserted (`DspStore.create_*`)."""
        self.touched.add(row.id)
        self.states[row.id] = row.state
        if row.pending:
            self.work.append(("step", _kind(row), row.id))
        if self.handed and isinstance(row, TransferRow):
            # A step taken in this transaction changes the row after its INSERT: `save` writes that.
            self.rows.append((row, snapshot(row)))

    def dataset(self, dataset_id: str) -> DatasetRow:
        """A dataset, read once per transaction (a request and the decision taken with it both need it)."""
        row = self.datasets.get(dataset_id)
        if row is None:
            row = self.datasets[dataset_id] = self.store.dataset(self.s, dataset_id)
        return row

    def queued(self, out: Outgoing) -> None:
        """A message this transaction put in the outbox."""
        if out.attempts == 0:  # not leased to the worker taking the step: a hint for any worker
            self.work.append(("send", out.kind, out.process_id))

    def save(self) -> None:
        """Write what changed in the rows read so far."""
        for i, (row, before) in enumerate(self.rows):
            changed = self.store.save(self.s, row, before)
            if changed:
                self.rows[i] = (row, {**before, **changed})
                self.touched.add(row.id)
                if row.pending:
                    self.work.append(("step", _kind(row), row.id))


def _note_work(session: Session, _: Any) -> None:
    """After each flush of a DSP transaction, note the work it leaves owed by ORM-loaded rows (the
    paths that change rows through the session: retiring agreements and what it terminates).

    At flush time the session still holds the changed rows strongly (its identity map is weak, so a
    row nobody else references may be gone by commit); stale notes are harmless: they are hints.
    """
    work: list[Work] | None = session.info.get("dsp_work")
    if work is None:
        return
    for o in (*session.new, *session.dirty):
        if isinstance(o, NegotiationRow | TransferRow) and o.pending:
            work.append(("step", _kind(o), o.id))


event.listen(Session, "before_flush", lambda s, _c, _i: _note_work(s, None))


@dataclass(frozen=True)
class Step:
    """What a step taken for a manager worker left to do: deliver `sent`, then record `audits`."""

    sent: list[Outgoing]
    audits: list[tuple[str, str, str, Outcome, str]]


Recorder = Callable[[str, str, str, Outcome, str], None]
AuditTuple = tuple[str, str, str, Outcome, str]
BatchRecorder = Callable[[Sequence[AuditTuple]], object]
"""Records several entries at once, all or none (`AuditLog.append_many`): one durable commit."""


class DspService:
    """Provider handlers (`on_*` with a provider-role process), consumer callbacks, management use cases.

    `record` writes an audit entry; it is called after commit, never inside a transaction.
    `record_many`, when given, writes the entries of one transaction or step together (one durable
    commit instead of one each); it must record all or raise, as `record` does.
    """

    def __init__(
        self,
        db: Database,
        *,
        participant_id: str,
        public_url: str,
        key: SigningKey,
        clock: Clock,
        record: Recorder,
        record_many: BatchRecorder | None = None,
    ) -> None:
        self.db = db
        self.store = DspStore(db)
        self.me = participant_id
        self.public_url = public_url.rstrip("/")
        self.key = key
        self.clock = clock
        self._record = record
        self._record_many = record_many
        self._changed = threading.Lock()
        self._versions: dict[str, int] = {}  # pid -> commits that touched it (what waiters watch)
        # pid -> the state the last of those commits left it in (None: not known to the committer)
        self._states: dict[str, str | None] = {}
        # One condition per process someone waits for, with its number of waiters: a commit wakes
        # only the waiters of what it touched (one shared condition woke every waiter on every
        # commit, which under concurrent negotiations is most of the wake-ups).
        self._waiting: dict[str, tuple[threading.Condition, int]] = {}
        # Commits of another process on the same database (a second worker, a restarted one) notify
        # waiters here only through `changed_elsewhere` (change notices, PostgreSQL): without one, a
        # waiter reads the row again after this long.
        self.wait_poll_s = 1.0
        # Where this process's commits are told to the connector's other processes (`core.notices`).
        self.broadcast: Callable[[set[str]], None] = lambda _: None
        self._wake: Callable[[Sequence[Work]], None] = lambda _: None
        self._handoff: tuple[Callable[[list[Outgoing]], None], timedelta] | None = None

    def on_work(self, wake: Callable[[Sequence[Work]], None]) -> None:
        """Register the manager's wake-up call, invoked after each commit that leaves work owed."""
        self._wake = wake

    def hand_off(self, deliver: Callable[[list[Outgoing]], None] | None, lease: timedelta) -> None:
        """Register (None: withdraw) a manager whose running workers take messages already leased.

        While one is registered, a transaction takes the steps it leaves owed itself (`_steps_inline`)
        and writes the messages it queues leased for `lease`; after commit they go to `deliver`. That
        saves, per message, the worker's claim (a transaction) and, per step, the worker's transaction
        that would re-read and re-lock the row. A crash between commit and delivery leaves the message
        leased: the next full pass after the lease runs out sends it, as for a worker's own step."""
        self._handoff = None if deliver is None else (deliver, lease)

    @contextmanager
    def _tx(self, token: TokenUse | None = None, *, handoff: bool = True) -> Iterator[_Tx]:
        """One DSP transaction. With `token` (a peer's request token whose replay check was left to
        this transaction), its use is recorded first: a replay is refused before anything else, and
        the request needs no transaction of its own for it. The caller settles the token afterwards
        (`TokenUse.settle`), which records the use on its own if this transaction failed.

        With `handoff` and a manager registered (`hand_off`), owed steps are taken in this
        transaction and its messages are handed to the manager after commit."""
        taker = self._handoff if handoff else None
        with self.store.writing() as s:
            if token is not None:
                token.record_in(s.connection())
            tx = _Tx(s, self.store)
            if taker is not None:
                tx.handed = True
                tx.lease_until = self.clock.now() + taker[1]
            work = tx.work
            s.info["dsp_work"] = work
            yield tx
            if tx.handed:
                self._steps_inline(tx)
                tx.insert_deferred()
            tx.save()
            s.flush()
            touched = tx.touched | {pid for _, _, pid in work}
            orm = [o for o in s.identity_map.values() if isinstance(o, NegotiationRow | TransferRow)]
            touched.update(o.id for o in orm)
            states = {**tx.states, **{r.id: r.state for r, _ in tx.rows}, **{o.id: o.state for o in orm}}
        if token is not None:
            token.committed()
        # The manager first: its work is what the peer is waiting for; audit and waiters come after.
        if taker is not None and tx.leased:
            taker[0](list(tx.leased))
        if work:
            self._wake(list(dict.fromkeys(work)))
        if tx.handed or not tx.leased:
            self.record_all(tx.audits)
        # else: the worker delivers first and records after (`run_pending`); a crash in between
        # loses the entries just as a crash between this commit and the audit append would.
        if touched:
            self._touched(touched, states)

    def _steps_inline(self, tx: _Tx) -> None:
        """Take, in this transaction, the steps it leaves owed (an automatic decision, verification,
        finalization ...): what a worker would do right after the commit, without its transaction.

        A step changes its row in memory (written by `save`) and holds its inserts (the agreement,
        the outbox message) back until it has succeeded (`_Tx.write`). One that fails is undone
        (its changes to the row, its inserts, audit entries and hints) with nothing written, and
        stays owed: a worker then takes it in a transaction of its own, which records the failure
        as before, so a failing step never fails the request that left it owed. No savepoint is
        needed for that: on PostgreSQL a savepoint and its release are two round trips per step.
        A held insert that fails when it is run (the database's fault, not the step's logic) fails
        the transaction, as any other statement in it would."""
        actor = f"connector:{self.me}"
        for row in [*tx.inserts, *(r for r, _ in tx.rows)]:
            owed = row.pending
            if owed is None:
                continue
            kept = snapshot(row)
            marks = len(tx.audits), len(tx.work)  # `leased` grows only by held inserts
            tx.deferred = []
            try:
                row.pending = None
                self._take_owed(tx, row, owed, actor)
            except Exception:  # any failure: the step is left to a worker, as before
                restore(row, kept)
                del tx.audits[marks[0] :], tx.work[marks[1] :]
                continue
            finally:
                inserts, tx.deferred = tx.deferred, None
            for insert in inserts:
                insert()
            hint = ("step", _kind(row), row.id)
            tx.work[:] = [w for w in tx.work if w != hint]

    def _take_owed(self, tx: _Tx, row: _Process, owed: str, actor: str) -> None:
        if isinstance(row, TransferRow):
            self._transfer_step(tx, row, Role(row.role), owed, actor, "")
        elif owed == "decide":
            self._decide(tx, row, actor)
        else:
            self._negotiation_step(tx, row, Role(row.role), owed, actor, None, "")

    def _touched(self, pids: set[str], states: Mapping[str, str] | None = None) -> None:
        """Tell waiters that a commit changed these processes (and, where known, the state it left),
        here and in the connector's other processes."""
        self._wake_waiters(pids, states)
        self.broadcast(pids)

    def changed_elsewhere(self, pids: set[str]) -> None:
        """Another process of this connector committed changes to these processes: their waiters
        here read them again (the state they were left in is not known here)."""
        self._wake_waiters(pids, None)

    def _wake_waiters(self, pids: set[str], states: Mapping[str, str] | None) -> None:
        with self._changed:
            for pid in pids:
                self._versions[pid] = self._versions.get(pid, 0) + 1
                self._states[pid] = states.get(pid) if states else None
                waiting = self._waiting.get(pid)
                if waiting is not None:
                    waiting[0].notify_all()

    # --- catalog (provider) ------------------------------------------------------------------------

    @property
    def service_id(self) -> str:
        return f"urn:healthspace:{self.me}:dsp"

    def _dataset_json(self, row: DatasetRow, root: bool) -> dict[str, Any]:
        offer = {**row.offer, "@type": "Offer"}
        offer.pop("target", None)
        doc: dict[str, Any] = {
            "@id": row.id,
            "@type": "Dataset",
            "title": row.title,
            "description": row.description,
            "keyword": list(row.keywords),
            **row.metadata_json,
            "hasPolicy": [offer],
            "distribution": [
                {"@type": "Distribution", "format": PULL_FORMAT, "accessService": self.service_id}
            ],
        }
        if root:
            doc["@context"] = ["https://w3id.org/dspace/2025/1/context.jsonld"]
        return doc

    def catalog(
        self, caller: str, msg: CatalogRequestMessage, offset: int, limit: int
    ) -> tuple[CatalogResponse, int]:
        """The catalog page [offset, offset+limit) after the filter, and the total number matching."""
        if offset < 0 or not 1 <= limit <= 500:
            raise DspRequestRefusedError("offset must be ≥ 0 and limit within 1..500")
        matches = _catalog_filter(msg.filter or [])
        with self.db.session() as s:
            rows = [r for r in self.store.datasets(s) if matches(r)]
        rows = [r for r in rows if self.visible(caller, r)]
        page = rows[offset : offset + limit]
        response = CatalogResponse.model_validate(
            {
                "@id": f"urn:healthspace:{self.me}:catalog",
                "participantId": self.me,
                "service": [
                    DataService(id=self.service_id, endpoint_url=self.public_url).model_dump(
                        mode="json", exclude_none=True
                    )
                ],
                # DSP: `dataset`, when present, has at least one item; an empty page omits it.
                "dataset": [self._dataset_json(r, root=False) for r in page] or None,
            }
        )
        return response, len(rows)

    def dataset(self, caller: str, dataset_id: str) -> DatasetResponse:
        with self.db.session() as s:
            row = self.store.dataset(s, dataset_id)
        if not self.visible(caller, row):
            raise NotFoundError(f"no dataset {dataset_id!r}")  # DSP: not authorised reads as not found
        return DatasetResponse.model_validate(self._dataset_json(row, root=True))

    def visible(self, caller: str, row: DatasetRow) -> bool:
        """Whether `caller` may see this dataset in the catalog. Everything is visible here; a connector
        with a policy gate narrows it to the offers the caller could be granted."""
        return True

    # --- processes a peer is party to --------------------------------------------------------------
    # DSP: a process the caller is not party to does not exist for it (the store's own not-found text).

    @staticmethod
    def _own_negotiation(tx: _Tx, caller: str, pid: str) -> NegotiationRow:
        row = tx.negotiation(pid)
        if row.counterparty_id != caller:
            raise NotFoundError(f"no contract negotiation {pid!r}")
        return row

    @staticmethod
    def _own_transfer(tx: _Tx, caller: str, pid: str) -> TransferRow:
        row = tx.transfer(pid)
        if row.counterparty_id != caller:
            raise NotFoundError(f"no transfer process {pid!r}")
        return row

    def get_negotiation(self, caller: str, pid: str) -> ContractNegotiation:
        with self.db.session() as s:
            row = self.store.fetch(s, NegotiationRow, pid)
        if row.counterparty_id != caller:
            raise NotFoundError(f"no contract negotiation {pid!r}")
        return _ack(row)

    def get_transfer(self, caller: str, pid: str) -> TransferProcess:
        with self.db.session() as s:
            row = self.store.fetch(s, TransferRow, pid)
        if row.counterparty_id != caller:
            raise NotFoundError(f"no transfer process {pid!r}")
        return _tack(row)

    # --- negotiation: messages received --------------------------------------------------------------

    def on_contract_request(
        self, caller: str, msg: ContractRequestMessage, pid: str | None, *, token: TokenUse | None = None
    ) -> tuple[ContractNegotiation, bool]:
        """Initial request (`pid` None; answers the existing process if the consumerPid is known) or a
        counter-request to our process `pid`. Returns the ACK and whether a process was created.

        `token` (every `on_*` handler): the caller's request token when its replay check is left to
        this transaction (`RequestVerifier.verify_deferring_replay`); a replay raises 401."""
        now = self.clock.now()
        with self._tx(token) as tx:
            if pid is None:
                if msg.provider_pid is not None or msg.callback_address is None:
                    raise DspRequestRefusedError(
                        "an initial request has a callbackAddress and no providerPid"
                    )
                existing = self.store.negotiation_by_consumer_pid(tx.s, _P, caller, msg.consumer_pid)
                if existing is not None:
                    return _ack(existing), False
                state = negotiation_next_state(_P, message_key(msg), None)
                dataset = self._target_dataset(tx, msg.offer)
                approval = Approval(dataset.approval)
                own = new_pid()
                row = tx.begin_negotiation(
                    own=own,
                    role=_P,
                    state=state,
                    provider_pid=own,
                    consumer_pid=msg.consumer_pid,
                    counterparty=caller,
                    address=msg.callback_address,
                    dataset_id=dataset.id,
                    offer=_offer_json(msg.offer),
                    auto=approval is not Approval.STEPWISE,
                    pending="decide" if approval is not Approval.STEPWISE else None,
                    now=now,
                )
                tx.audit(caller, "dsp.negotiation.requested", own, Outcome.SUCCESS, f"dataset {dataset.id}")
                return _ack(row), True
            row = self._own_negotiation(tx, caller, pid)
            self._check_pids(tx, row, msg.provider_pid, msg.consumer_pid)
            target = negotiation_next_state(Role(row.role), message_key(msg), _N(row.state))
            dataset = self._target_dataset(tx, msg.offer)
            if dataset.id != row.dataset_id:
                raise DspRequestRefusedError("a counter-request cannot change the dataset")
            self.store.move_negotiation(row, target, now)
            row.offer = _offer_json(msg.offer)
            row.pending = "decide" if row.auto else None
            return _ack(row), False

    def on_negotiation_message(
        self, caller: str, pid: str, msg: DspMessage, *, token: TokenUse | None = None
    ) -> ContractNegotiation:
        """Any message to an existing negotiation other than a ContractRequestMessage."""
        now = self.clock.now()
        with self._tx(token) as tx:
            row = self._own_negotiation(tx, caller, pid)
            self._check_pids(tx, row, getattr(msg, "provider_pid", None), getattr(msg, "consumer_pid", None))
            role = Role(row.role)
            target = negotiation_next_state(role, message_key(msg), _N(row.state))
            reason = None
            previous = row.offer
            if isinstance(msg, ContractNegotiationTerminationMessage):
                reason = _reason_text(msg.code, msg.reason) or "terminated by the counterparty"
            if isinstance(msg, ContractAgreementMessage):
                self._accept_agreement(tx, row, msg.agreement, caller)
            if isinstance(msg, ContractAgreementVerificationMessage) and role is _P:
                # Only a consumer that has our agreement can verify it: settled here, so the
                # finalization taken with this message leaves without waiting for its deliverer.
                self.store.settle_answered(tx.s, row.id, ("ContractAgreementMessage",))
            accept_why: list[str] = []
            if isinstance(msg, ContractOfferMessage):
                offered = msg.offer.target
                if offered is not None and row.dataset_id is not None and offered != row.dataset_id:
                    raise DspRequestRefusedError("a counter-offer cannot change the dataset")
                row.offer = _offer_json(msg.offer)
                if row.dataset_id is not None and msg.offer.target is None:
                    row.offer["target"] = row.dataset_id
            self.store.move_negotiation(row, target, now, reason)
            if not NEGOTIATION.is_final(target):
                row.pending = None
                if row.auto:
                    if target is _N.AGREED and role is _C:
                        row.pending = "verify"
                    elif target is _N.VERIFIED and role is _P:
                        row.pending = "finalize"
                    elif target is _N.ACCEPTED and role is _P:
                        row.pending = "agree"
                    elif target is _N.OFFERED and role is _C:
                        # An offer that permits no more than we asked for is one we can live with.
                        ok, accept_why = policy_acceptable(row.offer, previous)
                        row.pending = "accept" if ok else None
            if accept_why and row.pending is None and target is _N.OFFERED:
                tx.audit(
                    caller,
                    "dsp.negotiation.awaiting-acceptance",
                    pid,
                    Outcome.SUCCESS,
                    "; ".join(accept_why)[:1000],
                )
            if target in (_N.FINALIZED, _N.TERMINATED):
                tx.audit(
                    caller, f"dsp.negotiation.{target.value.lower()}", pid, Outcome.SUCCESS, reason or ""
                )
            return _ack(row)

    def on_initial_offer(
        self, caller: str, msg: ContractOfferMessage, *, token: TokenUse | None = None
    ) -> ContractNegotiation:
        """A provider-initiated negotiation (POST /negotiations/offers): a new consumer-side process."""
        now = self.clock.now()
        with self._tx(token) as tx:
            if msg.callback_address is None or msg.consumer_pid is not None:
                raise DspRequestRefusedError("an initial offer has a callbackAddress and no consumerPid")
            state = negotiation_next_state(_C, message_key(msg), None)
            own = new_pid()
            row = tx.begin_negotiation(
                own=own,
                role=_C,
                state=state,
                provider_pid=msg.provider_pid,
                consumer_pid=own,
                counterparty=caller,
                address=msg.callback_address,
                dataset_id=msg.offer.target,
                offer=_offer_json(msg.offer),
                auto=False,  # an unsolicited offer waits for a researcher
                now=now,
            )
            tx.audit(caller, "dsp.negotiation.offered", own, Outcome.SUCCESS, "provider-initiated")
            return _ack(row)

    def _accept_agreement(self, tx: _Tx, row: NegotiationRow, agreement: Agreement, caller: str) -> None:
        problems = []
        if agreement.assignee != self.me:
            problems.append(f"assignee {agreement.assignee!r} is not {self.me!r}")
        if agreement.assigner != caller:
            problems.append(f"assigner {agreement.assigner!r} is not the caller {caller!r}")
        if row.dataset_id is not None and agreement.target != row.dataset_id:
            problems.append(f"target {agreement.target!r} is not the negotiated dataset")
        if problems:
            raise DspRequestRefusedError("agreement refused: " + "; ".join(problems))
        policy = agreement.model_dump(mode="json", exclude_none=True)
        self.store.add_agreement(
            tx.s,
            AgreementRow(
                id=agreement.id,
                negotiation_id=row.id,
                role=_C.value,
                provider_id=caller,
                consumer_id=self.me,
                dataset_id=agreement.target,
                policy=policy,
                signed_at=self.clock.now(),
                retired_at=None,
                retired_reason=None,
            ),
        )
        row.agreement_id = agreement.id

    def _target_dataset(self, tx: _Tx, offer: Offer) -> DatasetRow:
        if offer.target is None:
            raise DspRequestRefusedError("the offer names no target dataset")
        try:
            return tx.dataset(offer.target)
        except NotFoundError:
            raise DspRequestRefusedError(f"no dataset {offer.target!r} is offered here") from None

    def _check_pids(
        self, tx: _Tx, row: NegotiationRow | TransferRow, provider_pid: str | None, consumer_pid: str | None
    ) -> None:
        if consumer_pid != row.consumer_pid:
            raise DspRequestRefusedError("consumerPid does not match the process")
        if provider_pid is None:
            return
        if row.provider_pid is None:
            row.provider_pid = provider_pid  # the ACK carrying it may still be on its way
            # The provider names a process only our request created: that request has arrived.
            # Marked sent here, so what this transaction sends next leaves at once instead of
            # waiting for the request's deliverer to settle it.
            self.store.settle_answered(tx.s, row.id, _INITIAL_REQUESTS)
        elif provider_pid != row.provider_pid:
            raise DspRequestRefusedError("providerPid does not match the process")

    # --- transfer: messages received ------------------------------------------------------------------

    def on_transfer_request(
        self, caller: str, msg: TransferRequestMessage, *, token: TokenUse | None = None
    ) -> tuple[TransferProcess, bool]:
        now = self.clock.now()
        with self._tx(token) as tx:
            existing = self.store.transfer_by_consumer_pid(tx.s, _P, caller, msg.consumer_pid)
            if existing is not None:
                return _tack(existing), False
            state = transfer_next_state(_P, message_key(msg), None)
            if msg.format != PULL_FORMAT:
                raise DspRequestRefusedError(f"format {msg.format!r} is not offered; use {PULL_FORMAT}")
            agreement = self._usable_agreement(tx.s, msg.agreement_id, caller)
            dataset = self.store.dataset(tx.s, agreement.dataset_id)
            auto = Approval(dataset.approval) is not Approval.STEPWISE
            own = new_pid()
            row = TransferRow(
                id=own,
                role=_P.value,
                provider_pid=own,
                consumer_pid=msg.consumer_pid,
                state=state.value,
                counterparty_id=caller,
                counterparty_address=msg.callback_address.rstrip("/"),
                agreement_id=agreement.id,
                format=msg.format,
                data_address=None,
                auto=auto,
                pending="start" if auto else None,
                terminal_reason=None,
                created_at=now,
                updated_at=now,
            )
            self.store.create_transfer(tx.s, row)
            tx.created(row)
            tx.audit(caller, "dsp.transfer.requested", own, Outcome.SUCCESS, f"agreement {agreement.id}")
            return _tack(row), True

    def _usable_agreement(self, s: Session, agreement_id: str, consumer: str) -> AgreementRow:
        try:
            agreement = self.store.agreement(s, agreement_id)
        except NotFoundError:
            raise DspRequestRefusedError(f"no agreement {agreement_id!r}") from None
        if agreement.role != _P.value or agreement.consumer_id != consumer:
            raise DspRequestRefusedError(f"no agreement {agreement_id!r}")
        if agreement.retired_at is not None:
            raise DspRequestRefusedError(f"agreement {agreement_id!r} is retired")
        negotiation = self.store.negotiation(s, agreement.negotiation_id)
        if negotiation.state != _N.FINALIZED.value:
            raise DspRequestRefusedError(f"agreement {agreement_id!r} is not finalized")
        return agreement

    def on_transfer_message(
        self, caller: str, pid: str, msg: DspMessage, *, token: TokenUse | None = None
    ) -> TransferProcess:
        now = self.clock.now()
        with self._tx(token) as tx:
            row = self._own_transfer(tx, caller, pid)
            self._check_pids(tx, row, getattr(msg, "provider_pid", None), getattr(msg, "consumer_pid", None))
            target = transfer_next_state(Role(row.role), message_key(msg), _T(row.state))
            reason = None
            if isinstance(msg, TransferTerminationMessage | TransferSuspensionMessage):
                reason = _reason_text(msg.code, msg.reason)
            if isinstance(msg, TransferTerminationMessage) and msg.code == AGREEMENT_RETIRED:
                self._retired_by_counterparty(tx, row.agreement_id, caller, reason or "", now)
            if isinstance(msg, TransferStartMessage) and msg.data_address is not None:
                row.data_address = msg.data_address.model_dump(mode="json", exclude_none=True)
            self.store.move_transfer(row, target, now, reason or None)
            if target is not _T.STARTED:
                row.pending = None
            if target in (_T.COMPLETED, _T.TERMINATED):
                tx.audit(caller, f"dsp.transfer.{target.value.lower()}", pid, Outcome.SUCCESS, reason or "")
            return _tack(row)

    def _retired_by_counterparty(
        self, tx: _Tx, agreement_id: str, caller: str, reason: str, now: datetime
    ) -> None:
        agreement = self.store.agreement(tx.s, agreement_id)
        if agreement.retired_at is None:
            agreement.retired_at, agreement.retired_reason = now, f"retired by {caller}: {reason}"[:1000]
            tx.audit(caller, "dsp.agreement.retired", agreement_id, Outcome.SUCCESS, reason)

    # --- management: datasets ------------------------------------------------------------------------

    def publish(self, actor: str, body: DatasetCreate) -> DatasetPublic:
        offer = dict(body.offer)
        if not isinstance(offer.get("@id"), str) or not offer["@id"]:
            raise ValidationError("the offer needs an '@id'")
        offer.pop("target", None)
        offer["@type"] = "Offer"
        Offer.model_validate(offer)
        now = self.clock.now()
        row = DatasetRow(
            id=body.id,
            title=body.title,
            description=body.description,
            keywords=list(body.keywords),
            metadata_json=dict(body.metadata),
            offer=offer,
            approval=body.approval.value,
            created_at=now,
        )
        # The catalog entry must be a valid DSP Dataset before anyone can see it.
        DatasetResponse.model_validate(self._dataset_json(row, root=True))
        with self._tx() as tx:
            self.store.put_dataset(tx.s, row)
            tx.audit(actor, "dsp.dataset.published", body.id, Outcome.SUCCESS)
        return _dataset_public(row)

    def list_datasets(self) -> list[DatasetPublic]:
        with self.db.session() as s:
            return [_dataset_public(r) for r in self.store.datasets(s)]

    # --- management: negotiations ---------------------------------------------------------------------

    def start_negotiation(
        self,
        actor: str,
        provider_id: str,
        provider_url: str,
        offer: Mapping[str, Any],
        *,
        auto: bool = True,
    ) -> NegotiationPublic:
        """Consumer: send a ContractRequestMessage for `offer` (its `target` names the dataset)."""
        parsed = Offer.model_validate({**offer, "@type": "Offer"})
        if parsed.target is None:
            raise ValidationError("the offer needs a 'target' (the dataset id)")
        now = self.clock.now()
        own = new_pid()
        msg = ContractRequestMessage(consumer_pid=own, offer=parsed, callback_address=self.public_url)
        body = to_json(msg)
        with self._tx() as tx:
            row = tx.begin_negotiation(
                own=own,
                role=_C,
                state=_N.REQUESTED,
                provider_pid=None,
                consumer_pid=own,
                counterparty=provider_id,
                address=provider_url,
                dataset_id=parsed.target,
                offer=_offer_json(parsed),
                auto=auto,
                now=now,
            )
            self._send(tx, row, "negotiation", f"{row.counterparty_address}/negotiations/request", msg, body)
            tx.audit(actor, "dsp.negotiation.request", own, Outcome.SUCCESS, f"{provider_id} {parsed.target}")
            return _negotiation_public(row)

    def offer_negotiation(
        self,
        actor: str,
        consumer_id: str,
        consumer_url: str,
        dataset_id: str,
        offer: Mapping[str, Any] | None = None,
    ) -> NegotiationPublic:
        """Provider: begin a negotiation by offering a dataset to a consumer (a ContractOfferMessage
        to its `/negotiations/offers`). The offer is the dataset's own unless a steward gives one at
        least as restrictive; after the consumer accepts, the agreement goes through the same steps
        (and the same policy gate) as one the consumer requested."""
        now = self.clock.now()
        own = new_pid()
        with self._tx() as tx:
            dataset = self.store.dataset(tx.s, dataset_id)
            policy = dict(offer) if offer is not None else dict(dataset.offer)
            parsed = Offer.model_validate({**policy, "@type": "Offer", "target": dataset.id})
            if offer is not None:
                ok, reasons = policy_acceptable(_offer_json(parsed), dataset.offer)
                if not ok:
                    why = "; ".join(reasons) or "it is broader than the dataset's offer"
                    raise ValidationError(f"the offer is not at least as restrictive as the dataset's: {why}")
            msg = ContractOfferMessage(provider_pid=own, offer=parsed, callback_address=self.public_url)
            row = tx.begin_negotiation(
                own=own,
                role=_P,
                state=_N.OFFERED,
                provider_pid=own,
                consumer_pid=None,  # the consumer's ACK names it
                counterparty=consumer_id,
                address=consumer_url,
                dataset_id=dataset.id,
                offer=_offer_json(parsed),
                auto=True,
                now=now,
            )
            self._send(tx, row, "negotiation", f"{row.counterparty_address}/negotiations/offers", msg)
            tx.audit(actor, "dsp.negotiation.offer", own, Outcome.SUCCESS, f"{consumer_id} {dataset.id}")
            return _negotiation_public(row)

    def negotiation_action(
        self,
        actor: str,
        staff_role: StaffRole | None,
        pid: str,
        action: str,
        *,
        offer: Mapping[str, Any] | None = None,
        reason: str = "",
    ) -> NegotiationPublic:
        """A step by a person (`staff_role` set) or by the manager (`staff_role` None).

        Consumer side (researcher/admin): accept, verify, request (counter-offer), terminate.
        Provider side (steward/admin): approve (agree), offer (counter-offer), finalize, reject, terminate.
        """
        with self._tx() as tx:
            row = tx.negotiation(pid)
            role = Role(row.role)
            _authorise(staff_role, role)
            self._negotiation_step(tx, row, role, action, actor, offer, reason)
            return _negotiation_public(row)

    def _negotiation_step(
        self,
        tx: _Tx,
        row: NegotiationRow,
        role: Role,
        action: str,
        actor: str,
        offer: Mapping[str, Any] | None,
        reason: str,
    ) -> None:
        now = self.clock.now()
        state = _N(row.state)
        if row.provider_pid is None or row.consumer_pid is None:
            raise ConflictError("the counterparty has not acknowledged this negotiation yet")
        ppid, cpid = row.provider_pid, row.consumer_pid
        base = row.counterparty_address
        other = cpid if role is _P else ppid
        msg: DspMessage
        if action in ("terminate", "reject"):
            text = reason or ("rejected by the provider" if action == "reject" else "terminated")
            msg = ContractNegotiationTerminationMessage(
                provider_pid=ppid, consumer_pid=cpid, code=action, reason=[text]
            )
            self._require_send(role, msg, state)
            self._send(tx, row, "negotiation", f"{base}/negotiations/{other}/termination", msg)
            self.store.move_negotiation(row, _N.TERMINATED, now, text)
            tx.audit(actor, "dsp.negotiation.terminated", row.id, Outcome.SUCCESS, text)
            return
        if role is _C and action == "accept":
            msg = ContractNegotiationEventMessage(provider_pid=ppid, consumer_pid=cpid, event_type="ACCEPTED")
            target, url = _N.ACCEPTED, f"{base}/negotiations/{ppid}/events"
        elif role is _C and action == "verify":
            msg = ContractAgreementVerificationMessage(provider_pid=ppid, consumer_pid=cpid)
            target, url = _N.VERIFIED, f"{base}/negotiations/{ppid}/agreement/verification"
        elif role is _C and action == "request":
            new_offer = Offer.model_validate({**(offer or row.offer), "@type": "Offer"})
            if new_offer.target is None:
                new_offer = new_offer.model_copy(update={"target": row.dataset_id})
            msg = ContractRequestMessage(provider_pid=ppid, consumer_pid=cpid, offer=new_offer)
            target, url = _N.REQUESTED, f"{base}/negotiations/{ppid}/request"
            row.offer = _offer_json(new_offer)
        elif role is _P and action in ("approve", "agree"):
            msg = ContractAgreementMessage(
                provider_pid=ppid, consumer_pid=cpid, agreement=self._make_agreement(tx, row)
            )
            target, url = _N.AGREED, f"{base}/negotiations/{cpid}/agreement"
        elif role is _P and action == "offer":
            new_offer = Offer.model_validate({**(offer or row.offer), "@type": "Offer"})
            if new_offer.target is None:
                new_offer = new_offer.model_copy(update={"target": row.dataset_id})
            msg = ContractOfferMessage(provider_pid=ppid, consumer_pid=cpid, offer=new_offer)
            target, url = _N.OFFERED, f"{base}/negotiations/{cpid}/offers"
            row.offer = _offer_json(new_offer)
        elif role is _P and action == "finalize":
            msg = ContractNegotiationEventMessage(
                provider_pid=ppid, consumer_pid=cpid, event_type="FINALIZED"
            )
            target, url = _N.FINALIZED, f"{base}/negotiations/{cpid}/events"
        else:
            raise ValidationError(f"a {role} cannot {action!r} a negotiation")
        self._require_send(role, msg, state)
        self._send(tx, row, "negotiation", url, msg)
        self.store.move_negotiation(row, target, now)
        row.pending = None
        if target in (_N.AGREED, _N.FINALIZED):
            tx.audit(actor, f"dsp.negotiation.{target.value.lower()}", row.id, Outcome.SUCCESS)

    def _make_agreement(self, tx: _Tx, row: NegotiationRow) -> Agreement:
        if row.dataset_id is None:
            raise ConflictError("the negotiation names no dataset")
        rules = _rules(row.offer)
        agreement = Agreement.model_validate(
            {
                "@id": new_pid(),
                "@type": "Agreement",
                "target": row.dataset_id,
                "assigner": self.me,
                "assignee": row.counterparty_id,
                "timestamp": agreement_timestamp(self.clock.now()),
                **rules,
            }
        )
        stored = AgreementRow(
            id=agreement.id,
            negotiation_id=row.id,
            role=_P.value,
            provider_id=self.me,
            consumer_id=row.counterparty_id,
            dataset_id=row.dataset_id,
            policy=agreement.model_dump(mode="json", exclude_none=True),
            signed_at=self.clock.now(),
            retired_at=None,
            retired_reason=None,
        )
        tx.write(lambda: self.store.add_agreement(tx.s, stored))
        row.agreement_id = agreement.id
        return agreement

    @staticmethod
    def _require_send(role: Role, msg: DspMessage, state: NegotiationState | TransferState) -> None:
        if not can_send(role, message_key(msg), state):
            raise InvalidTransitionError(
                f"a {role} cannot send {message_key(msg)} in state {state}", current=str(state)
            )

    def _send(
        self,
        tx: _Tx,
        row: NegotiationRow | TransferRow,
        kind: str,
        url: str,
        msg: DspMessage,
        body: bytes | None = None,
    ) -> None:
        # Leased to the worker only when nothing of this process is still waiting to go out (the
        # store checks in the same statement): its messages leave in order.
        text = body if body is not None else to_json(msg)
        now = self.clock.now()

        def insert() -> None:
            out = self.store.enqueue(
                tx.s,
                process_id=row.id,
                kind=kind,
                peer_id=row.counterparty_id,
                url=url,
                message_type=message_key(msg),
                body=text,
                now=now,
                lease_until=tx.lease_until,
            )
            tx.queued(out)
            if out.attempts:
                tx.leased.append(out)

        tx.write(insert)

    def list_negotiations(self, limit: int = 100, offset: int = 0) -> list[NegotiationPublic]:
        with self.db.session() as s:
            return [_negotiation_public(r) for r in self.store.negotiations(s, limit, offset)]

    def negotiation(self, pid: str) -> NegotiationPublic:
        return NegotiationPublic.model_validate(self.store.process_values("negotiation", pid))

    def wait_negotiation(
        self,
        pid: str,
        states: set[NegotiationState],
        timeout_s: float,
        *,
        acknowledged: bool = False,
    ) -> NegotiationPublic:
        """The negotiation once it is in one of `states` (or final) and, with `acknowledged`, once the
        provider's pid is known; or as it is when `timeout_s` ends."""

        def done(n: NegotiationPublic) -> bool:
            final = NEGOTIATION.is_final(n.state)
            in_state = not states or n.state in states or final
            known = n.provider_pid is not None and n.consumer_pid is not None
            return in_state and (not acknowledged or known or final)

        def not_yet(state: str) -> bool:
            return bool(states) and state not in states and not NEGOTIATION.is_final(_N(state))

        found: NegotiationPublic = self._wait(pid, lambda: self.negotiation(pid), done, not_yet, timeout_s)
        return found

    def wait_transfer(
        self, pid: str, states: set[TransferState], timeout_s: float, *, acknowledged: bool = False
    ) -> TransferPublic:
        def done(t: TransferPublic) -> bool:
            final = TRANSFER.is_final(t.state)
            in_state = not states or t.state in states or final
            return in_state and (not acknowledged or t.provider_pid is not None or final)

        def not_yet(state: str) -> bool:
            return bool(states) and state not in states and not TRANSFER.is_final(_T(state))

        found: TransferPublic = self._wait(pid, lambda: self.transfer(pid), done, not_yet, timeout_s)
        return found

    def _wait(
        self,
        pid: str,
        read: Callable[[], Any],
        done: Callable[[Any], bool],
        not_yet: Callable[[str], bool],
        timeout_s: float,
    ) -> Any:
        # Re-read only when a commit of this process touched `pid` (a cheap version check under
        # the lock; only `pid`'s waiters are woken), not on every commit of every process; and not
        # when exactly one commit touched it since the last read and left it in a state that
        # `not_yet` says cannot be done (with two or more, the order their notes arrived in need not
        # be the order they committed in, so the row is read). And every `wait_poll_s` without a
        # notification: a commit made by another process is seen that late at most.
        deadline = time.monotonic() + max(0.0, min(timeout_s, 60.0))
        while True:
            with self._changed:
                seen = self._versions.get(pid, 0)
            current = read()
            left = deadline - time.monotonic()
            if done(current) or left <= 0:
                return current
            with self._changed:
                cond, n = self._waiting.get(pid) or (threading.Condition(self._changed), 0)
                self._waiting[pid] = (cond, n + 1)
                try:
                    while left > 0:
                        version = self._versions.get(pid, 0)
                        if version == seen + 1 and (state := self._states.get(pid)) and not_yet(state):
                            seen = version  # e.g. AGREED while waiting for FINALIZED: nothing to read
                        elif version != seen:
                            break
                        notified = cond.wait(min(left, self.wait_poll_s))
                        left = deadline - time.monotonic()
                        if not notified:
                            break  # read again: the row may have changed in another process
                finally:
                    n = self._waiting[pid][1]
                    if n == 1:
                        del self._waiting[pid]
                    else:
                        self._waiting[pid] = (cond, n - 1)

    # --- management: agreements -----------------------------------------------------------------------

    def list_agreements(self) -> list[AgreementPublic]:
        with self.db.session() as s:
            return [_agreement_public(r) for r in self.store.agreements(s)]

    def agreement(self, agreement_id: str) -> AgreementPublic:
        with self.db.session() as s:
            return _agreement_public(self.store.agreement(s, agreement_id))

    def retire_agreement(
        self, actor: str, agreement_id: str, reason: str, staff_role: StaffRole | None = None
    ) -> AgreementPublic:
        """Retire our copy of an agreement (provider: steward; consumer: researcher; or admin).

        No new transfer starts under it here, and its live transfers are terminated with the code
        `agreement-retired`, which makes the counterparty retire its copy too (DSP has no message for
        an agreement's end). An agreement without live transfers is retired on this side only.
        """
        if not reason:
            raise ValidationError("retiring an agreement needs a reason")
        now = self.clock.now()
        with self._tx() as tx:
            agreement = self.store.agreement(tx.s, agreement_id)
            role = Role(agreement.role)
            _authorise(staff_role, role)
            if agreement.retired_at is not None:
                raise ConflictError(f"agreement {agreement_id!r} is already retired")
            agreement.retired_at, agreement.retired_reason = now, reason
            for t in self.store.transfers(tx.s, limit=10_000):
                if t.agreement_id != agreement_id or TRANSFER.is_final(_T(t.state)):
                    continue
                why = f"agreement retired: {reason}"
                if t.provider_pid is None:
                    # Never acknowledged: nothing to tell the provider; our side just stops.
                    self.store.move_transfer(t, _T.TERMINATED, now, why)
                    continue
                self._transfer_step(tx, t, role, "terminate", actor, why, code=AGREEMENT_RETIRED)
            tx.audit(actor, "dsp.agreement.retired", agreement_id, Outcome.SUCCESS, reason)
            return _agreement_public(agreement)

    # --- management: transfers ------------------------------------------------------------------------

    def start_transfer(self, actor: str, agreement_id: str, fmt: str = PULL_FORMAT) -> TransferPublic:
        """Consumer: request a transfer under a finalized agreement we hold as consumer."""
        now = self.clock.now()
        own = new_pid()
        with self._tx() as tx:
            agreement = self.store.agreement(tx.s, agreement_id)
            if agreement.role != _C.value:
                raise ValidationError("only the consumer of an agreement requests transfers under it")
            if agreement.retired_at is not None:
                raise ConflictError(f"agreement {agreement_id!r} is retired: {agreement.retired_reason}")
            negotiation = self.store.negotiation(tx.s, agreement.negotiation_id)
            if negotiation.state != _N.FINALIZED.value:
                raise ConflictError(f"agreement {agreement_id!r} is not finalized yet")
            msg = TransferRequestMessage(
                consumer_pid=own, agreement_id=agreement_id, format=fmt, callback_address=self.public_url
            )
            row = TransferRow(
                id=own,
                role=_C.value,
                provider_pid=None,
                consumer_pid=own,
                state=_T.REQUESTED.value,
                counterparty_id=agreement.provider_id,
                counterparty_address=negotiation.counterparty_address,
                agreement_id=agreement_id,
                format=fmt,
                data_address=None,
                auto=True,
                pending=None,
                terminal_reason=None,
                created_at=now,
                updated_at=now,
            )
            self.store.create_transfer(tx.s, row)
            tx.created(row)
            self._send(tx, row, "transfer", f"{row.counterparty_address}/transfers/request", msg)
            tx.audit(actor, "dsp.transfer.request", own, Outcome.SUCCESS, f"agreement {agreement_id}")
            return _transfer_public(row)

    def transfer_action(
        self, actor: str, staff_role: StaffRole | None, pid: str, action: str, reason: str = ""
    ) -> TransferPublic:
        """start (provider; either side resumes), suspend, complete, terminate."""
        with self._tx() as tx:
            row = tx.transfer(pid)
            role = Role(row.role)
            _authorise(staff_role, role)
            self._transfer_step(tx, row, role, action, actor, reason)
            return _transfer_public(row)

    def _transfer_step(
        self,
        tx: _Tx,
        row: TransferRow,
        role: Role,
        action: str,
        actor: str,
        reason: str,
        *,
        code: str = "terminated",
    ) -> None:
        now = self.clock.now()
        if row.provider_pid is None or row.consumer_pid is None:
            raise ConflictError("the counterparty has not acknowledged this transfer yet")
        ppid, cpid = row.provider_pid, row.consumer_pid
        other = cpid if role is _P else ppid
        base = row.counterparty_address
        state = _T(row.state)
        msg: DspMessage
        if action == "start":
            address = None
            if role is _P:
                self._check_agreement_live(tx.s, row.agreement_id)
                address = self._data_address(row, now)
                row.data_address = address.model_dump(mode="json", exclude_none=True)
            msg = TransferStartMessage(provider_pid=ppid, consumer_pid=cpid, data_address=address)
            target, url = _T.STARTED, f"{base}/transfers/{other}/start"
        elif action == "suspend":
            msg = TransferSuspensionMessage(
                provider_pid=ppid, consumer_pid=cpid, code="suspended", reason=[reason or "suspended"]
            )
            target, url = _T.SUSPENDED, f"{base}/transfers/{other}/suspension"
        elif action == "complete":
            msg = TransferCompletionMessage(provider_pid=ppid, consumer_pid=cpid)
            target, url = _T.COMPLETED, f"{base}/transfers/{other}/completion"
        elif action == "terminate":
            msg = TransferTerminationMessage(
                provider_pid=ppid, consumer_pid=cpid, code=code, reason=[reason or "terminated"]
            )
            target, url = _T.TERMINATED, f"{base}/transfers/{other}/termination"
        else:
            raise ValidationError(f"unknown transfer action {action!r}")
        self._require_send(role, msg, state)
        self._send(tx, row, "transfer", url, msg)
        self.store.move_transfer(row, target, now, reason or None)
        row.pending = None
        if target in (_T.STARTED, _T.COMPLETED, _T.TERMINATED):
            tx.audit(actor, f"dsp.transfer.{target.value.lower()}", row.id, Outcome.SUCCESS, reason)

    def _check_agreement_live(self, s: Session, agreement_id: str) -> None:
        agreement = self.store.agreement(s, agreement_id)
        if agreement.retired_at is not None:
            raise ConflictError(f"agreement {agreement_id!r} is retired")

    def _data_address(self, row: TransferRow, now: datetime) -> DataAddress:
        token = mint_access_token(self.key, self.me, row.counterparty_id, row.agreement_id, row.id, now)
        return DataAddress(
            endpoint_type=ENDPOINT_TYPE,
            endpoint=f"{self.public_url}/dataplane",
            endpoint_properties=[
                EndpointProperty(name="authorization", value=token),
                EndpointProperty(name="authType", value="bearer"),
                EndpointProperty(name="agreementId", value=row.agreement_id),
            ],
        )

    def list_transfers(self, limit: int = 100, offset: int = 0) -> list[TransferPublic]:
        with self.db.session() as s:
            return [_transfer_public(r) for r in self.store.transfers(s, limit, offset)]

    def transfer(self, pid: str) -> TransferPublic:
        return TransferPublic.model_validate(self.store.process_values("transfer", pid))

    # --- work the manager does -----------------------------------------------------------------------

    def record_all(self, entries: Sequence[tuple[str, str, str, Outcome, str]]) -> None:
        """Record a step's audit entries: in one durable append when a batch recorder is set."""
        if not entries:
            return
        if self._record_many is not None:
            self._record_many(list(entries))
            return
        for entry in entries:
            self._record(*entry)

    def run_pending(self, kind: str, pid: str, *, lease: timedelta | None = None) -> Step:
        """Take the step this side owes on `pid`, if it still owes it (another worker may have).

        With `lease`, the messages the step sends are written leased to the caller for that long and
        returned with the step's audit entries: the caller delivers, then records (`record_all`), so
        the peer's next move does not wait for the audit log's durable commit."""
        actor = f"connector:{self.me}"
        owed: str | None = None
        try:
            with self._tx(handoff=False) as tx:
                if lease is not None:
                    tx.lease_until = self.clock.now() + lease
                row: NegotiationRow | TransferRow
                row = tx.negotiation(pid) if kind == "negotiation" else tx.transfer(pid)
                owed, row.pending = row.pending, None
                if owed is None:
                    return Step([], [])
                self._take_owed(tx, row, owed, actor)
        except HealthspaceError as exc:
            if owed is None:
                raise  # not the step's failure: the process could not be read
            # The step's transaction rolled back (its messages, agreement and row changes with it);
            # a second one records that the step is no longer owed. No savepoint around the step:
            # that costs two statements on every step for the sake of the rare one that fails.
            self._step_failed(kind, pid, owed, actor, exc.detail)
            return Step([], [])
        return Step(list(tx.leased), tx.audits if tx.leased else [])

    def _step_failed(self, kind: str, pid: str, owed: str, actor: str, why: str) -> None:
        with self._tx(handoff=False) as tx:
            row: NegotiationRow | TransferRow
            row = tx.negotiation(pid) if kind == "negotiation" else tx.transfer(pid)
            if row.pending != owed:
                return  # another worker took the step meanwhile (and recorded how it went)
            row.pending = None
            tx.audit(actor, f"dsp.{kind}.{owed}", pid, Outcome.FAILURE, why)

    def _decide(self, tx: _Tx, row: NegotiationRow, actor: str) -> None:
        dataset = tx.dataset(row.dataset_id or "")
        approval = Approval(dataset.approval)
        ok, reasons = policy_acceptable(row.offer, dataset.offer)
        if ok and approval is Approval.AUTO:
            self._negotiation_step(tx, row, _P, "approve", actor, None, "")
        elif not ok and approval is Approval.AUTO:
            why = "requested policy is not acceptable: " + ("; ".join(reasons) or "it differs from the offer")
            self._negotiation_step(tx, row, _P, "reject", actor, None, why[:1000])
        else:
            tx.audit(actor, "dsp.negotiation.awaiting-approval", row.id, Outcome.SUCCESS, "; ".join(reasons))

    def delivered(self, seq: int, kind: str, pid: str, answer: DspMessage | None) -> None:
        """The peer accepted outbox message `seq`; an initial request's ACK carries the provider's pid."""
        if answer is None:
            self.store.settle_outbox(seq, sent=True, error=None, retry_at=None)
            return
        provider_pid = getattr(answer, "provider_pid", None)
        consumer_pid = getattr(answer, "consumer_pid", None)
        # The ACK moves no state and owes no work: two UPDATEs, no row to load (`settle_delivered`).
        state = self.store.settle_delivered(seq, kind, pid, provider_pid, consumer_pid)
        # Waiters for the acknowledgement re-read; one waiting for a later state need not.
        self._touched({pid}, {pid: state})

    def undeliverable(self, kind: str, pid: str, message_type: str, why: str) -> None:
        """A message we owed could not be delivered: our side stops (TERMINATED) with the reason."""
        now = self.clock.now()
        reason = f"{message_type} undeliverable: {why}"[:1000]
        with self._tx() as tx:
            if kind == "negotiation":
                n = tx.negotiation(pid)
                if not NEGOTIATION.is_final(_N(n.state)):
                    self.store.move_negotiation(n, _N.TERMINATED, now, reason)
            else:
                t = tx.transfer(pid)
                if not TRANSFER.is_final(_T(t.state)):
                    self.store.move_transfer(t, _T.TERMINATED, now, reason)
            tx.audit(f"connector:{self.me}", f"dsp.{kind}.undeliverable", pid, Outcome.FAILURE, reason)


# --- helpers -----------------------------------------------------------------------------------------


def _authorise(staff_role: StaffRole | None, role: Role) -> None:
    if staff_role is None or staff_role is StaffRole.ADMIN:
        return
    allowed = StaffRole.STEWARD if role is _P else StaffRole.RESEARCHER
    if staff_role is not allowed:
        raise ForbiddenError(f"a {staff_role.value} cannot act on the {role} side; needs {allowed.value}")


def _catalog_filter(items: list[Any]) -> Callable[[DatasetRow], bool]:
    """Every item must match: a string matches id, title, description or a keyword (case-insensitive);
    `{"id": x}` and `{"keyword": x}` match exactly."""
    checks: list[Callable[[DatasetRow], bool]] = []
    for item in items:
        if isinstance(item, str):
            needle = item.lower()
            checks.append(partial(_text_match, needle))
        elif isinstance(item, dict) and set(item) == {"id"} and isinstance(item["id"], str):
            checks.append(partial(_id_match, item["id"]))
        elif isinstance(item, dict) and set(item) == {"keyword"} and isinstance(item["keyword"], str):
            checks.append(partial(_keyword_match, item["keyword"].lower()))
        else:
            raise DspRequestRefusedError(
                "unsupported filter item; use a string, {'id': ...} or {'keyword': ...}",
                item=repr(item)[:200],
            )
    return lambda r: all(c(r) for c in checks)


def _text_match(needle: str, r: DatasetRow) -> bool:
    fields = (r.id, r.title, r.description, *r.keywords)
    return any(needle in f.lower() for f in fields)


def _id_match(dataset_id: str, r: DatasetRow) -> bool:
    return r.id == dataset_id


def _keyword_match(keyword: str, r: DatasetRow) -> bool:
    return keyword in (k.lower() for k in r.keywords)


def _offer_json(offer: Offer) -> dict[str, Any]:
    return offer.model_dump(mode="json", exclude_none=True)


def _reason_text(code: str | None, reason: list[Any] | None) -> str:
    parts = [str(code)] if code else []
    parts += [str(r) for r in reason or []]
    return ": ".join(parts)[:1000]


def _ack(row: NegotiationRow) -> ContractNegotiation:
    return ContractNegotiation(
        provider_pid=row.provider_pid or "", consumer_pid=row.consumer_pid or "", state=_N(row.state)
    )


def _tack(row: TransferRow) -> TransferProcess:
    return TransferProcess(
        provider_pid=row.provider_pid or "", consumer_pid=row.consumer_pid or "", state=_T(row.state)
    )


def _dataset_public(r: DatasetRow) -> DatasetPublic:
    return DatasetPublic(
        id=r.id,
        title=r.title,
        description=r.description,
        keywords=list(r.keywords),
        metadata=dict(r.metadata_json),
        offer=dict(r.offer),
        approval=Approval(r.approval),
        created_at=r.created_at,
    )


def _negotiation_public(row: NegotiationRow) -> NegotiationPublic:
    return NegotiationPublic.model_validate(row, from_attributes=True)


def _agreement_public(row: AgreementRow) -> AgreementPublic:
    return AgreementPublic.model_validate(row, from_attributes=True)


def _transfer_public(row: TransferRow) -> TransferPublic:
    return TransferPublic.model_validate(row, from_attributes=True)
