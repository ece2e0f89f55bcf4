"""SQLAlchemy table of the data plane: one row per job (migration branch "jobs")."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Float, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.db import Base, UtcDateTime

__all__ = ["JobRow"]


class JobRow(Base):
    """A job a consumer ran under an agreement; `result` holds the signed envelope (canonical JSON)."""

    __tablename__ = "dataplane_jobs"
    __table_args__ = (Index("ix_dataplane_jobs_agreement_state", "agreement_id", "state"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agreement_id: Mapped[str] = mapped_column(String(256), nullable=False)
    transfer_id: Mapped[str] = mapped_column(String(256), nullable=False)
    consumer_id: Mapped[str] = mapped_column(String(256), nullable=False)
    scenario_id: Mapped[str] = mapped_column(String(200), nullable=False)
    dataset_id: Mapped[str] = mapped_column(String(200), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "query" or "glm"
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    spec: Mapped[str] = mapped_column(Text, nullable=False)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    epsilon: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
