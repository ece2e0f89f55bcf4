"""SQLAlchemy tables of the data plane (migration branch "jobs"): jobs, token refreshes, output reviews,
GLM sessions."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.db import Base, UtcDateTime

__all__ = ["GlmSessionRow", "JobRow", "ReviewApprovalRow", "ReviewRow", "TokenRefreshRow"]


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
    # The connector process that ran it (`core.leases` instance id); NULL before several could.
    runner: Mapped[str | None] = mapped_column(String(200), nullable=True)


class TokenRefreshRow(Base):
    """A data-plane token that has been exchanged for a fresh one: each token refreshes once."""

    __tablename__ = "dataplane_token_refreshes"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    transfer_id: Mapped[str] = mapped_column(String(256), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False, index=True)
    refreshed_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class ReviewRow(Base):
    """A job result held for human output review; `result` is the signed envelope, released only once
    approved (copied to the job then)."""

    __tablename__ = "dataplane_reviews"
    __table_args__ = (Index("ix_dataplane_reviews_state", "state"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("dataplane_jobs.id"), nullable=False, unique=True
    )
    agreement_id: Mapped[str] = mapped_column(String(256), nullable=False)
    consumer_id: Mapped[str] = mapped_column(String(256), nullable=False)
    scenario_id: Mapped[str] = mapped_column(String(200), nullable=False)
    dataset_id: Mapped[str] = mapped_column(String(200), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    required: Mapped[int] = mapped_column(Integer, nullable=False)
    result: Mapped[str] = mapped_column(Text, nullable=False)
    epsilon: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class ReviewApprovalRow(Base):
    """One reviewer's approval; the primary key makes a second approval by the same reviewer fail."""

    __tablename__ = "dataplane_review_approvals"

    review_id: Mapped[str] = mapped_column(String(64), ForeignKey("dataplane_reviews.id"), primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(256), primary_key=True)
    label: Mapped[str] = mapped_column(String(200), nullable=False)
    approved_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class GlmSessionRow(Base):
    """An open federated-GLM session: enough to rebuild each analysis's design after a restart and to
    check it is the same design (`analyses` JSON: per analysis family, names, n_params, rows, sha256)."""

    __tablename__ = "dataplane_glm_sessions"

    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("dataplane_jobs.id"), primary_key=True)
    analyses: Mapped[str] = mapped_column(Text, nullable=False)
    iterations: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_iterations: Mapped[int] = mapped_column(Integer, nullable=False)
    last_beta: Mapped[str | None] = mapped_column(Text, nullable=True)
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
