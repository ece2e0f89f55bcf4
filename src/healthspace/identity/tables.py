"""Tables of the identity context (migration branch "identity")."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.db import Base

__all__ = ["SeenTokenRow"]


class SeenTokenRow(Base):
    """A request token already accepted, kept until it expires so a second presentation is a replay.

    The primary key (issuer, token_id) is the replay check itself: the database refuses a second row.
    """

    __tablename__ = "identity_seen_tokens"

    issuer: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
