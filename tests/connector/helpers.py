"""Helpers of the connector suites: reading a connector's audit log."""

from __future__ import annotations

from typing import Any

import httpx

from healthspace.core.apikeys import Role
from tests.support.space import Space


def audit_entries(space: Space, who: str) -> list[dict[str, Any]]:
    """Every entry of `who`'s audit log, read page by page through its audit API (as regulator)."""
    node = space.connectors[who]
    out: list[dict[str, Any]] = []
    with httpx.Client(base_url=node.url, headers={"X-API-Key": node.keys[Role.REGULATOR]}, timeout=20) as c:
        while True:
            page = c.get("/audit/entries", params={"start": len(out)}).json()
            out.extend(e["entry"] for e in page["entries"])
            if not page["entries"] or len(out) >= page["tree_size"]:
                return out
