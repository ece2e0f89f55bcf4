"""HTTP routes of the audit log: signed tree head, entry pages, inclusion and consistency proofs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from healthspace.audit.log import AuditLog
from healthspace.audit.models import SignedTreeHead, format_time
from healthspace.core.errors import ValidationError

__all__ = [
    "MAX_PAGE",
    "ConsistencyProofPublic",
    "EntriesPage",
    "EntryPublic",
    "InclusionProofPublic",
    "PublicKeyPublic",
    "TreeHeadPublic",
    "make_router",
    "sign_heads_periodically",
]

_log = logging.getLogger(__name__)
MAX_PAGE = 1000
_Index = Annotated[int, Query(ge=0, le=2**62)]


class TreeHeadPublic(BaseModel):
    """A signed tree head; `signature` is Ed25519 over the bytes defined in `SignedTreeHead`."""

    tree_size: int
    root_hash: str
    timestamp: str
    key_id: str
    signature: str

    @classmethod
    def of(cls, head: SignedTreeHead) -> TreeHeadPublic:
        return cls(
            tree_size=head.tree_size,
            root_hash=head.root_hash,
            timestamp=format_time(head.timestamp),
            key_id=head.key_id,
            signature=head.signature,
        )


class EntryPublic(BaseModel):
    index: int
    leaf_hash: str = Field(description="SHA-256(0x00 || canonical entry bytes), hex")
    entry: dict[str, Any] = Field(
        description="the canonical entry object (its sorted-key encoding is the leaf)"
    )


class EntriesPage(BaseModel):
    start: int
    stop: int
    tree_size: int
    entries: list[EntryPublic]


class InclusionProofPublic(BaseModel):
    index: int
    tree_size: int
    leaf_hash: str
    audit_path: list[str] = Field(description="RFC 6962 audit path, hex, from the leaf upwards")


class ConsistencyProofPublic(BaseModel):
    first: int
    second: int
    consistency: list[str] = Field(description="RFC 6962 consistency proof, hex")


class PublicKeyPublic(BaseModel):
    algorithm: str = "Ed25519"
    key_id: str
    public_key: str = Field(description="raw 32-byte key, URL-safe base64 without padding")


def make_router(get_log: Callable[[], AuditLog], guard: Any) -> APIRouter:
    """The audit routes under /audit, each behind the `guard` dependency supplied by the service."""
    router = APIRouter(prefix="/audit", tags=["audit"], dependencies=[Depends(guard)])

    @router.get("/tree-head", response_model=TreeHeadPublic)
    def tree_head(log: AuditLog = Depends(get_log)) -> TreeHeadPublic:
        """The signed head of the current tree (signed anew only when the tree has grown)."""
        return TreeHeadPublic.of(log.tree_head())

    @router.get("/public-key", response_model=PublicKeyPublic)
    def public_key(log: AuditLog = Depends(get_log)) -> PublicKeyPublic:
        key_id, key = log.public_key
        return PublicKeyPublic(key_id=key_id, public_key=key)

    @router.get("/entries", response_model=EntriesPage)
    def entries(
        start: _Index = 0, stop: _Index | None = None, log: AuditLog = Depends(get_log)
    ) -> EntriesPage:
        """Entries with start <= index < stop, at most MAX_PAGE per page; stop defaults to a full page."""
        stop = start + MAX_PAGE if stop is None else stop
        if stop < start:
            raise ValidationError("stop must not be below start")
        if stop - start > MAX_PAGE:
            raise ValidationError(f"at most {MAX_PAGE} entries per page")
        size = log.size
        page = log.entries(start, stop)
        return EntriesPage(
            start=start,
            stop=min(stop, max(size, start)),
            tree_size=size,
            entries=[
                EntryPublic(index=e.index, leaf_hash=e.leaf_hash, entry=e.entry.to_json()) for e in page
            ],
        )

    @router.get("/proofs/inclusion", response_model=InclusionProofPublic)
    def inclusion(
        index: _Index, tree_size: _Index | None = None, log: AuditLog = Depends(get_log)
    ) -> InclusionProofPublic:
        """Audit path of entry `index` in the tree of `tree_size` entries (default: the current tree)."""
        p = log.inclusion_proof(index, tree_size)
        return InclusionProofPublic(
            index=p.index, tree_size=p.tree_size, leaf_hash=p.leaf_hash, audit_path=p.path
        )

    @router.get("/proofs/consistency", response_model=ConsistencyProofPublic)
    def consistency(
        first: _Index, second: _Index | None = None, log: AuditLog = Depends(get_log)
    ) -> ConsistencyProofPublic:
        """Proof that the tree of `first` entries is a prefix of the tree of `second` (default: current)."""
        p = log.consistency_proof(first, second)
        return ConsistencyProofPublic(first=p.first, second=p.second, consistency=p.path)

    return router


async def sign_heads_periodically(log: AuditLog, interval_s: float) -> None:
    """Sign a tree head every `interval_s` seconds while the service runs.

    Entries after the newest signed head are protected only by the running process; a periodic head
    bounds that window (and `tree_head` signs nothing when the tree has not grown).
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(log.tree_head)
        except Exception:  # keep the service up; the next tick tries again
            _log.exception("signing an audit tree head failed")
