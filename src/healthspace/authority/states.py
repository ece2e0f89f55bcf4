"""Lifecycles at the authority: a participant's membership and a scenario's registration."""

from __future__ import annotations

from healthspace.authority.models import ParticipantStatus, ScenarioStatus
from healthspace.core.states import StateMachine

__all__ = ["PARTICIPANT", "SCENARIO"]

# Revocation is final: a participant that returns is onboarded again under a new credential.
PARTICIPANT = StateMachine("participant", {ParticipantStatus.ACTIVE: {ParticipantStatus.REVOKED}})

SCENARIO = StateMachine(
    "scenario",
    {
        ScenarioStatus.ACTIVE: {ScenarioStatus.SUSPENDED, ScenarioStatus.RETIRED},
        ScenarioStatus.SUSPENDED: {ScenarioStatus.ACTIVE, ScenarioStatus.RETIRED},
    },
)
