"""SQLAlchemy tables of the compute context: the privacy budget ledger and the recent-cohort memory."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.db import Base, UtcDateTime

__all__ = ["BudgetAccountRow", "BudgetSpendRow", "CohortHistoryRow"]

_SEQ = BigInteger().with_variant(Integer(), "sqlite")


class BudgetAccountRow(Base):
    """ε spent per consumer x scenario x dataset, in micro-ε so sums are exact integers."""

    __tablename__ = "compute_budget_accounts"

    consumer_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    scenario_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    spent_micro: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class BudgetSpendRow(Base):
    """One charge, keyed by job id so a job is never charged twice."""

    __tablename__ = "compute_budget_spends"

    job_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    consumer_id: Mapped[str] = mapped_column(String(256), nullable=False)
    scenario_id: Mapped[str] = mapped_column(String(200), nullable=False)
    dataset_id: Mapped[str] = mapped_column(String(200), nullable=False)
    epsilon_micro: Mapped[int] = mapped_column(BigInteger, nullable=False)
    spent_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class CohortHistoryRow(Base):
    """A person set behind a released figure (sorted ids, delta-encoded, zlib), kept on the provider only."""

    __tablename__ = "compute_cohort_history"
    __table_args__ = (
        # The guard's per-job read (dataset, size range, window, digest) from the index alone: in the
        # row, SQLite stores the ids blob (~190 KB for 24,000 persons) ahead of the later columns.
        Index("ix_compute_cohort_history_near", "dataset_id", "size", "recorded_at", "digest"),
    )

    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(String(200), nullable=False)
    consumer_id: Mapped[str] = mapped_column(String(256), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    ids: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    # SHA-256 of the sorted ids as little-endian int64 (`digest_ids`); NULL on rows stored before the
    # column existed, which the guard then compares by their ids.
    digest: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
