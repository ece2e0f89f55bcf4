"""Use cases of the data space authority: participants, scenarios, export approvals, cross-border rules.

Each public method is one transaction and leaves one audit entry, whether it succeeds or is refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select

from healthspace.audit.log import AuditLog
from healthspace.audit.models import Outcome
from healthspace.authority.models import (
    ExportApprovalCreate,
    ExportApprovalPublic,
    ExportApprovalStatus,
    ParticipantCreate,
    ParticipantPublic,
    ParticipantStatus,
    ScenarioCreate,
    ScenarioPublic,
    ScenarioStatus,
)
from healthspace.authority.states import EXPORT_APPROVAL, PARTICIPANT, SCENARIO
from healthspace.authority.tables import ExportApprovalRow, ParticipantRow, ScenarioRow, StandardRow
from healthspace.core.clock import Clock
from healthspace.core.db import Database
from healthspace.core.errors import ConflictError, HealthspaceError, NotFoundError, ValidationError
from healthspace.data.profile import StandardProfile
from healthspace.identity.credentials import CredentialClaims, issue_credential
from healthspace.identity.keys import SigningKey
from healthspace.identity.revocation import RevocationList, sign_revocation_list
from healthspace.policy.crossborder import DEFAULT_RULES, ExportApproval, JurisdictionRules
from healthspace.policy.registry import sign_approvals, sign_rules

__all__ = ["AuthorityService"]

T = TypeVar("T")


def _participant(row: ParticipantRow) -> ParticipantPublic:
    return ParticipantPublic.model_validate(row, from_attributes=True)


def _scenario(row: ScenarioRow) -> ScenarioPublic:
    return ScenarioPublic.model_validate(row, from_attributes=True)


def _approval(row: ExportApprovalRow) -> ExportApprovalPublic:
    return ExportApprovalPublic.model_validate(row, from_attributes=True)


class AuthorityService:
    def __init__(
        self,
        db: Database,
        key: SigningKey,
        authority_id: str,
        audit: AuditLog,
        clock: Clock,
        credential_ttl: timedelta = timedelta(days=365),
        cross_border_rules: Mapping[str, JurisdictionRules] = DEFAULT_RULES,
    ) -> None:
        self._db = db
        self._key = key
        self.authority_id = authority_id
        self._audit = audit
        self._clock = clock
        self._credential_ttl = credential_ttl
        self.cross_border_rules = cross_border_rules

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

    # --- data standards --------------------------------------------------------------------------
    def publish_standard(self, document: Mapping[str, Any], actor: str) -> StandardProfile:
        """Publish a data collection standard (a new version of an id; a published version never changes)."""

        def work() -> StandardProfile:
            try:
                profile = StandardProfile.model_validate(dict(document))
            except PydanticValidationError as exc:
                raise ValidationError(
                    "standard is not valid: "
                    + "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                ) from None
            with self._db.session() as s:
                if s.get(StandardRow, (profile.id, profile.version)) is not None:
                    raise ConflictError(
                        f"standard {profile.id!r} version {profile.version!r} is already published; "
                        "publish a new version"
                    )
                s.add(
                    StandardRow(
                        id=profile.id,
                        version=profile.version,
                        title=profile.title,
                        document=profile.model_dump(mode="json"),
                        published_at=self._clock.now(),
                        published_by=actor,
                    )
                )
            return profile

        return self._audited(actor, "standard.publish", str(document.get("id", "?")), work)

    def standards(self) -> list[dict[str, Any]]:
        """Every published version: id, version, title, published_at (newest first per id)."""
        with self._db.session() as s:
            rows = s.scalars(select(StandardRow).order_by(StandardRow.id, StandardRow.published_at.desc()))
            return [
                {"id": r.id, "version": r.version, "title": r.title, "published_at": r.published_at}
                for r in rows
            ]

    def standard(self, standard_id: str, version: str | None = None) -> dict[str, Any]:
        """A published standard's document: the given version, or the latest published."""
        with self._db.session() as s:
            q = select(StandardRow).where(StandardRow.id == standard_id)
            if version is not None:
                q = q.where(StandardRow.version == version)
            row = s.scalars(q.order_by(StandardRow.published_at.desc()).limit(1)).first()
            if row is None:
                raise NotFoundError(
                    f"no published standard {standard_id!r}" + (f" version {version!r}" if version else "")
                )
            return dict(row.document)

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

    # --- cross-border rules and export approvals -----------------------------------------------------
    def signed_cross_border_rules(self) -> str:
        """The rule set connectors apply to cross-border transfers, signed (see policy.registry)."""
        return sign_rules(self._key, self.authority_id, self._clock.now(), self.cross_border_rules)

    def register_export_approval(self, req: ExportApprovalCreate, actor: str) -> ExportApprovalPublic:
        """Register an approval; provider, consumer and scenario must be registered, the expiry ahead."""

        def work() -> ExportApprovalPublic:
            now = self._clock.now()
            if req.expires_at <= now:
                raise ValidationError("the approval has already expired")
            with self._db.session() as s:
                for who in (req.provider_id, req.consumer_id):
                    if s.get(ParticipantRow, who) is None:
                        raise ValidationError(f"no participant {who!r} is registered")
                if s.get(ScenarioRow, req.scenario_id) is None:
                    raise ValidationError(f"no scenario {req.scenario_id!r} is registered")
                row = ExportApprovalRow(
                    id=f"xa-{uuid.uuid4().hex[:20]}",
                    **req.model_dump(),
                    status=ExportApprovalStatus.ACTIVE.value,
                    registered_at=now,
                    registered_by=actor,
                )
                s.add(row)
                s.flush()
                return _approval(row)

        subject = f"{req.provider_id}/{req.dataset_id} -> {req.consumer_id} ({req.reference})"
        return self._audited(actor, "export-approval.register", subject, work)

    def list_export_approvals(self, provider_id: str | None = None) -> list[ExportApprovalPublic]:
        with self._db.session() as s:
            q = select(ExportApprovalRow).order_by(ExportApprovalRow.registered_at, ExportApprovalRow.id)
            if provider_id is not None:
                q = q.where(ExportApprovalRow.provider_id == provider_id)
            return [_approval(r) for r in s.scalars(q)]

    def revoke_export_approval(self, approval_id: str, reason: str, actor: str) -> ExportApprovalPublic:
        def work() -> ExportApprovalPublic:
            if not reason.strip():
                raise ValidationError("a revocation needs a reason")
            with self._db.session() as s:
                row = s.get(ExportApprovalRow, approval_id, with_for_update=True)
                if row is None:
                    raise NotFoundError(f"no export approval {approval_id!r}")
                row.status = EXPORT_APPROVAL.transition(
                    ExportApprovalStatus(row.status), ExportApprovalStatus.REVOKED
                )
                row.revoked_at = self._clock.now()
                row.revocation_reason = reason
                return _approval(row)

        return self._audited(actor, "export-approval.revoke", approval_id, work)

    def signed_export_approvals(self, provider_id: str) -> str:
        """The active approvals for `provider_id`'s datasets, signed. Expired ones are kept in the list
        (a decision then says the approval expired); revoked ones are left out."""
        approvals = [
            ExportApproval(a.reference, a.dataset_id, a.consumer_id, a.scenario_id, a.expires_at)
            for a in self.list_export_approvals(provider_id)
            if a.status is ExportApprovalStatus.ACTIVE
        ]
        return sign_approvals(self._key, self.authority_id, self._clock.now(), provider_id, approvals)
