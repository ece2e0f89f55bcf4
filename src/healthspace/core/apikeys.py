"""API keys for people and tools using a service's management API, one role per key, stored hashed.

Keys are 256-bit random strings, so a single SHA-256 is the right hash: a slow password hash buys
nothing against a key that cannot be guessed, and would cost every request. The plaintext is shown once,
when the key is made; the database holds only the digest.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from fastapi import Request
from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, mapped_column

from healthspace.core.clock import utcnow
from healthspace.core.db import Base, Database, UtcDateTime
from healthspace.core.errors import AuthenticationError, ForbiddenError

__all__ = ["ApiKeyStore", "IssuedKey", "Role", "StoredKey", "role_guard"]


class Role(StrEnum):
    """Staff roles of a participant's management API (see ARCHITECTURE.md, "Who uses it")."""

    ADMIN = "admin"
    STEWARD = "steward"
    RESEARCHER = "researcher"
    REVIEWER = "reviewer"
    REGULATOR = "regulator"


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    label: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    role: Role
    label: str
    secret: str  # shown once


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    role: Role
    label: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeyStore:
    """Issue, check and revoke management API keys.

    Contract: `authenticate` MUST raise `AuthenticationError` for a missing, unknown or revoked key and
    never reveal which of these it was; `issue` never stores the plaintext.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    def issue(self, role: Role, label: str) -> IssuedKey:
        key_id = secrets.token_hex(8)
        secret = f"hs_{role.value}_{key_id}_{secrets.token_urlsafe(32)}"
        with self._db.session() as s:
            s.add(
                ApiKeyRow(
                    key_id=key_id, digest=_digest(secret), role=role.value, label=label, created_at=utcnow()
                )
            )
        return IssuedKey(key_id, role, label, secret)

    def authenticate(self, secret: str | None) -> StoredKey:
        if not secret:
            raise AuthenticationError("an API key is required (header X-API-Key)", reason="api-key-missing")
        with self._db.session() as s:
            row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.digest == _digest(secret))).one_or_none()
            if row is None or row.revoked_at is not None:
                raise AuthenticationError("the API key is not valid", reason="api-key-invalid")
            return StoredKey(row.key_id, Role(row.role), row.label)

    def revoke(self, key_id: str) -> None:
        with self._db.session() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is not None and row.revoked_at is None:
                row.revoked_at = utcnow()

    def list(self) -> list[StoredKey]:
        with self._db.session() as s:
            rows = s.scalars(select(ApiKeyRow).where(ApiKeyRow.revoked_at.is_(None)).order_by(ApiKeyRow.role))
            return [StoredKey(r.key_id, Role(r.role), r.label) for r in rows]


def role_guard(store: Callable[[Request], ApiKeyStore], *roles: Role) -> Callable[[Request], StoredKey]:
    """A FastAPI dependency: the caller's `X-API-Key` must be valid and hold one of `roles`."""
    allowed = frozenset(roles)

    def guard(request: Request) -> StoredKey:
        key = store(request).authenticate(request.headers.get("x-api-key"))
        if key.role not in allowed:
            raise ForbiddenError(
                f"role {key.role.value!r} may not do this; needs one of "
                + ", ".join(sorted(r.value for r in allowed)),
                reason="role-not-allowed",
            )
        return key

    return guard
