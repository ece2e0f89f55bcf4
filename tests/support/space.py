"""A small data space for end-to-end tests: a real authority and connectors on loopback, in-process."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

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

AUTHORITY_ID = "test-authority"


@dataclass
class Node:
    id: str
    url: str
    data_dir: Path
    keys: dict[Role, str] = field(default_factory=dict)
    app: FastAPI | None = None  # a connector's app as served (to inspect its routes)


@dataclass
class Space:
    authority: Node
    connectors: dict[str, Node]

    def admin(self) -> AuthorityClient:
        return AuthorityClient(self.authority.url, self.authority.keys[Role.ADMIN])


PARTICIPANTS = {
    "gz-hospital": ("Guangzhou Test Hospital", "hospital", "CN-GD", ["data-provider"]),
    "hk-university": ("Hong Kong Test University", "university", "HK", ["data-consumer"]),
}


@contextmanager
def running_space(
    root: Path,
    participants: dict[str, tuple[str, str, str, list[str]]] = PARTICIPANTS,
    revocation_max_age_s: float = 0.0,
    patient_prefixes: dict[str, str] | None = None,
    database_url: Callable[[str], str] | None = None,
    clock: Clock | None = None,
    not_served: Collection[str] = (),
) -> Iterator[Space]:
    """Start an authority, onboard `participants` through its admin API and start their connectors.

    A participant named in `patient_prefixes` is a hospital with a consent registry. `database_url`, given a
    participant id (or AUTHORITY_ID), names that service's control-plane database; default SQLite files.
    `clock` (default: the system clock) is given to the authority and every connector. Connectors named
    in `not_served` are set up and onboarded but left for the test to serve, at their node's `url`
    (a loopback port that was free a moment ago).
    """
    with ExitStack() as stack:
        db_for = database_url or (lambda _: None)
        auth_settings = Settings(data_dir=root / "authority", database_url=db_for(AUTHORITY_ID))
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
            settings = Settings(
                data_dir=root / pid, revocation_max_age_s=revocation_max_age_s, database_url=db_for(pid)
            )
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
            if pid in not_served:
                url = url_of(sock)
                sock.close()
                nodes[pid] = Node(pid, url, settings.data_dir, {r: k.secret for r, k in keys.items()})
                continue
            app = create_connector(settings, clock)
            url = stack.enter_context(serve(app, sock))
            nodes[pid] = Node(pid, url, settings.data_dir, {r: k.secret for r, k in keys.items()}, app)
        yield Space(authority, nodes)
