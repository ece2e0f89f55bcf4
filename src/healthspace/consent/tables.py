"""SQLAlchemy tables of the consent registry: append-only decisions and the patients' receipt chains."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.db import Base, UtcDateTime

__all__ = ["ConsentDecisionRow", "ConsentReceiptRow"]

# SQLite has no INTEGER-sized BIGINT rowid alias: only "INTEGER PRIMARY KEY" autoincrements there.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")


class ConsentDecisionRow(Base):
    """One recorded decision. Rows are only ever inserted; the current view is derived by query."""

    __tablename__ = "consent_decisions"

    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    decision_id: Mapped[str] = mapped_column(String(64), unique=True)
    fhir_id: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    person_id: Mapped[int] = mapped_column(BigInteger)
    # The FHIR Patient id the person id derives from (null only on rows recorded before consent_0002).
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    scenario_id: Mapped[str] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(8))
    decided_at: Mapped[datetime] = mapped_column(UtcDateTime())
    valid_from: Mapped[datetime] = mapped_column(UtcDateTime())
    valid_until: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    class_mask: Mapped[int | None] = mapped_column(Integer, nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime())
    source: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(256))

    __table_args__ = (
        Index("ix_consent_decisions_scenario_person", "scenario_id", "person_id"),
        Index("ix_consent_decisions_person", "person_id"),
        CheckConstraint("decision IN ('permit', 'deny')", name="decision"),
    )


class ConsentReceiptRow(Base):
    """A signed receipt, chained per patient by `chain_seq` (the unique pair refuses a forked chain)."""

    __tablename__ = "consent_receipts"

    receipt_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    person_id: Mapped[int] = mapped_column(BigInteger)
    chain_seq: Mapped[int] = mapped_column(Integer)
    decision_id: Mapped[str] = mapped_column(String(64))
    document: Mapped[str] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (UniqueConstraint("person_id", "chain_seq", name="uq_consent_receipts_person_id"),)
