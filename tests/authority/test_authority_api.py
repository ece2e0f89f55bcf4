"""The authority over real HTTP: onboarding, revocation, scenarios, and the audit trail they leave."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from healthspace.authority.seed import DEMO_SCENARIOS
from healthspace.client import ApiError, AuthorityClient
from healthspace.core.apikeys import Role
from healthspace.identity.credentials import verify_credential
from healthspace.identity.keys import SigningKey
from healthspace.identity.revocation import verify_revocation_list
from tests.support.space import AUTHORITY_ID, Space, running_space


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Space]:
    with running_space(tmp_path_factory.mktemp("space")) as s:
        yield s


@pytest.fixture
def admin(space: Space) -> Iterator[AuthorityClient]:
    with space.admin() as c:
        yield c


def _new_participant(pid: str, **over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "id": pid,
        "legal_name": "Macao Test Clinic",
        "type": "hospital",
        "jurisdiction": "MO",
        "roles": ["data-provider"],
        "public_key": SigningKey.generate().public_key_b64,
    }
    body.update(over)
    return body


def test_onboarding_issues_a_credential_signed_by_the_authority(admin: AuthorityClient) -> None:
    body = _new_participant("mo-clinic-1")
    result = admin.onboard(body)
    anchor = admin.describe()
    cred = verify_credential(result["credential"], anchor["public_key"], AUTHORITY_ID, datetime.now(UTC))
    assert (cred.participant_id, cred.jurisdiction, cred.public_key) == (
        "mo-clinic-1",
        "MO",
        body["public_key"],
    )
    assert result["participant"]["status"] == "ACTIVE"


def test_onboarding_the_same_id_twice_is_a_conflict(admin: AuthorityClient) -> None:
    admin.onboard(_new_participant("mo-clinic-2"))
    with pytest.raises(ApiError) as err:
        admin.onboard(_new_participant("mo-clinic-2"))
    assert err.value.status == 409
    assert err.value.problem["code"] == "conflict"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("type", "pharmacy-chain"),
        ("jurisdiction", "Atlantis"),
        ("public_key", "not-a-key"),
        ("id", "UPPER CASE"),
    ],
)
def test_an_invalid_participant_is_refused_with_a_problem(
    admin: AuthorityClient, field: str, value: str
) -> None:
    with pytest.raises(ApiError) as err:
        admin.onboard(_new_participant("mo-clinic-bad", **{field: value}))
    assert err.value.status == 422
    assert err.value.problem["status"] == 422


def test_admin_routes_need_an_admin_key(space: Space) -> None:
    r = httpx.post(f"{space.authority.url}/admin/participants", json=_new_participant("mo-x"))
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    r = httpx.post(
        f"{space.authority.url}/admin/participants",
        json=_new_participant("mo-x"),
        headers={"X-API-Key": space.authority.keys[Role.REGULATOR]},
    )
    assert r.status_code == 403


def test_revocation_appears_in_the_signed_revocation_list(admin: AuthorityClient, space: Space) -> None:
    result = admin.onboard(_new_participant("mo-clinic-3"))
    revoked = admin.revoke("mo-clinic-3", "left the data space")
    assert revoked["status"] == "REVOKED"
    token = httpx.get(f"{space.authority.url}/revocations").json()["revocation_list"]
    rl = verify_revocation_list(token, admin.describe()["public_key"], AUTHORITY_ID)
    assert result["participant"]["credential_id"] in rl.credential_ids


def test_revoking_twice_is_an_invalid_transition(admin: AuthorityClient) -> None:
    admin.onboard(_new_participant("mo-clinic-4"))
    admin.revoke("mo-clinic-4", "first")
    with pytest.raises(ApiError) as err:
        admin.revoke("mo-clinic-4", "second")
    assert (err.value.status, err.value.problem["code"]) == (409, "invalid-transition")


def test_revoking_an_unknown_participant_is_not_found(admin: AuthorityClient) -> None:
    with pytest.raises(ApiError) as err:
        admin.revoke("nobody-here", "x")
    assert err.value.status == 404


def test_scenarios_are_registered_and_public(admin: AuthorityClient, space: Space) -> None:
    for s in DEMO_SCENARIOS:
        admin.register_scenario(s.model_dump(mode="json"))
    public = httpx.get(f"{space.authority.url}/scenarios").json()
    assert {s["id"] for s in public} >= {s.id for s in DEMO_SCENARIOS}
    with pytest.raises(ApiError) as err:
        admin.register_scenario(DEMO_SCENARIOS[0].model_dump(mode="json"))
    assert err.value.status == 409


def test_a_scenario_whose_period_ends_before_it_starts_is_refused(admin: AuthorityClient) -> None:
    body = DEMO_SCENARIOS[1].model_dump(mode="json") | {"id": "backwards", "valid_until": "2020-01-01"}
    with pytest.raises(ApiError) as err:
        admin.register_scenario(body)
    assert err.value.status == 422


def test_every_admin_action_and_refusal_is_audited(admin: AuthorityClient, space: Space) -> None:
    admin.onboard(_new_participant("mo-clinic-5"))
    with pytest.raises(ApiError):
        admin.onboard(_new_participant("mo-clinic-5"))
    head = admin.tree_head()
    entries = [item["entry"] for item in admin.audit_entries(0, head["tree_size"])]
    mine = [e for e in entries if e["subject"] == "mo-clinic-5"]
    assert [(e["action"], e["outcome"]) for e in mine] == [
        ("participant.onboard", "success"),
        ("participant.onboard", "failure"),
    ]
    assert "already registered" in mine[1]["reason"]


def test_the_directory_is_for_members_only(space: Space) -> None:
    assert httpx.get(f"{space.authority.url}/participants").status_code == 401


def test_a_second_authority_cannot_be_initialised_over_the_first(space: Space, tmp_path: Path) -> None:
    from healthspace.authority.app import init_authority
    from healthspace.core.errors import ConflictError
    from healthspace.core.settings import Settings

    with pytest.raises(ConflictError):
        init_authority(Settings(data_dir=space.authority.data_dir), "other", "Other")
