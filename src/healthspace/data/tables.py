"""Control-plane tables of clinical data: datasets, signed provenance, destruction certificates."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.db import Base, UtcDateTime

__all__ = ["CertificateRow", "DatasetRow", "ProvenanceRow"]


class DatasetRow(Base):
    __tablename__ = "data_datasets"

    dataset_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_by: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text, default="")
    archived_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    retain_until: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)


class ProvenanceRow(Base):
    __tablename__ = "data_provenance"

    batch_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(String(100), index=True)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime())
    record: Mapped[str] = mapped_column(Text)  # the canonical JSON that was signed
    signature: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str] = mapped_column(String(64))
    public_key: Mapped[str] = mapped_column(String(64))


class CertificateRow(Base):
    __tablename__ = "data_destruction_certificates"

    dataset_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    destroyed_at: Mapped[datetime] = mapped_column(UtcDateTime())
    certificate: Mapped[str] = mapped_column(Text)  # the canonical JSON that was signed
    signature: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str] = mapped_column(String(64))
    public_key: Mapped[str] = mapped_column(String(64))
