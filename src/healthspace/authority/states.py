"""Lifecycles at the authority: a participant's membership, a scenario's registration, an export approval."""

from __future__ import annotations

from healthspace.authority.models import ExportApprovalStatus, ParticipantStatus, ScenarioStatus
from healthspace.core.states import StateMachine

__all__ = ["EXPORT_APPROVAL", "PARTICIPANT", "SCENARIO"]

# Revocation is final: a participant that returns is onboarded again under a new credential.
PARTICIPANT = StateMachine("participant", {ParticipantStatus.ACTIVE: {ParticipantStatus.REVOKED}})

SCENARIO = StateMachine(
    "scenario",
    {
        ScenarioStatus.ACTIVE: {ScenarioStatus.SUSPENDED, ScenarioStatus.RETIRED},
        ScenarioStatus.SUSPENDED: {ScenarioStatus.ACTIVE, ScenarioStatus.RETIRED},
    },
)

# A revoked approval stays revoked; the holder files a new one. Expiry is a time, not a state.
EXPORT_APPROVAL = StateMachine(
    "export approval", {ExportApprovalStatus.ACTIVE: {ExportApprovalStatus.REVOKED}}
)
