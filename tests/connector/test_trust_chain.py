"""The trust chain between connectors over real HTTP, and every way a caller can fail to be trusted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from healthspace.client import ApiError, ConnectorClient
from healthspace.core.apikeys import Role
from healthspace.core.settings import Settings
from healthspace.identity.keys import SigningKey
from healthspace.identity.tokens import mint_request_token
from tests.support.space import PARTICIPANTS, Node, Space, running_space

GZ, HKU = "gz-hospital", "hk-university"


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Space]:
    participants = {**PARTICIPANTS, "mo-clinic": ("Macao Clinic", "hospital", "MO", [])}
    with running_space(tmp_path_factory.mktemp("space"), participants) as s:
        yield s


def _identity(node: Node) -> tuple[SigningKey, str]:
    key = SigningKey.load(
        node.data_dir / "participant.key", Settings(data_dir=node.data_dir).key_encryption_key()
    )
    return key, (node.data_dir / "credential.jwt").read_text().strip()


Minter = Callable[..., str]


@pytest.fixture
def mint(space: Space) -> Minter:
    """Mint a request token as `caller` for `audience`, optionally at another time or with another key."""

    def _mint(
        caller: str, audience: str, *, now: datetime | None = None, key: SigningKey | None = None
    ) -> str:
        own_key, credential = _identity(space.connectors[caller])
        return mint_request_token(key or own_key, credential, caller, audience, now or datetime.now(UTC))

    return _mint


def _hello(node: Node, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{node.url}/peer/hello", headers=headers)


def _denials(node: Node) -> list[dict[str, object]]:
    with ConnectorClient(node.url, node.keys[Role.REGULATOR]) as c:
        head = c.tree_head()
        entries = [item["entry"] for item in c.audit_entries(0, head["tree_size"])]
    return [e for e in entries if e["action"] == "peer.authenticate" and e["outcome"] == "denied"]


def test_every_connector_authenticates_to_every_other_both_ways(space: Space) -> None:
    for a in space.connectors.values():
        with ConnectorClient(a.url, a.keys[Role.ADMIN]) as c:
            for b in space.connectors.values():
                if a is not b:
                    result = c.trust_check(b.url)
                    assert (result["peer_id"], result["authenticated"], result["mutual"]) == (
                        b.id,
                        True,
                        True,
                    )


def test_a_valid_token_is_accepted(space: Space, mint: Minter) -> None:
    r = _hello(space.connectors[GZ], mint(HKU, GZ))
    assert r.status_code == 200
    assert r.json()["caller"] == HKU


def test_a_call_without_a_token_is_refused_and_audited(space: Space) -> None:
    r = _hello(space.connectors[GZ], None)
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    assert _denials(space.connectors[GZ])[-1]["reason"] == "token-missing"


def test_a_garbage_token_is_refused(space: Space) -> None:
    assert _hello(space.connectors[GZ], "not.a.token").status_code == 401


def test_a_token_signed_with_another_key_is_refused(space: Space, mint: Minter) -> None:
    forged = mint(HKU, GZ, key=SigningKey.generate())
    r = _hello(space.connectors[GZ], forged)
    assert r.status_code == 401
    assert forged not in r.text  # errors never echo a token


def test_an_expired_token_is_refused(space: Space, mint: Minter) -> None:
    old = mint(HKU, GZ, now=datetime.now(UTC) - timedelta(hours=1))
    assert _hello(space.connectors[GZ], old).status_code == 401


def test_a_token_for_another_audience_is_refused(space: Space, mint: Minter) -> None:
    assert _hello(space.connectors[GZ], mint(HKU, "mo-clinic")).status_code == 401


def test_a_replayed_token_is_refused_and_audited(space: Space, mint: Minter) -> None:
    token = mint(HKU, GZ)
    assert _hello(space.connectors[GZ], token).status_code == 200
    assert _hello(space.connectors[GZ], token).status_code == 401
    assert _denials(space.connectors[GZ])[-1]["reason"] == "replayed"


def test_a_revoked_participant_is_refused_with_403(space: Space, mint: Minter) -> None:
    key = SigningKey.generate()
    with space.admin() as admin:
        onboarded = admin.onboard(
            {
                "id": "mo-leaver",
                "legal_name": "Leaving Clinic",
                "type": "hospital",
                "jurisdiction": "MO",
                "roles": [],
                "public_key": key.public_key_b64,
            }
        )
        token = mint_request_token(key, onboarded["credential"], "mo-leaver", GZ, datetime.now(UTC))
        assert _hello(space.connectors[GZ], token).status_code == 200
        admin.revoke("mo-leaver", "membership ended")
    token = mint_request_token(key, onboarded["credential"], "mo-leaver", GZ, datetime.now(UTC))
    r = _hello(space.connectors[GZ], token)
    assert r.status_code == 403
    assert _denials(space.connectors[GZ])[-1]["reason"] == "revoked"
    # ... and the others still trust each other.
    assert _hello(space.connectors[GZ], mint(HKU, GZ)).status_code == 200


def test_the_member_directory_accepts_a_peer_token(space: Space, mint: Minter) -> None:
    r = httpx.get(
        f"{space.authority.url}/participants",
        headers={"Authorization": f"Bearer {mint(GZ, space.authority.id)}"},
    )
    assert r.status_code == 200
    assert {p["id"] for p in r.json()} >= {GZ, HKU}


@pytest.mark.parametrize("role", list(Role))
def test_each_staff_role_has_its_own_key(space: Space, role: Role) -> None:
    node = space.connectors[GZ]
    with ConnectorClient(node.url, node.keys[role]) as c:
        assert c.whoami()["role"] == role.value


def test_only_an_admin_may_run_a_trust_check(space: Space) -> None:
    node = space.connectors[GZ]
    with ConnectorClient(node.url, node.keys[Role.RESEARCHER]) as c, pytest.raises(ApiError) as err:
        c.trust_check(space.connectors[HKU].url)
    assert err.value.status == 403
    with ConnectorClient(node.url) as c, pytest.raises(ApiError) as err:
        c.whoami()
    assert err.value.status == 401


def test_the_self_description_publishes_the_key_in_the_credential(space: Space) -> None:
    node = space.connectors[GZ]
    key, _ = _identity(node)
    desc = httpx.get(f"{node.url}/.well-known/healthspace").json()
    assert (desc["id"], desc["public_key"]) == (GZ, key.public_key_b64)
