"""The connector's policy gate: decisions before agreeing and starting, and consent withdrawal.

As provider, the connector decides each contract it is about to agree and each transfer it is about to
start with `policy.gate.decide_use` (the agreement's policy, the consumer's credentials from the
authority's directory, and the authority's signed cross-border rules and export approvals as facts),
refuses what is denied and writes every decision with its reasons to the audit log (`policy.decision`).
A consent withdrawal retires the agreements it can no longer support (`WithdrawalRetirer`).
The data plane decides each job through the same `PolicyGate.decide` (phase JOB, with the job's
parameters and counters) and audits it with the same `record_decision`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
import orjson

from healthspace.audit.log import AuditBatch, AuditLog, AuditRecorder
from healthspace.audit.models import Outcome
from healthspace.connector.dsp.service import DspService, policy_acceptable
from healthspace.connector.dsp.tables import DatasetRow, NegotiationRow, TransferRow
from healthspace.consent.models import WithdrawalEvent
from healthspace.consent.service import ConsentService
from healthspace.core.clock import Clock
from healthspace.core.errors import (
    ConflictError,
    HealthspaceError,
)
from healthspace.identity.tokens import TokenUse
from healthspace.policy.compiler import CompiledPolicy, compile_policy
from healthspace.policy.gate import UseDecision, decide_use, scenarios_of
from healthspace.policy.models import Decision, Facts, Phase
from healthspace.policy.models import Request as UseRequest
from healthspace.policy.registry import CrossBorderSet
from healthspace.protocol.states import Role as DspRole

__all__ = [
    "CrossBorderSource",
    "Directory",
    "GatedDspService",
    "Member",
    "MemberDirectory",
    "PolicyGate",
    "WithdrawalRetirer",
    "record_decision",
]

log = logging.getLogger(__name__)

# Compiled policies kept by the gate: agreements are few and their documents never change, and
# compiling (schema validation included) costs milliseconds, paid on every job without the cache.
_COMPILED_MAX = 256


@dataclass(frozen=True, slots=True)
class Member:
    """A participant as the authority's directory states it (what a policy's consumer terms read)."""

    id: str
    type: str
    jurisdiction: str
    roles: frozenset[str]


class MemberDirectory(Protocol):
    """Where the gate reads a consumer's registered attributes; None means unknown (denied)."""

    def get(self, participant_id: str) -> Member | None: ...


class CrossBorderSource(Protocol):
    """Where the gate reads the verified cross-border rules and export approvals (raises if none)."""

    def current(self) -> CrossBorderSet: ...


def record_decision(
    record: AuditRecorder,
    actor: str,
    subject: str,
    decision: Decision,
    *,
    scenario_id: str | None,
    agreement_id: str | None,
    details: dict[str, Any],
) -> None:
    """The one audit shape of every policy decision: action `policy.decision`, outcome allowed/denied,
    the reasons, and `details` with at least `phase`, `check`, `dataset_id`, `consumer_id`,
    `output_types` (a regulator filters on them)."""
    record(
        actor,
        "policy.decision",
        subject,
        Outcome.ALLOWED if decision.allowed else Outcome.DENIED,
        "; ".join(decision.reasons)[:4000],
        scenario_id=scenario_id,
        agreement_id=agreement_id,
        details=details,
    )


class Directory:
    """The authority's member directory, fetched with our credential and kept `max_age`; fails closed
    (an unknown or unreachable directory answers None, which the gate denies)."""

    def __init__(self, fetch: Any, clock: Clock, max_age: timedelta) -> None:
        self._fetch = fetch
        self._clock = clock
        self._max_age = max_age
        self._members: dict[str, Member] = {}
        self._fetched_at: datetime | None = None
        self._lock = threading.Lock()

    def get(self, participant_id: str) -> Member | None:
        now = self._clock.now()
        with self._lock:
            if self._fetched_at is None or now - self._fetched_at >= self._max_age:
                try:
                    self._members = {
                        str(m["id"]): Member(
                            str(m["id"]), str(m["type"]), str(m["jurisdiction"]), frozenset(m["roles"])
                        )
                        for m in self._fetch()
                        if m.get("status") == "ACTIVE"
                    }
                    self._fetched_at = now
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                    log.warning("member directory unreachable: %s", type(exc).__name__)
                    if self._fetched_at is None or now - self._fetched_at > timedelta(minutes=10):
                        self._members = {}
            return self._members.get(participant_id)


@dataclass(frozen=True, slots=True)
class _Noted:
    """A policy decision taken inside a DSP transaction, written to the audit log after its commit."""

    actor: str
    subject: str
    decision: Decision
    scenario_id: str | None
    agreement_id: str | None
    details: dict[str, Any]


class PolicyGate:
    """Decides, as provider, whether a contract may be agreed or a transfer started (see module doc).

    Pure decisions (`policy.gate.decide_use`) on facts fetched from the authority: the consumer's
    type, roles and jurisdiction (directory) and the signed cross-border rules and export approvals
    (`CrossBorderCache`). Anything unknown denies. `obtainConsent` counts as fulfilled only on a
    connector with a consent registry, where every job runs on the consenting cohort alone.
    """

    def __init__(
        self,
        me: str,
        jurisdiction: str,
        directory: MemberDirectory,
        cross_border: CrossBorderSource,
        clock: Clock,
        has_consent_registry: bool,
    ) -> None:
        self.me = me
        self.jurisdiction = jurisdiction
        self.directory = directory
        self.cross_border = cross_border
        self.clock = clock
        self.has_consent_registry = has_consent_registry
        self._compiled: OrderedDict[bytes, CompiledPolicy] = OrderedDict()
        self._compiled_lock = threading.Lock()

    def compiled(self, policy: Mapping[str, Any] | CompiledPolicy) -> CompiledPolicy | Mapping[str, Any]:
        """`policy` compiled, once per distinct document (keyed by a digest of its canonical JSON).
        A document that does not compile is handed on as it is: `decide` denies it with the problems,
        exactly as without the cache. A caller that asks the gate several things about one policy
        (`reads`, then `decide`) compiles it here once and passes the result to each."""
        if isinstance(policy, CompiledPolicy):
            return policy
        try:
            key = hashlib.sha256(orjson.dumps(policy, option=orjson.OPT_SORT_KEYS)).digest()
        except TypeError:
            return policy
        with self._compiled_lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit
        try:
            compiled = compile_policy(policy)
        except Exception:
            return policy
        with self._compiled_lock:
            self._compiled[key] = compiled
            while len(self._compiled) > _COMPILED_MAX:
                self._compiled.popitem(last=False)
        return compiled

    def reads(self, policy: Mapping[str, Any] | CompiledPolicy, operand: str) -> bool:
        """Whether a decision on `policy` depends on the left operand `operand` (`count`: the
        agreement's use count; `privacyBudget`: the ε spent so far) anywhere in it. Each is a read of
        every earlier job or charge, so a caller skips it when the answer cannot change the decision.
        A document that does not compile says yes: its decision denies anyway, and a counter never
        makes a decision more permissive."""
        compiled = self.compiled(policy)
        return not isinstance(compiled, CompiledPolicy) or operand in compiled.left_operands

    def decide(
        self,
        policy: Mapping[str, Any] | CompiledPolicy,
        dataset_id: str,
        consumer_id: str,
        phase: Phase,
        agreement_start: datetime | None = None,
        output_type: str | None = None,
        *,
        purpose: str | None = None,
        epsilon: float | None = None,
        cell_size: int | None = None,
        execution_location: str | None = None,
        use_count: int = 0,
        epsilon_spent: float = 0.0,
    ) -> UseDecision:
        """Decide one use of `dataset_id` by `consumer_id` at `phase`; never raises (errors deny).

        At JOB the caller passes the job's own terms (purpose = the job's scenario, output type, ε,
        cell size, where it runs) and the counters (`use_count` uses so far, `epsilon_spent`).
        """
        try:
            member = self.directory.get(consumer_id)
            if member is None:
                return UseDecision(
                    Decision(False, (f"consumer {consumer_id!r} is not an active member per the authority",)),
                    None,
                )
            facts_set = self.cross_border.current()
            request = UseRequest(
                action="use",
                target=dataset_id,
                consumer_id=consumer_id,
                consumer_type=member.type,
                consumer_roles=member.roles,
                consumer_jurisdiction=member.jurisdiction,
                output_type=output_type,
                purpose=purpose,
                epsilon=epsilon,
                cell_size=cell_size,
                execution_location=execution_location,
                phase=phase,
            )
            facts = Facts(
                use_count=use_count,
                epsilon_spent=epsilon_spent,
                agreement_start=agreement_start,
                consent_obtained=self.has_consent_registry,
            )
            return decide_use(
                self.compiled(policy),
                request,
                facts,
                provider_jurisdiction=self.jurisdiction,
                rules=facts_set.rules,
                approvals=facts_set.approvals,
                now=self.clock.now(),
            )
        except HealthspaceError as exc:
            return UseDecision(Decision(False, (f"{exc.title}: {exc.detail}",)), None)
        except Exception as exc:  # fail closed on any defect, and say so
            return UseDecision(Decision(False, (f"policy gate error ({type(exc).__name__}); denied",)), None)


class GatedDspService(DspService):
    """`DspService` with the policy gate in front of agreeing and starting, and decisions audited.

    Hooks into three steps of `DspService` (provider `approve`/`agree`, provider `start`, and the
    automatic `_decide`) because it exposes no gate of its own; see docs/policy/README.md.
    """

    def __init__(self, *args: Any, gate: PolicyGate, audit: AuditLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self._audit_log = audit
        self._noted = threading.local()

    def _note(self, entry: _Noted) -> None:
        pending: list[_Noted] | None = getattr(self._noted, "entries", None)
        if pending is None:  # outside a transaction: nothing to wait for
            self._write_all([entry])
        else:
            pending.append(entry)

    @contextmanager
    def _tx(self, token: TokenUse | None = None, *, handoff: bool = True) -> Iterator[Any]:
        # Decisions are audited after the commit: the audit log shares the SQLite file whose single
        # writer lock the DSP transaction holds.
        entries: list[_Noted] = []
        self._noted.entries = entries
        try:
            with super()._tx(token, handoff=handoff) as tx:
                yield tx
        finally:
            self._noted.entries = None
            self._write_all(entries)

    def _take_owed(self, tx: Any, row: NegotiationRow | TransferRow, owed: str, actor: str) -> None:
        # A step taken inside a request's transaction that fails is undone and left to a worker,
        # which decides again and records that decision: the undone one's note goes with the step.
        pending: list[_Noted] | None = getattr(self._noted, "entries", None)
        mark = len(pending) if pending is not None else 0
        try:
            super()._take_owed(tx, row, owed, actor)
        except Exception:
            if pending is not None and tx.handed:
                del pending[mark:]
            raise

    def _write_all(self, noted: list[_Noted]) -> None:
        """The decisions of one transaction in one durable append (all or none), not an fsync each."""
        batch = AuditBatch(self._audit_log.record, self._audit_log.append_many, self.clock)
        for e in noted:  # the one shape of a decision entry stays `record_decision`'s
            record_decision(
                batch,
                e.actor,
                e.subject,
                e.decision,
                scenario_id=e.scenario_id,
                agreement_id=e.agreement_id,
                details=e.details,
            )
        batch.flush()

    def _decide(self, tx: Any, row: NegotiationRow, actor: str) -> None:
        dataset = tx.dataset(row.dataset_id or "")
        ok, reasons = policy_acceptable(row.offer, dataset.offer)
        self._note(
            _Noted(
                actor,
                row.id,
                Decision(ok, tuple(reasons) or (("the request matches the offer",) if ok else ())),
                _scenario(row.offer),
                None,
                {"phase": "negotiation", "check": "request-within-offer", "dataset_id": row.dataset_id},
            )
        )
        super()._decide(tx, row, actor)

    def visible(self, caller: str, row: DatasetRow) -> bool:
        """Catalog time: a dataset is listed only to a caller its offer could be granted to (purpose,
        consumer type, role and jurisdiction; job-time terms deferred). The decision is audited."""
        d = self.gate.decide(row.offer, row.id, caller, Phase.CATALOG)
        details = {
            "phase": "catalog",
            "check": "visibility",
            "dataset_id": row.id,
            "consumer_id": caller,
            "output_types": list(d.output_types),
        }
        self._note(_Noted(caller, row.id, d.decision, d.scenario_id, None, details))
        return d.allowed

    def _negotiation_step(
        self,
        tx: Any,
        row: NegotiationRow,
        role: DspRole,
        action: str,
        actor: str,
        offer: Mapping[str, Any] | None,
        reason: str,
    ) -> None:
        if role is not DspRole.PROVIDER or action not in ("approve", "agree"):
            super()._negotiation_step(tx, row, role, action, actor, offer, reason)
            return
        d = self.gate.decide(row.offer, row.dataset_id or "", row.counterparty_id, Phase.NEGOTIATION)
        details = {
            "phase": "negotiation",
            "check": "contract",
            "dataset_id": row.dataset_id,
            "consumer_id": row.counterparty_id,
            "output_types": list(d.output_types),
        }
        if d.allowed:
            super()._negotiation_step(tx, row, role, action, actor, offer, reason)
        else:
            why = ("policy denies: " + "; ".join(d.decision.reasons))[:1000]
            super()._negotiation_step(tx, row, role, "reject", actor, None, why)
        self._note(_Noted(actor, row.id, d.decision, d.scenario_id, row.agreement_id, details))

    def _transfer_step(
        self,
        tx: Any,
        row: TransferRow,
        role: DspRole,
        action: str,
        actor: str,
        reason: str,
        **kwargs: Any,
    ) -> None:
        if role is not DspRole.PROVIDER or action != "start":
            super()._transfer_step(tx, row, role, action, actor, reason, **kwargs)
            return
        agreement = self.store.agreement(tx.s, row.agreement_id)
        start = agreement.signed_at
        start = start.replace(tzinfo=UTC) if start.tzinfo is None else start
        d = self.gate.decide(
            agreement.policy, agreement.dataset_id, row.counterparty_id, Phase.TRANSFER, start
        )
        details = {
            "phase": "transfer",
            "check": "transfer-start",
            "dataset_id": agreement.dataset_id,
            "consumer_id": row.counterparty_id,
            "output_types": list(d.output_types),
        }
        self._note(_Noted(actor, row.id, d.decision, d.scenario_id, agreement.id, details))
        if d.allowed:
            super()._transfer_step(tx, row, role, action, actor, reason, **kwargs)
        else:
            why = ("policy denies: " + "; ".join(d.decision.reasons))[:1000]
            super()._transfer_step(tx, row, role, "terminate", actor, why)


def _scenario(policy: Mapping[str, Any]) -> str | None:
    try:
        named = scenarios_of(compile_policy(policy))
    except HealthspaceError:
        return None
    return next(iter(named)) if len(named) == 1 else None


@dataclass
class WithdrawalRetirer:
    """Retires the provider agreements a consent withdrawal leaves unable to hold, at once.

    For the scenario withdrawn from, an unretired agreement (we are provider) is retired when
    (a) its policy carries an `obtainConsent` duty: it promised per-patient consent for record-level
    output, and a patient has now withdrawn it (simple and strict: any withdrawal on the scenario); or
    (b) it has a `minCellSize` floor above the number of patients still consenting to the scenario for
    any data class: no job under it can release a single cell any more.
    Its live transfers are terminated by `retire_agreement`; both appear in the audit log.
    """

    service: DspService
    consent: ConsentService
    actor: str
    retired: list[str] = field(default_factory=list)

    def __call__(self, event: WithdrawalEvent) -> None:
        remaining: int | None = None
        for a in self.service.list_agreements():
            if a.role != DspRole.PROVIDER.value or a.retired_at is not None:
                continue
            if _scenario(a.policy) != event.scenario_id:
                continue
            why = None
            if _has_duty(a.policy, "obtainConsent"):
                why = f"consent withdrawn for scenario {event.scenario_id} (the agreement requires consent)"
            else:
                floor = _min_cell_size(a.policy)
                if floor is not None:
                    if remaining is None:
                        remaining = self.consent.consenting_count(event.scenario_id, actor=self.actor)
                    if remaining < floor:
                        why = (
                            f"consent withdrawn: {remaining} patients consent to {event.scenario_id}, "
                            f"below the agreement's minimum cell size {floor}"
                        )
            if why is not None:
                try:
                    self.service.retire_agreement(self.actor, a.id, why)
                    self.retired.append(a.id)
                except ConflictError:
                    pass  # retired meanwhile by someone else: the outcome wanted


def _rules_of(policy: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out: list[Mapping[str, Any]] = []
    for key in ("permission", "obligation"):
        rules = policy.get(key) or policy.get(f"odrl:{key}") or []
        out.extend(r for r in (rules if isinstance(rules, list) else [rules]) if isinstance(r, Mapping))
    return out


def _term(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("@id", value.get("@value", ""))
    text = str(value)
    return text.split(":", 1)[1] if text.startswith("odrl:") else text


def _has_duty(policy: Mapping[str, Any], action: str) -> bool:
    for rule in _rules_of(policy):
        if _term(rule.get("action")) == action:  # an obligation
            return True
        duties = rule.get("duty") or []
        if any(isinstance(d, Mapping) and _term(d.get("action")) == action for d in duties):
            return True
    return False


def _min_cell_size(policy: Mapping[str, Any]) -> int | None:
    """The largest `minCellSize` floor (gteq/gt/eq) a permission states, or None."""
    floors: list[int] = []

    def walk(constraints: Any) -> None:
        for c in constraints if isinstance(constraints, list) else []:
            if not isinstance(c, Mapping):
                continue
            for logical in ("and", "or", "xone"):
                walk(c.get(logical))
            if _term(c.get("leftOperand")) == "minCellSize":
                try:
                    n = int(_term(c.get("rightOperand")))
                except ValueError:
                    continue
                op = _term(c.get("operator"))
                if op in ("gteq", "eq"):
                    floors.append(n)
                elif op == "gt":
                    floors.append(n + 1)

    for rule in _rules_of(policy):
        walk(rule.get("constraint"))
    return max(floors) if floors else None
