"""The export-approval register over HTTP: admin-only, validated, audited, revocable, and served to the
provider it concerns as a list signed by the authority."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from healthspace.authority.seed import DEMO_SCENARIOS
from healthspace.connector.app import open_runtime
from healthspace.core.apikeys import Role
from healthspace.core.settings import Settings
from healthspace.policy.registry import InvalidCrossBorderDocumentError, verify_approvals
from tests.support.space import AUTHORITY_ID, Space, running_space

GZ, HKU = "gz-hospital", "hk-university"
SCENARIO = DEMO_SCENARIOS[0].id


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Space]:
    with running_space(tmp_path_factory.mktemp("approvals")) as s:
        with s.admin() as admin:
            admin.register_scenario(DEMO_SCENARIOS[0].model_dump(mode="json"))
        yield s


@pytest.fixture
def admin(space: Space) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=space.authority.url, headers={"X-API-Key": space.authority.keys[Role.ADMIN]}, timeout=10
    ) as c:
        yield c


def _body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "provider_id": GZ,
        "dataset_id": "urn:dataset:t2d",
        "consumer_id": HKU,
        "scenario_id": SCENARIO,
        "reference": "CAC-2026-0042",
        "expires_at": (datetime.now(UTC) + timedelta(days=90)).isoformat(),
    }
    body.update(over)
    return body


def _signed_for(space: Space, provider: str) -> str:
    """What the provider's connector fetches: the approvals endpoint called with its own credential."""
    rt = open_runtime(Settings(data_dir=space.connectors[provider].data_dir))
    try:
        r = rt.http.get(f"{space.authority.url}/cross-border/approvals", auth=rt.peer_auth(AUTHORITY_ID))
        assert r.status_code == 200, r.text
        return str(r.json()["approvals"])
    finally:
        rt.close()


def test_an_admin_registers_an_approval_and_the_audit_log_records_it(
    space: Space, admin: httpx.Client
) -> None:
    r = admin.post("/admin/export-approvals", json=_body(reference="CAC-AUDIT-1"))
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "ACTIVE"
    entries = admin.get("/audit/entries").json()["entries"]
    last = [e["entry"] for e in entries if e["entry"]["action"] == "export-approval.register"][-1]
    assert (last["outcome"], "CAC-AUDIT-1" in last["subject"]) == ("success", True)


@pytest.mark.parametrize(
    ("over", "problem"),
    [
        ({"consumer_id": "nobody"}, "no participant 'nobody'"),
        ({"scenario_id": "crypto-mining"}, "no scenario"),
        ({"expires_at": (datetime.now(UTC) - timedelta(days=1)).isoformat()}, "already expired"),
        ({"expires_at": "2030-01-01T00:00:00"}, "time zone"),
    ],
)
def test_an_invalid_approval_is_refused_with_its_reason(
    admin: httpx.Client, over: dict[str, Any], problem: str
) -> None:
    r = admin.post("/admin/export-approvals", json=_body(**over))
    assert r.status_code == 422
    assert problem in r.text


def test_registering_needs_the_admin_key(space: Space) -> None:
    r = httpx.post(
        f"{space.authority.url}/admin/export-approvals",
        json=_body(),
        headers={"X-API-Key": space.authority.keys[Role.REGULATOR]},
    )
    assert r.status_code == 403


def test_a_provider_receives_its_own_approvals_signed_and_not_revoked_ones(
    space: Space, admin: httpx.Client
) -> None:
    kept = admin.post("/admin/export-approvals", json=_body(reference="CAC-KEEP")).json()
    gone = admin.post("/admin/export-approvals", json=_body(reference="CAC-GONE")).json()
    r = admin.post(f"/admin/export-approvals/{gone['id']}/revoke", json={"reason": "filing withdrawn"})
    assert r.json()["status"] == "REVOKED"
    anchor = admin.get("/.well-known/healthspace-authority").json()
    _, approvals = verify_approvals(_signed_for(space, GZ), anchor["public_key"], AUTHORITY_ID, GZ)
    references = {a.reference for a in approvals}
    assert kept["reference"] in references
    assert "CAC-GONE" not in references


def test_a_provider_is_not_sent_another_providers_approvals(space: Space, admin: httpx.Client) -> None:
    admin.post("/admin/export-approvals", json=_body(reference="CAC-GZ-ONLY"))
    anchor = admin.get("/.well-known/healthspace-authority").json()
    _, approvals = verify_approvals(_signed_for(space, HKU), anchor["public_key"], AUTHORITY_ID, HKU)
    assert approvals == []
    with pytest.raises(InvalidCrossBorderDocumentError):
        verify_approvals(_signed_for(space, HKU), anchor["public_key"], AUTHORITY_ID, GZ)


def test_revoking_twice_is_a_conflict(admin: httpx.Client) -> None:
    a = admin.post("/admin/export-approvals", json=_body(reference="CAC-TWICE")).json()
    admin.post(f"/admin/export-approvals/{a['id']}/revoke", json={"reason": "once"})
    assert (
        admin.post(f"/admin/export-approvals/{a['id']}/revoke", json={"reason": "twice"}).status_code == 409
    )


def test_approvals_need_a_member_credential(space: Space) -> None:
    assert httpx.get(f"{space.authority.url}/cross-border/approvals").status_code == 401
