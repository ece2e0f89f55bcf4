"""SQL tables of the audit log: entries (append-only), signed tree heads, and the public keys seen."""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.db import Base

__all__ = ["AuditCounterRow", "AuditEntryRow", "AuditKeyRow", "AuditTreeHeadRow"]


class AuditEntryRow(Base):
    """One leaf. `data` is the canonical entry JSON, byte for byte the Merkle leaf data; `leaf_hash` is a
    cache that verification recomputes and compares, never trusts."""

    __tablename__ = "audit_entries"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    data: Mapped[str] = mapped_column(Text)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuditTreeHeadRow(Base):
    """A signed tree head; at most one per tree size (a head is signed only when the tree has grown)."""

    __tablename__ = "audit_tree_heads"

    tree_size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root_hash: Mapped[str] = mapped_column(String(64))
    timestamp: Mapped[str] = mapped_column(String(27))
    key_id: Mapped[str] = mapped_column(String(200))
    signature: Mapped[str] = mapped_column(String(200))


class AuditKeyRow(Base):
    """Public keys that signed heads of this log, for exports; verification takes keys from the caller."""

    __tablename__ = "audit_keys"

    key_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(100))


class AuditCounterRow(Base):
    """The index the next entry gets: one row, advanced in the same transaction as the entries it
    numbers, so every writer (several processes may append) takes the next indexes in commit order."""

    __tablename__ = "audit_counter"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    next_seq: Mapped[int] = mapped_column(BigInteger)
