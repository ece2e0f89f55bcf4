"""Tables of the authority's registry (branch "authority")."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import JSON, Date, DateTime, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.db import Base

__all__ = ["ParticipantRow", "ScenarioRow"]


class ParticipantRow(Base):
    __tablename__ = "participants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    legal_name: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(32))
    jurisdiction: Mapped[str] = mapped_column(String(16))
    roles: Mapped[list[str]] = mapped_column(JSON)
    public_key: Mapped[str] = mapped_column(String(64))
    connector_url: Mapped[str | None] = mapped_column(String(500), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    credential_id: Mapped[str] = mapped_column(String(64), unique=True)
    credential_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    onboarded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revocation_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class ScenarioRow(Base):
    __tablename__ = "scenarios"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text)
    purpose_code: Mapped[str] = mapped_column(String(100))
    data_classes: Mapped[list[str]] = mapped_column(JSON)
    output_types: Mapped[list[str]] = mapped_column(JSON)
    approving_body: Mapped[str] = mapped_column(String(200))
    approval_reference: Mapped[str] = mapped_column(String(200))
    valid_from: Mapped[date] = mapped_column(Date)
    valid_until: Mapped[date] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(16))
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
