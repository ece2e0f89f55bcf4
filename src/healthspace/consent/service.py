"""Consent registry use cases: record and withdraw decisions, read them, build cohorts, import and export.

The service owns the transactions, signs a receipt for every change, writes an audit entry for every
use case (the audit subject is the patient's pseudonym, never a person id or any clinical fact), and
tells withdrawal subscribers once a withdrawal is committed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy.orm import Session

from healthspace.audit.log import AuditLog, AuditRecorder
from healthspace.audit.models import Outcome, format_time
from healthspace.consent.fhir import ImportReport, PatientRefs, parse_ndjson, to_fhir
from healthspace.consent.filter import ConsentFilter
from healthspace.consent.models import (
    ConsentCheck,
    ConsentRecord,
    DecisionKind,
    Source,
    WithdrawalEvent,
    aware,
    check_consent,
    governing,
    mask_of,
)
from healthspace.consent.receipts import RECEIPT_FORMAT, digest_of, sign_receipt
from healthspace.consent.store import ConsentStore, SqlConsentStore, StoredReceipt
from healthspace.consent.tokens import IssuedPatientToken, PatientTokens
from healthspace.core.clock import Clock, SystemClock
from healthspace.core.db import Database
from healthspace.core.errors import AuthenticationError, ConflictError, NotFoundError, ValidationError
from healthspace.identity.keys import SigningKey

__all__ = ["Change", "ConsentService", "WithdrawalCallback", "pseudonym_key_from"]

log = logging.getLogger(__name__)
WithdrawalCallback = Callable[[WithdrawalEvent], None]
_PSEUDONYM_CONTEXT = b"healthspace-consent-pseudonym-key/1"
_RECEIPT_RETRIES = 3


def pseudonym_key_from(key: SigningKey) -> bytes:
    """A stable secret for patient pseudonyms, derived from the connector key (Ed25519 signatures are
    deterministic), so no second secret has to be configured and kept."""
    return hashlib.sha256(key.sign(_PSEUDONYM_CONTEXT)).digest()


@dataclass(frozen=True, slots=True)
class Change:
    """A committed change: the recorded decision and its signed receipt document."""

    record: ConsentRecord
    receipt: dict[str, Any]
    receipt_id: str


@dataclass(frozen=True)
class _CachedCohort:
    version: int
    since: datetime
    until: datetime | None
    cohort: ConsentFilter


class ConsentService:
    """The consent registry of one hospital connector.

    `key` signs receipts and patient tokens; `issuer` is the connector's participant id (named in
    receipts, tokens and FHIR exports); `refs` checks FHIR Patient ids and gives their person ids.

    Patients are named by their FHIR Patient id (`gz-pat-17`); the registry keys them by the person id
    the clinical store derives from it (`core.ids.person_id_for`), so cohorts join the store directly.
    """

    def __init__(
        self,
        db: Database,
        audit: AuditLog,
        key: SigningKey,
        issuer: str,
        refs: PatientRefs,
        *,
        clock: Clock | None = None,
        store: ConsentStore | None = None,
        pseudonym_key: bytes | None = None,
        token_ttl: timedelta = timedelta(days=90),
    ) -> None:
        self._db = db
        self._audit = audit
        self._key = key
        self.issuer = issuer
        self.refs = refs
        self._clock: Clock = clock or SystemClock()
        self._store: ConsentStore = store or SqlConsentStore()
        self._pseudonym_key = pseudonym_key or pseudonym_key_from(key)
        self.tokens = PatientTokens(key, issuer, self._clock)
        self._token_ttl = token_ttl
        self._callbacks: list[WithdrawalCallback] = []
        self._chain_lock = threading.Lock()
        # Cohorts by (scenario, classes): reused while no decision was committed and no recorded
        # validity period started or ended since (a job per second must not re-rank the registry).
        self._cohorts: dict[tuple[str, frozenset[str]], _CachedCohort] = {}

    @property
    def public_key(self) -> tuple[str, str]:
        """(key id, public key) that verifies this registry's receipts."""
        return self._key.key_id, self._key.public_key_b64

    def now(self) -> datetime:
        return self._clock.now()

    def person_id(self, patient_id: str) -> int:
        """The clinical store's person id of a FHIR Patient id of this hospital (`ValidationError` if not)."""
        return self.refs.person_id(patient_id)

    def pseudonym(self, patient_id: str) -> str:
        """The patient's pseudonym in audit entries and receipts."""
        return self._pseudonym(self.person_id(patient_id))

    def _pseudonym(self, person_id: int) -> str:
        # Keyed hash of the person id: stable across the patient's records, meaningless elsewhere.
        mac = hmac.new(self._pseudonym_key, f"person:{person_id}".encode(), hashlib.sha256)
        return "pt-" + mac.hexdigest()[:24]

    def _subject(self, person_id: int) -> str:
        return f"patient:{self._pseudonym(person_id)}"

    # --- withdrawal subscribers -------------------------------------------------------------------

    def on_withdrawal(self, callback: WithdrawalCallback) -> Callable[[], None]:
        """Call `callback` after each committed withdrawal; returns a function that unsubscribes it.

        Callbacks run in the withdrawing thread after the commit. A failing callback never undoes
        the withdrawal: it is logged and audited as a failure, and the other callbacks still run.
        """
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    # --- changes ------------------------------------------------------------------------------------

    def grant(
        self,
        patient_id: str,
        scenario_id: str,
        *,
        actor: str,
        source: Source,
        valid_from: datetime | None = None,
        valid_until: datetime | None = None,
        data_classes: Iterable[str] | None = None,
    ) -> Change:
        """Record a permit from now (a start in the past is moved to now: consent is never retroactive)."""
        return self._change(
            patient_id, scenario_id, DecisionKind.PERMIT, actor, source, valid_from, valid_until, data_classes
        )

    def deny(self, patient_id: str, scenario_id: str, *, actor: str, source: Source) -> Change:
        """Record a deny from now (also what a withdrawal records)."""
        return self._change(patient_id, scenario_id, DecisionKind.DENY, actor, source, None, None, None)

    def withdraw(self, patient_id: str, scenario_id: str, *, actor: str, source: Source) -> Change:
        """Withdraw consent at once: a deny from now, audited; then subscribers are told."""
        person_id = self.person_id(patient_id)
        change = self._change(
            patient_id,
            scenario_id,
            DecisionKind.DENY,
            actor,
            source,
            None,
            None,
            None,
            action="consent.withdraw",
        )
        event = WithdrawalEvent(
            person_id,
            self._pseudonym(person_id),
            scenario_id,
            change.record.decided_at,
            change.record.decision_id,
        )
        for cb in list(self._callbacks):
            try:
                cb(event)
            except Exception as exc:  # a subscriber's fault must not stop the others
                log.exception("withdrawal subscriber failed")
                self._audit.record(
                    "connector",
                    "consent.withdrawal.notify",
                    self._subject(person_id),
                    Outcome.FAILURE,
                    f"a withdrawal subscriber failed: {type(exc).__name__}",
                    scenario_id=scenario_id,
                )
        return change

    def _change(
        self,
        patient_id: str,
        scenario_id: str,
        decision: DecisionKind,
        actor: str,
        source: Source,
        valid_from: datetime | None,
        valid_until: datetime | None,
        data_classes: Iterable[str] | None,
        action: str | None = None,
    ) -> Change:
        person_id = self.person_id(patient_id)
        now = self._clock.now()
        start = now if valid_from is None else max(aware(valid_from, "valid_from"), now)
        decision_id = uuid.uuid4().hex
        record = ConsentRecord(
            person_id=person_id,
            patient_id=patient_id,
            scenario_id=scenario_id,
            decision=decision,
            decided_at=now,
            valid_from=start,
            valid_until=valid_until,
            data_classes=None if data_classes is None else frozenset(data_classes),
            decision_id=decision_id,
            # Its FHIR id too, so importing an export of this registry back into it changes nothing.
            fhir_id=decision_id,
            recorded_at=now,
            source=source,
            actor=actor,
        )
        action = action or f"consent.{decision.value}"
        for attempt in range(_RECEIPT_RETRIES):
            try:
                with self._chain_lock, self._db.session() as s:
                    stored = self._store.append_one(s, record)
                    receipt_id, document = self._issue_receipt(s, stored)
                break
            except ConflictError:
                # Another process extended this patient's receipt chain between our read and write.
                if attempt == _RECEIPT_RETRIES - 1:
                    raise
                decision_id = uuid.uuid4().hex
                record = replace(record, decision_id=decision_id, fhir_id=decision_id)
        # Audited after the commit: the audit log may share this SQLite file, whose one writer lock the
        # open transaction holds; and a withdrawal must take effect even while the audit log is down
        # (the caller then gets AuditUnavailableError, but the patient is already excluded).
        self._audit.record(
            actor,
            action,
            self._subject(person_id),
            Outcome.SUCCESS,
            f"{decision.value} recorded ({source.value})",
            scenario_id=scenario_id,
            details={"decision_id": stored.decision_id, "receipt_id": receipt_id},
        )
        return Change(stored, document, receipt_id)

    def _issue_receipt(self, s: Any, record: ConsentRecord) -> tuple[str, dict[str, Any]]:
        last: StoredReceipt | None = self._store.last_receipt(s, record.person_id)
        receipt_id = uuid.uuid4().hex
        chain_seq = 0 if last is None else last.chain_seq + 1
        payload: dict[str, Any] = {
            "format": RECEIPT_FORMAT,
            "receipt_id": receipt_id,
            "issuer": self.issuer,
            "patient": self._pseudonym(record.person_id),
            "scenario_id": record.scenario_id,
            "decision": record.decision.value,
            "decided_at": format_time(record.decided_at),
            "valid_from": format_time(record.valid_from),
            "valid_until": None if record.valid_until is None else format_time(record.valid_until),
            "data_classes": None if record.data_classes is None else sorted(record.data_classes),
            "decision_id": record.decision_id,
            "chain_seq": chain_seq,
            "previous_receipt_hash": None if last is None else last.digest,
        }
        document = sign_receipt(self._key, payload)
        self._store.add_receipt(
            s,
            StoredReceipt(
                receipt_id=receipt_id,
                person_id=record.person_id,
                chain_seq=chain_seq,
                decision_id=record.decision_id,
                document=orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode(),
                digest=digest_of(document),
                issued_at=record.decided_at,
            ),
        )
        return receipt_id, document

    # --- reading ----------------------------------------------------------------------------------

    def history(self, patient_id: str, *, actor: str, scenario_id: str | None = None) -> list[ConsentRecord]:
        """Every recorded decision of a patient (optionally on one scenario), oldest first."""
        person_id = self.person_id(patient_id)
        with self._db.session() as s:
            out = self._store.history(s, person_id, scenario_id)
        self._audit.record(
            actor, "consent.history.read", self._subject(person_id), Outcome.SUCCESS, scenario_id=scenario_id
        )
        return out

    def current(
        self, patient_id: str, *, actor: str, at: datetime | None = None
    ) -> dict[str, ConsentRecord | None]:
        """Per scenario the patient ever decided on, the record governing `at` (None: nothing in force)."""
        person_id = self.person_id(patient_id)
        at = aware(at, "at") if at is not None else self._clock.now()
        with self._db.session() as s:
            records = self._store.history(s, person_id)
        by_scenario: dict[str, list[ConsentRecord]] = {}
        for r in records:
            by_scenario.setdefault(r.scenario_id, []).append(r)
        self._audit.record(actor, "consent.current.read", self._subject(person_id), Outcome.SUCCESS)
        return {sc: governing(rs, at) for sc, rs in by_scenario.items()}

    def check(
        self,
        patient_id: str,
        scenario_id: str,
        data_classes: Iterable[str],
        *,
        actor: str,
        at: datetime | None = None,
    ) -> ConsentCheck:
        """One patient's consent decision; any error in the check is a deny (fail closed), audited."""
        person_id = self.person_id(patient_id)
        try:
            at = aware(at, "at") if at is not None else self._clock.now()
            with self._db.session() as s:
                records = self._store.history(s, person_id, scenario_id)
            result = check_consent(records, scenario_id, at, data_classes)
        except Exception as exc:
            log.warning("consent check failed; denying", exc_info=exc)
            result = ConsentCheck(False, (f"the consent check failed ({type(exc).__name__}); denied",))
        self._audit.record(
            actor,
            "consent.check",
            self._subject(person_id),
            Outcome.ALLOWED if result.allowed else Outcome.DENIED,
            "; ".join(result.reasons),
            scenario_id=scenario_id,
        )
        return result

    @property
    def database(self) -> Database:
        """The database the registry lives in (a caller sharing it may pass its session to `cohort`)."""
        return self._db

    def cohort(
        self,
        scenario_id: str,
        data_classes: Iterable[str],
        *,
        actor: str,
        at: datetime | None = None,
        record: AuditRecorder | None = None,
        session: Session | None = None,
    ) -> ConsentFilter:
        """The consenting cohort for a use: one SQL query over the whole registry, no per-patient trips.

        Raises on any failure, so a job that cannot get its cohort cannot run (never "everyone").
        The `consent.cohort` entry goes to `record` when given (the data plane passes its job's
        batch, committed with the job's other entries when the job ends), else to the audit log now.
        `session`, a transaction on this registry's `database`, is read in instead of one of its own
        (the data plane's job transaction: one transaction per job fewer); only reads are made in it.
        """
        classes = frozenset(data_classes)
        if not classes:
            raise ValidationError("name the data classes the use reads (at least one)")
        mask_of(classes)
        at = aware(at, "at") if at is not None else self._clock.now()
        if session is not None:
            cohort = self._cohort_in(session, scenario_id, classes, at)
        else:
            with self._db.session() as s:
                cohort = self._cohort_in(s, scenario_id, classes, at)
        ids = cohort.person_ids
        (record or self._audit.record)(
            actor,
            "consent.cohort",
            f"scenario:{scenario_id}",
            Outcome.SUCCESS,
            scenario_id=scenario_id,
            details={"patients": len(ids), "data_classes": sorted(classes), "at": format_time(at)},
        )
        return cohort

    def _cohort_in(
        self, s: Session, scenario_id: str, classes: frozenset[str], at: datetime
    ) -> ConsentFilter:
        key = (scenario_id, classes)
        # The version is read first: a decision committed after this read changes it, so a cohort
        # computed from newer rows is only ever filed under an older version (a miss next time).
        version = self._store.version(s)
        hit = self._cohorts.get(key)
        if (
            hit is not None
            and hit.version == version
            and hit.since <= at
            and (hit.until is None or at < hit.until)
        ):
            return replace(hit.cohort, at=at)
        cohort = ConsentFilter.of(scenario_id, at, classes, self._store.cohort(s, scenario_id, at, classes))
        until = self._store.next_change(s, scenario_id, at)
        self._cohorts[key] = _CachedCohort(version, at, until, cohort)
        return cohort

    def consenting_count(self, scenario_id: str, *, actor: str, at: datetime | None = None) -> int:
        """How many patients have a permit for `scenario_id` in force at `at`, for any data class.

        The upper bound of every cohort of the scenario: when it is below an agreement's minimum cell
        size, no job under that agreement can release a cell.
        """
        at = aware(at, "at") if at is not None else self._clock.now()
        with self._db.session() as s:
            # An empty class set is mask 0, which every permit covers.
            n = len(self._store.cohort(s, scenario_id, at, ()))
        self._audit.record(
            actor,
            "consent.cohort",
            f"scenario:{scenario_id}",
            Outcome.SUCCESS,
            scenario_id=scenario_id,
            details={"patients": n, "data_classes": "any", "at": format_time(at)},
        )
        return n

    # --- receipts and tokens ------------------------------------------------------------------------

    def receipts(self, patient_id: str, *, actor: str) -> list[StoredReceipt]:
        person_id = self.person_id(patient_id)
        with self._db.session() as s:
            out = self._store.receipts(s, person_id)
        self._audit.record(actor, "consent.receipts.read", self._subject(person_id), Outcome.SUCCESS)
        return out

    def receipt(self, patient_id: str, receipt_id: str, *, actor: str) -> dict[str, Any]:
        """One receipt document of this patient; another patient's receipt is `NotFoundError` too."""
        person_id = self.person_id(patient_id)
        with self._db.session() as s:
            r = self._store.receipt(s, receipt_id)
        if r is None or r.person_id != person_id:
            self._audit.record(
                actor, "consent.receipt.read", self._subject(person_id), Outcome.FAILURE, "not found"
            )
            raise NotFoundError("no such receipt")
        self._audit.record(actor, "consent.receipt.read", self._subject(person_id), Outcome.SUCCESS)
        doc: dict[str, Any] = orjson.loads(r.document)
        return doc

    def issue_patient_token(
        self, patient_id: str, *, actor: str, ttl: timedelta | None = None
    ) -> IssuedPatientToken:
        person_id = self.person_id(patient_id)
        issued = self.tokens.issue(patient_id, ttl or self._token_ttl)
        self._audit.record(actor, "consent.token.issue", self._subject(person_id), Outcome.SUCCESS)
        return issued

    def authenticate_patient(self, token: str | None) -> str:
        """The FHIR Patient id of a valid patient token; a refused token is audited (without the token)."""
        try:
            subject = self.tokens.authenticate(token)
            try:
                return self.refs.patient_id(subject)
            except ValidationError:  # signed by us, but for no patient of this registry
                raise AuthenticationError("the patient token is not valid", reason="token-invalid") from None
        except AuthenticationError as exc:
            self._audit.record(
                "unauthenticated",
                "consent.patient.authenticate",
                "consent-patient-api",
                Outcome.DENIED,
                str(exc.extra.get("reason", exc.code)),
            )
            raise

    # --- FHIR ---------------------------------------------------------------------------------------

    def import_ndjson(self, lines: Iterable[bytes], *, actor: str, batch: int = 5000) -> ImportReport:
        """Import FHIR R4 Consent NDJSON, streaming, in batches; idempotent on the resource id.

        A resource id seen before with the same decision is `unchanged`; with a different one it is a
        `conflict` and is not applied (history is append-only). Malformed resources are `rejected` with
        their reason. Imported history gets no receipts (the hospital's own records are its evidence).
        """
        report = ImportReport()
        pending: dict[str, ConsentRecord] = {}

        def flush() -> None:
            if not pending:
                return
            now = self._clock.now()
            with self._db.session() as s:
                known = self._store.by_fhir_ids(s, pending)
                new = []
                for fid, rec in pending.items():
                    old = known.get(fid)
                    if old is None:
                        new.append(replace(rec, decision_id=uuid.uuid4().hex, recorded_at=now, actor=actor))
                    elif old.same_decision(rec):
                        report.unchanged += 1
                    else:
                        report.conflicts += 1
                self._store.append(s, new)
            report.imported += len(new)
            pending.clear()

        try:
            for _, rec in parse_ndjson(lines, self.refs, report):
                fid = rec.fhir_id or ""
                earlier = pending.get(fid)
                if earlier is not None:
                    if earlier.same_decision(rec):
                        report.unchanged += 1
                    else:
                        report.conflicts += 1
                    continue
                pending[fid] = rec
                if len(pending) >= batch:
                    flush()
            flush()
        finally:
            self._audit.record(
                actor,
                "consent.import",
                "consent-registry",
                Outcome.SUCCESS if report.rejected == 0 and report.conflicts == 0 else Outcome.FAILURE,
                f"{report.imported} imported, {report.unchanged} unchanged, {report.conflicts} conflicts, "
                f"{report.rejected} rejected",
                details={k: v for k, v in report.to_json().items() if k != "rejections"},
            )
        return report

    def export_ndjson(self, *, actor: str, patient_id: str | None = None) -> Iterator[bytes]:
        """The registry (or one patient's history) as FHIR R4 Consent NDJSON, one record per line."""
        person_id = None if patient_id is None else self.person_id(patient_id)
        now = self._clock.now()
        subject = "consent-registry" if person_id is None else self._subject(person_id)
        self._audit.record(actor, "consent.export", subject, Outcome.SUCCESS)
        with self._db.session() as s:
            for rec in self._store.scan(s, person_id):
                yield orjson.dumps(to_fhir(rec, self.refs, now, self.issuer)) + b"\n"
