"""Use cases of the data space authority: admit and revoke participants, register scenarios.

Each public method is one transaction and leaves one audit entry, whether it succeeds or is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select

from healthspace.audit.log import AuditLog
from healthspace.audit.models import Outcome
from healthspace.authority.models import (
    ParticipantCreate,
    ParticipantPublic,
    ParticipantStatus,
    ScenarioCreate,
    ScenarioPublic,
    ScenarioStatus,
)
from healthspace.authority.states import PARTICIPANT, SCENARIO
from healthspace.authority.tables import ParticipantRow, ScenarioRow
from healthspace.core.clock import Clock
from healthspace.core.db import Database
from healthspace.core.errors import ConflictError, HealthspaceError, NotFoundError, ValidationError
from healthspace.identity.credentials import CredentialClaims, issue_credential
from healthspace.identity.keys import SigningKey
from healthspace.identity.revocation import RevocationList, sign_revocation_list

__all__ = ["AuthorityService"]

T = TypeVar("T")


def _participant(row: ParticipantRow) -> ParticipantPublic:
    return ParticipantPublic(
        id=row.id,
        legal_name=row.legal_name,
        type=row.type,
        jurisdiction=row.jurisdiction,
        roles=list(row.roles),
        public_key=row.public_key,
        connector_url=row.connector_url,
        status=ParticipantStatus(row.status),
        credential_id=row.credential_id,
        credential_expires_at=row.credential_expires_at,
        onboarded_at=row.onboarded_at,
        revoked_at=row.revoked_at,
        revocation_reason=row.revocation_reason,
    )


def _scenario(row: ScenarioRow) -> ScenarioPublic:
    return ScenarioPublic(
        id=row.id,
        title=row.title,
        description=row.description,
        purpose_code=row.purpose_code,
        data_classes=list(row.data_classes),
        output_types=list(row.output_types),
        approving_body=row.approving_body,
        approval_reference=row.approval_reference,
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        status=ScenarioStatus(row.status),
        registered_at=row.registered_at,
    )


class AuthorityService:
    def __init__(
        self,
        db: Database,
        key: SigningKey,
        authority_id: str,
        audit: AuditLog,
        clock: Clock,
        credential_ttl: timedelta = timedelta(days=365),
    ) -> None:
        self._db = db
        self._key = key
        self.authority_id = authority_id
        self._audit = audit
        self._clock = clock
        self._credential_ttl = credential_ttl

    # --- audit -----------------------------------------------------------------------------------
    def _audited(self, actor: str, action: str, subject: str, work: Callable[[], T]) -> T:
        """Run `work`; record success, or the refusal with its reason, and re-raise refusals."""
        try:
            result = work()
        except HealthspaceError as exc:
            self._audit.record(actor, action, subject, Outcome.FAILURE, exc.detail)
            raise
        self._audit.record(actor, action, subject, Outcome.SUCCESS, "")
        return result

    # --- participants ----------------------------------------------------------------------------
    def onboard(self, req: ParticipantCreate, actor: str) -> tuple[ParticipantPublic, str]:
        """Admit a participant and issue its membership credential (returned once, as a signed token)."""

        def work() -> tuple[ParticipantPublic, str]:
            now = self._clock.now()
            try:
                claims = CredentialClaims(
                    participant_id=req.id,
                    legal_name=req.legal_name,
                    participant_type=req.type,
                    jurisdiction=req.jurisdiction,
                    roles=req.roles,
                    public_key=req.public_key,
                )
            except PydanticValidationError as exc:
                raise ValidationError(
                    "participant is not valid: "
                    + "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                ) from None
            with self._db.session() as s:
                if s.get(ParticipantRow, req.id) is not None:
                    raise ConflictError(f"participant {req.id!r} is already registered")
                token, credential = issue_credential(
                    self._key, self.authority_id, claims, now, self._credential_ttl
                )
                row = ParticipantRow(
                    id=req.id,
                    legal_name=req.legal_name,
                    type=credential.participant_type,
                    jurisdiction=credential.jurisdiction,
                    roles=list(credential.roles),
                    public_key=req.public_key,
                    connector_url=str(req.connector_url).rstrip("/") if req.connector_url else None,
                    status=ParticipantStatus.ACTIVE.value,
                    credential_id=credential.credential_id,
                    credential_expires_at=credential.expires_at,
                    onboarded_at=now,
                )
                s.add(row)
                s.flush()
                return _participant(row), token

        return self._audited(actor, "participant.onboard", req.id, work)

    def list_participants(self) -> list[ParticipantPublic]:
        with self._db.session() as s:
            return [_participant(r) for r in s.scalars(select(ParticipantRow).order_by(ParticipantRow.id))]

    def get_participant(self, participant_id: str) -> ParticipantPublic:
        with self._db.session() as s:
            row = s.get(ParticipantRow, participant_id)
            if row is None:
                raise NotFoundError(f"no participant {participant_id!r}")
            return _participant(row)

    def revoke(self, participant_id: str, reason: str, actor: str) -> ParticipantPublic:
        """Revoke a participant's membership: its credential appears in the next revocation list."""

        def work() -> ParticipantPublic:
            if not reason.strip():
                raise ValidationError("a revocation needs a reason")
            with self._db.session() as s:
                row = s.get(ParticipantRow, participant_id, with_for_update=True)
                if row is None:
                    raise NotFoundError(f"no participant {participant_id!r}")
                row.status = PARTICIPANT.transition(ParticipantStatus(row.status), ParticipantStatus.REVOKED)
                row.revoked_at = self._clock.now()
                row.revocation_reason = reason
                return _participant(row)

        return self._audited(actor, "participant.revoke", participant_id, work)

    def revocation_list(self) -> str:
        """The current revocation list, signed by the authority (connectors fetch and cache it)."""
        with self._db.session() as s:
            rows = s.execute(
                select(ParticipantRow.id, ParticipantRow.credential_id).where(
                    ParticipantRow.status == ParticipantStatus.REVOKED.value
                )
            ).all()
        rl = RevocationList(
            issuer=self.authority_id,
            issued_at=self._clock.now(),
            credential_ids=sorted(r.credential_id for r in rows),
            participant_ids=sorted(r.id for r in rows),
        )
        return sign_revocation_list(self._key, rl)

    def is_revoked(self, credential_id: str, participant_id: str) -> bool:
        with self._db.session() as s:
            row = s.get(ParticipantRow, participant_id)
            return (
                row is None
                or row.status != ParticipantStatus.ACTIVE.value
                or row.credential_id != credential_id
            )

    # --- scenarios -------------------------------------------------------------------------------
    def register_scenario(self, req: ScenarioCreate, actor: str) -> ScenarioPublic:
        def work() -> ScenarioPublic:
            with self._db.session() as s:
                if s.get(ScenarioRow, req.id) is not None:
                    raise ConflictError(f"scenario {req.id!r} is already registered")
                row = ScenarioRow(
                    id=req.id,
                    title=req.title,
                    description=req.description,
                    purpose_code=req.purpose_code,
                    data_classes=list(req.data_classes),
                    output_types=[o.value for o in req.output_types],
                    approving_body=req.approving_body,
                    approval_reference=req.approval_reference,
                    valid_from=req.valid_from,
                    valid_until=req.valid_until,
                    status=ScenarioStatus.ACTIVE.value,
                    registered_at=self._clock.now(),
                )
                s.add(row)
                s.flush()
                return _scenario(row)

        return self._audited(actor, "scenario.register", req.id, work)

    def list_scenarios(self) -> list[ScenarioPublic]:
        with self._db.session() as s:
            return [_scenario(r) for r in s.scalars(select(ScenarioRow).order_by(ScenarioRow.id))]

    def get_scenario(self, scenario_id: str) -> ScenarioPublic:
        with self._db.session() as s:
            row = s.get(ScenarioRow, scenario_id)
            if row is None:
                raise NotFoundError(f"no scenario {scenario_id!r}")
            return _scenario(row)

    def set_scenario_status(self, scenario_id: str, status: ScenarioStatus, actor: str) -> ScenarioPublic:
        def work() -> ScenarioPublic:
            with self._db.session() as s:
                row = s.get(ScenarioRow, scenario_id, with_for_update=True)
                if row is None:
                    raise NotFoundError(f"no scenario {scenario_id!r}")
                row.status = SCENARIO.transition(ScenarioStatus(row.status), status)
                return _scenario(row)

        return self._audited(actor, f"scenario.{status.value.lower()}", scenario_id, work)
