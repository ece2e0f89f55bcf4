"""Helpers of the connector suites: a data space on one test clock, and reading a connector's audit log."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from healthspace.authority.app import create_app as create_authority
from healthspace.authority.app import init_authority
from healthspace.client import AuthorityClient
from healthspace.connector.app import create_app as create_connector
from healthspace.connector.app import init_connector, install_credential, public_key_of
from healthspace.connector.config import ConnectorConfig
from healthspace.core.apikeys import Role
from healthspace.core.clock import Clock
from healthspace.core.settings import Settings
from tests.support.servers import bind_loopback, serve, url_of
from tests.support.space import AUTHORITY_ID, Node, Space


@contextmanager
def clocked_space(
    root: Path,
    participants: dict[str, tuple[str, str, str, list[str]]],
    clock: Clock,
    patient_prefixes: dict[str, str] | None = None,
) -> Iterator[Space]:
    """Like `tests.support.space.running_space`, with `clock` given to the authority and every connector."""
    with ExitStack() as stack:
        auth_settings = Settings(data_dir=root / "authority")
        auth_keys = init_authority(auth_settings, AUTHORITY_ID, "Test Authority")
        auth_url = stack.enter_context(serve(create_authority(auth_settings, clock)))
        authority = Node(
            AUTHORITY_ID, auth_url, auth_settings.data_dir, {r: k.secret for r, k in auth_keys.items()}
        )
        admin = AuthorityClient(auth_url, authority.keys[Role.ADMIN])
        stack.callback(admin.close)
        anchor = admin.describe()
        nodes: dict[str, Node] = {}
        for pid, (name, ptype, jurisdiction, roles) in participants.items():
            sock = bind_loopback()
            settings = Settings(data_dir=root / pid, revocation_max_age_s=0.0)
            config = ConnectorConfig(
                participant_id=pid,
                legal_name=name,
                participant_type=ptype,
                jurisdiction=jurisdiction,
                roles=roles,
                public_url=url_of(sock),
                authority_url=auth_url,
                authority_id=anchor["id"],
                authority_public_key=anchor["public_key"],
                patient_id_prefix=(patient_prefixes or {}).get(pid),
            )
            keys = init_connector(settings, config)
            result = admin.onboard(
                {
                    "id": pid,
                    "legal_name": name,
                    "type": ptype,
                    "jurisdiction": jurisdiction,
                    "roles": roles,
                    "public_key": public_key_of(settings),
                    "connector_url": url_of(sock),
                }
            )
            install_credential(settings, result["credential"])
            url = stack.enter_context(serve(create_connector(settings, clock), sock))
            nodes[pid] = Node(pid, url, settings.data_dir, {r: k.secret for r, k in keys.items()})
        yield Space(authority, nodes)


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
