"""End to end: a FastAPI app guarded by `peer_dependency` on a loopback server, called with `PeerAuth`.

Real HTTP rather than starlette's TestClient, which warns about httpx (warnings are errors here).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

from healthspace.core.errors import HealthspaceError, install_problem_handlers
from healthspace.identity.fastapi import PeerAuth, peer_dependency
from healthspace.identity.tokens import Caller
from tests.support.servers import serve

from .kit import HOSPITAL_ID, UNIVERSITY_ID, Space, claims_of


class Recorder:
    """Stands in for the audit log: remembers each refusal the dependency reports."""

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[tuple[str, str, int]] = []
        self.fail = fail

    def __call__(self, request: Request, error: HealthspaceError) -> None:
        self.seen.append((request.url.path, str(error.extra.get("reason")), type(error).status))
        if self.fail:
            raise RuntimeError("audit sink down")


def _record(request: Request, error: HealthspaceError) -> None:
    request.app.state.recorder(request, error)


# Module level: with postponed annotations FastAPI resolves the alias by name in the module's globals.
Peer = Annotated[Caller, Depends(peer_dependency(lambda r: r.app.state.verifier, _record))]


def _app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/peer/whoami")
    def whoami(caller: Peer) -> dict[str, Any]:
        return {"id": caller.participant_id, "type": caller.participant_type, "roles": list(caller.roles)}

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FastAPI, str]]:
    """One real server on loopback for the module; each test installs its own verifier and recorder."""
    app = _app()
    with serve(app) as url:
        yield app, url


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(space: Space, recorder: Recorder, server: tuple[FastAPI, str]) -> Iterator[httpx.Client]:
    app, url = server
    app.state.verifier = space.verifier()
    app.state.recorder = recorder
    with httpx.Client(base_url=url) as c:
        yield c


def _auth(space: Space, audience: str = UNIVERSITY_ID) -> PeerAuth:
    return PeerAuth(space.hospital, space.credentials[HOSPITAL_ID], HOSPITAL_ID, audience, clock=space.clock)


def test_peer_auth_call_is_answered_with_the_caller(space: Space, client: httpx.Client) -> None:
    r = client.get("/peer/whoami", auth=_auth(space))
    assert r.status_code == 200
    assert r.json() == {"id": HOSPITAL_ID, "type": "hospital", "roles": ["data-provider"]}


def test_peer_auth_mints_a_fresh_token_per_request(space: Space, client: httpx.Client) -> None:
    auth = _auth(space)
    assert [client.get("/peer/whoami", auth=auth).status_code for _ in range(3)] == [200, 200, 200]


def test_call_without_token_is_401_problem_json(client: httpx.Client, recorder: Recorder) -> None:
    r = client.get("/peer/whoami")
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["reason"] == "token-missing"
    assert recorder.seen == [("/peer/whoami", "token-missing", 401)]


def test_replayed_header_is_401_and_reported(space: Space, client: httpx.Client, recorder: Recorder) -> None:
    sent = client.get("/peer/whoami", auth=_auth(space))
    header = sent.request.headers["authorization"]
    r = client.get("/peer/whoami", headers={"Authorization": header})
    assert r.status_code == 401
    assert r.json()["reason"] == "replayed"
    assert recorder.seen == [("/peer/whoami", "replayed", 401)]


def test_token_for_another_audience_is_401(space: Space, client: httpx.Client, recorder: Recorder) -> None:
    r = client.get("/peer/whoami", auth=_auth(space, audience="hk-harbour-hospital"))
    assert r.status_code == 401
    assert r.json()["reason"] == "wrong-audience"
    assert recorder.seen == [("/peer/whoami", "wrong-audience", 401)]


def test_revoked_member_is_403_and_reported(space: Space, client: httpx.Client, recorder: Recorder) -> None:
    space.revocations.credentials.add(claims_of(space.credentials[HOSPITAL_ID])["jti"])
    r = client.get("/peer/whoami", auth=_auth(space))
    assert r.status_code == 403
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["reason"] == "revoked"
    assert recorder.seen == [("/peer/whoami", "revoked", 403)]


def test_problem_does_not_echo_the_token(space: Space, client: httpx.Client) -> None:
    auth = _auth(space, audience="hk-harbour-hospital")
    r = client.get("/peer/whoami", auth=auth)
    token = r.request.headers["authorization"].removeprefix("Bearer ")
    assert token.rsplit(".", 1)[1] not in r.text
    assert space.credentials[HOSPITAL_ID] not in r.text


def test_failing_audit_callback_still_refuses_with_the_original_error(
    client: httpx.Client, server: tuple[FastAPI, str]
) -> None:
    recorder = Recorder(fail=True)
    server[0].state.recorder = recorder
    r = client.get("/peer/whoami", headers={"Authorization": "Bearer nonsense"})
    assert r.status_code == 401
    assert r.json()["reason"] == "token-malformed"
    assert recorder.seen == [("/peer/whoami", "token-malformed", 401)]


def test_dependency_accepts_the_verifier_itself(space: Space) -> None:
    app = FastAPI()
    install_problem_handlers(app)
    dependency = peer_dependency(space.verifier())

    @app.get("/x")
    def x(caller: Caller = Depends(dependency)) -> str:
        return caller.participant_id

    with serve(app) as url, httpx.Client(base_url=url) as c:
        assert c.get("/x", auth=_auth(space)).json() == HOSPITAL_ID
        assert c.get("/x").status_code == 401


def test_peer_auth_hands_a_fresh_header_to_other_clients(space: Space, server: tuple[FastAPI, str]) -> None:
    """`authorization()` (what the DSP manager's own HTTP client sends) is verified like `auth_flow`'s."""
    app, url = server
    app.state.verifier = space.verifier()
    app.state.recorder = Recorder()
    auth = _auth(space)
    first, second = auth.authorization(), auth.authorization()
    assert first.startswith("Bearer ")
    assert first != second
    with httpx.Client(base_url=url) as c:
        for header in (first, second):
            r = c.get("/peer/whoami", headers={"Authorization": header})
            assert (r.status_code, r.json()["id"]) == (200, HOSPITAL_ID)
        assert c.get("/peer/whoami", headers={"Authorization": first}).status_code == 401  # spent
