"""Tables of the connector's DSP processes (branch "dsp"): datasets, negotiations, agreements, transfers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.db import Base, UtcDateTime

__all__ = [
    "AgreementRow",
    "DatasetRow",
    "NegotiationRow",
    "OutboxRow",
    "TransferRow",
]


class DatasetRow(Base):
    __tablename__ = "dsp_datasets"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    title: Mapped[str] = mapped_column(String(300))
    description: Mapped[str] = mapped_column(Text)
    keywords: Mapped[list[str]] = mapped_column(JSON)
    metadata_json: Mapped[dict[str, Any]] = mapped_column(JSON)
    offer: Mapped[dict[str, Any]] = mapped_column(JSON)
    approval: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class NegotiationRow(Base):
    __tablename__ = "dsp_negotiations"
    __table_args__ = (
        UniqueConstraint("role", "counterparty_id", "consumer_pid", name="uq_dsp_negotiations_peer_cpid"),
    )

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # our own pid
    role: Mapped[str] = mapped_column(String(16))
    provider_pid: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    consumer_pid: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    counterparty_id: Mapped[str] = mapped_column(String(200))
    counterparty_address: Mapped[str] = mapped_column(String(500))
    dataset_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    offer: Mapped[dict[str, Any]] = mapped_column(JSON)
    agreement_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    auto: Mapped[bool] = mapped_column(Boolean)
    pending: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    terminal_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class AgreementRow(Base):
    __tablename__ = "dsp_agreements"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    negotiation_id: Mapped[str] = mapped_column(String(200), index=True)
    role: Mapped[str] = mapped_column(String(16))
    provider_id: Mapped[str] = mapped_column(String(200))
    consumer_id: Mapped[str] = mapped_column(String(200))
    dataset_id: Mapped[str] = mapped_column(String(200))
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    signed_at: Mapped[datetime] = mapped_column(UtcDateTime())
    retired_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    retired_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class TransferRow(Base):
    __tablename__ = "dsp_transfers"
    __table_args__ = (
        UniqueConstraint("role", "counterparty_id", "consumer_pid", name="uq_dsp_transfers_peer_cpid"),
    )

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # our own pid
    role: Mapped[str] = mapped_column(String(16))
    provider_pid: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    consumer_pid: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    counterparty_id: Mapped[str] = mapped_column(String(200))
    counterparty_address: Mapped[str] = mapped_column(String(500))
    agreement_id: Mapped[str] = mapped_column(String(200), index=True)
    format: Mapped[str] = mapped_column(String(100))
    data_address: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    auto: Mapped[bool] = mapped_column(Boolean)
    pending: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    terminal_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class OutboxRow(Base):
    """A message this connector owes a peer; written in the transaction that moved the process."""

    __tablename__ = "dsp_outbox"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    process_id: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "negotiation" or "transfer"
    peer_id: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(String(600))
    message_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | sent | dead
    attempts: Mapped[int] = mapped_column(Integer)
    next_at: Mapped[datetime] = mapped_column(UtcDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
