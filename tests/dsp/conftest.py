"""Fixtures for the DSP suite: a running data space with two connectors, and a staff client per role."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from healthspace.core.apikeys import Role
from tests.conftest import temporary_postgres_database
from tests.dsp.tck_peer import TckPeer, tck_peer
from tests.support.space import AUTHORITY_ID, PARTICIPANTS, Node, Space, running_space

GZ, HKU, TCK = "gz-hospital", "hk-university", "dsp-tck"

OFFER: dict[str, Any] = {
    "@id": "urn:offer:t2d-cohort:1",
    "permission": [
        {
            "action": "use",
            "constraint": [
                {"leftOperand": "purpose", "operator": "eq", "rightOperand": "diabetes-outcomes-research"}
            ],
        }
    ],
}


@pytest.fixture(scope="package", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def space(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Space]:
    """The whole DSP suite runs twice: every service's control plane on SQLite, then on PostgreSQL."""
    # A third participant plays the DSP TCK: real identity, scripted behaviour (see tck_peer.py).
    participants = {**PARTICIPANTS, TCK: ("DSP TCK stand-in", "service_provider", "HK", [])}
    with ExitStack() as stack:
        database_url = None
        if request.param == "postgresql":
            admin_url = request.getfixturevalue("postgres_admin_url")
            urls = {
                p: stack.enter_context(temporary_postgres_database(admin_url))
                for p in [AUTHORITY_ID, *participants]
            }
            database_url = urls.__getitem__
        root = tmp_path_factory.mktemp(f"dsp-space-{request.param}")
        yield stack.enter_context(running_space(root, participants, database_url=database_url))


Staff = Callable[[str, Role], httpx.Client]


@pytest.fixture
def staff(space: Space) -> Iterator[Staff]:
    """`staff(participant, role)`: an HTTP client on that connector holding that role's API key."""
    opened: list[httpx.Client] = []

    def _client(participant: str, role: Role) -> httpx.Client:
        node: Node = space.connectors[participant]
        c = httpx.Client(base_url=node.url, headers={"X-API-Key": node.keys[role]}, timeout=15.0)
        opened.append(c)
        return c

    yield _client
    for c in opened:
        c.close()


@pytest.fixture(scope="package")
def tck(space: Space) -> Iterator[TckPeer]:
    """The TCK stand-in: a scripted peer with its own loopback server and a real identity."""
    with tck_peer(space.connectors[TCK]) as peer:
        yield peer


@pytest.fixture
def fresh_tck(tck: TckPeer) -> TckPeer:
    while not tck.inbox.empty():
        tck.inbox.get_nowait()
    tck.invalid.clear()
    tck.refuse.clear()
    tck.states.clear()
    return tck
