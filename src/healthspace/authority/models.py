"""Domain types of the data space authority: participants, usage scenarios and export approvals."""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = [
    "ExportApprovalCreate",
    "ExportApprovalPublic",
    "ExportApprovalStatus",
    "OutputType",
    "ParticipantCreate",
    "ParticipantPublic",
    "ParticipantStatus",
    "ScenarioCreate",
    "ScenarioPublic",
    "ScenarioStatus",
]

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,62}[a-z0-9]$")]


class ParticipantStatus(StrEnum):
    ACTIVE = "ACTIVE"
    REVOKED = "REVOKED"


class ScenarioStatus(StrEnum):
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    RETIRED = "RETIRED"


class OutputType(StrEnum):
    """What may leave a provider under a scenario (the policy profile uses the same terms)."""

    AGGREGATE = "aggregate"
    DEIDENTIFIED_EXTRACT = "deidentified-extract"
    MODEL = "model"


class ParticipantCreate(BaseModel):
    """What the operator states when admitting a participant. The public key comes from the participant."""

    model_config = ConfigDict(extra="forbid")

    id: Slug = Field(description="Stable participant id, e.g. 'gz-pearl-river-hospital'.")
    legal_name: str = Field(min_length=2, max_length=200)
    type: str = Field(description="hospital, health_bureau, university, company, service_provider, regulator")
    jurisdiction: str = Field(description="e.g. CN-GD, HK, MO")
    roles: list[str] = Field(default_factory=list)
    public_key: str = Field(description="Ed25519 public key, raw 32 bytes, urlsafe base64 without padding")
    connector_url: AnyHttpUrl | None = None


class ParticipantPublic(BaseModel):
    id: str
    legal_name: str
    type: str
    jurisdiction: str
    roles: list[str]
    public_key: str
    connector_url: str | None
    status: ParticipantStatus
    credential_id: str
    credential_expires_at: datetime
    onboarded_at: datetime
    revoked_at: datetime | None = None
    revocation_reason: str | None = None


class ScenarioCreate(BaseModel):
    """A registered usage scenario: every use of data is bound to one ("one scenario, one authorization")."""

    model_config = ConfigDict(extra="forbid")

    id: Slug
    title: str = Field(min_length=3, max_length=200)
    description: str = ""
    purpose_code: str = Field(
        min_length=2,
        max_length=100,
        description="Purpose of use, e.g. HL7 v3 PurposeOfUse 'HRESCH' (research)",
    )
    data_classes: list[str] = Field(min_length=1, description="Data classes the scenario may use")
    output_types: list[OutputType] = Field(min_length=1)
    approving_body: str = Field(min_length=2, max_length=200)
    approval_reference: str = Field(min_length=2, max_length=200)
    valid_from: date
    valid_until: date

    @model_validator(mode="after")
    def _period_is_ordered(self) -> ScenarioCreate:
        if self.valid_until < self.valid_from:
            raise ValueError("valid_until is before valid_from")
        return self


class ScenarioPublic(ScenarioCreate):
    status: ScenarioStatus
    registered_at: datetime


class ExportApprovalStatus(StrEnum):
    ACTIVE = "ACTIVE"
    REVOKED = "REVOKED"


class ExportApprovalCreate(BaseModel):
    """A registered export approval (e.g. a CAC security assessment or standard contract filing, a Macao
    DSPDP authorisation): record-level output of `dataset_id` held by `provider_id` may go to
    `consumer_id` for `scenario_id` until `expires_at`."""

    model_config = ConfigDict(extra="forbid")

    provider_id: str = Field(min_length=1, max_length=64, description="participant holding the dataset")
    dataset_id: str = Field(min_length=1, max_length=200)
    consumer_id: str = Field(min_length=1, max_length=64)
    scenario_id: str = Field(min_length=1, max_length=64)
    reference: str = Field(min_length=2, max_length=200, description="the approval's official reference")
    expires_at: datetime

    @model_validator(mode="after")
    def _expiry_has_a_zone(self) -> ExportApprovalCreate:
        if self.expires_at.tzinfo is None or self.expires_at.utcoffset() is None:
            raise ValueError("expires_at needs a time zone")
        return self


class ExportApprovalPublic(ExportApprovalCreate):
    id: str
    status: ExportApprovalStatus
    registered_at: datetime
    registered_by: str
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
