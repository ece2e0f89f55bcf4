"""Cross-border rules over HTTP: providers fetch the authority's signed rules and export approvals, decide
each contract and transfer with them, refuse what they deny, and audit every decision with its reasons."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from healthspace.authority.seed import DEMO_SCENARIOS
from healthspace.core.apikeys import Role
from healthspace.core.clock import FixedClock
from healthspace.policy import template
from tests.connector.helpers import audit_entries
from tests.support.space import Space, running_space

SCENARIO = "diabetes-outcomes-research"
GZ, MO, HKH = "gz-hospital", "mo-hospital", "hk-hospital"
HKU, GDU = "hk-university", "gd-university"
PARTICIPANTS = {
    GZ: ("Guangzhou Test Hospital", "hospital", "CN-GD", ["data-provider"]),
    MO: ("Macao Test Hospital", "hospital", "MO", ["data-provider"]),
    HKH: ("Hong Kong Test Hospital", "hospital", "HK", ["data-provider"]),
    HKU: ("Hong Kong Test University", "university", "HK", ["data-consumer"]),
    GDU: ("Guangdong Test University", "university", "CN-GD", ["data-consumer"]),
}
PREFIXES = {GZ: "gz-pat-", MO: "mo-pat-", HKH: "hk-pat-"}
START = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def clock() -> FixedClock:
    return FixedClock(START)


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory, clock: FixedClock) -> Iterator[Space]:
    with running_space(
        tmp_path_factory.mktemp("xborder"), PARTICIPANTS, patient_prefixes=PREFIXES, clock=clock
    ) as s:
        with s.admin() as admin:
            admin.register_scenario(
                next(sc for sc in DEMO_SCENARIOS if sc.id == SCENARIO).model_dump(mode="json")
            )
        yield s


def _client(space: Space, who: str, role: Role) -> httpx.Client:
    node = space.connectors.get(who, space.authority)
    return httpx.Client(base_url=node.url, headers={"X-API-Key": node.keys[role]}, timeout=20)


def _publish(space: Space, provider: str, kind: str) -> tuple[str, dict[str, Any]]:
    dataset_id = f"urn:dataset:{provider}:{kind}:{uuid.uuid4().hex[:8]}"
    offer = template(kind, scenario=SCENARIO)
    with _client(space, provider, Role.STEWARD) as c:
        r = c.post(
            "/management/datasets",
            json={"id": dataset_id, "title": f"{kind} cohort", "offer": offer, "approval": "auto"},
        )
    assert r.status_code == 201, r.text
    return dataset_id, offer


def _approve(
    space: Space, provider: str, dataset_id: str, consumer: str, expires_at: datetime
) -> dict[str, Any]:
    with _client(space, "authority", Role.ADMIN) as c:
        r = c.post(
            "/admin/export-approvals",
            json={
                "provider_id": provider,
                "dataset_id": dataset_id,
                "consumer_id": consumer,
                "scenario_id": SCENARIO,
                "reference": f"CAC-TEST-{uuid.uuid4().hex[:6]}",
                "expires_at": expires_at.isoformat(),
            },
        )
    assert r.status_code == 201, r.text
    return dict(r.json())


def _negotiate(
    space: Space, provider: str, consumer: str, dataset_id: str, offer: dict[str, Any]
) -> dict[str, Any]:
    """Negotiate as `consumer`; returns the provider's copy of the negotiation once it has ended."""
    with _client(space, consumer, Role.RESEARCHER) as c:
        r = c.post(
            "/management/negotiations",
            json={"provider_url": space.connectors[provider].url, "offer": {**offer, "target": dataset_id}},
        )
        assert r.status_code == 201, r.text
        mine = c.get(
            f"/management/negotiations/{r.json()['id']}",
            params={"wait_for": ["FINALIZED", "TERMINATED"], "timeout_s": 15},
        ).json()
    with _client(space, provider, Role.ADMIN) as c:
        theirs = c.get(
            f"/management/negotiations/{mine['provider_pid']}",
            params={"wait_for": ["FINALIZED", "TERMINATED"], "timeout_s": 15},
        ).json()
    assert theirs.get("state") == mine.get("state"), mine.get("terminal_reason")
    return dict(theirs)


def _decisions(space: Space, who: str, subject: str) -> list[dict[str, Any]]:
    return [
        e for e in audit_entries(space, who) if e["action"] == "policy.decision" and e["subject"] == subject
    ]


@pytest.mark.parametrize(
    ("provider", "consumer", "kind", "finalized", "reason"),
    [
        (GZ, HKU, "deidentified-extract", False, "needs an export approval"),
        (GZ, GDU, "deidentified-extract", True, "domestic"),
        (GZ, HKU, "aggregate-research", True, "aggregate from CN-GD to HK: allowed"),
        (MO, HKU, "deidentified-extract", False, "needs an export approval"),
        (MO, GDU, "aggregate-research", True, "aggregate from MO to CN-GD: allowed"),
        (HKH, GDU, "deidentified-extract", True, "allowed with safeguards"),
    ],
)
def test_a_contract_follows_the_authoritys_cross_border_rules(
    space: Space, provider: str, consumer: str, kind: str, finalized: bool, reason: str
) -> None:
    dataset_id, offer = _publish(space, provider, kind)
    n = _negotiate(space, provider, consumer, dataset_id, offer)
    assert n["state"] == ("FINALIZED" if finalized else "TERMINATED")
    decision = [d for d in _decisions(space, provider, n["id"]) if d["details"]["check"] == "contract"][-1]
    assert decision["outcome"] == ("allowed" if finalized else "denied")
    assert reason in decision["reason"]
    if not finalized:
        assert reason in n["terminal_reason"]


def test_a_registered_approval_lets_record_level_output_leave_cn_gd(space: Space, clock: FixedClock) -> None:
    dataset_id, offer = _publish(space, GZ, "deidentified-extract")
    approval = _approve(space, GZ, dataset_id, HKU, clock.now() + timedelta(days=30))
    n = _negotiate(space, GZ, HKU, dataset_id, offer)
    assert n["state"] == "FINALIZED"
    (decision,) = [d for d in _decisions(space, GZ, n["id"]) if d["details"]["check"] == "contract"]
    assert approval["reference"] in decision["reason"]
    assert (decision["scenario_id"], decision["agreement_id"]) == (SCENARIO, n["agreement_id"])


def test_an_approval_for_another_consumer_does_not_count(space: Space, clock: FixedClock) -> None:
    dataset_id, offer = _publish(space, MO, "deidentified-extract")
    _approve(space, MO, dataset_id, GDU, clock.now() + timedelta(days=30))
    assert _negotiate(space, MO, HKU, dataset_id, offer)["state"] == "TERMINATED"


def test_a_revoked_approval_stops_the_next_transfer_and_the_denial_is_audited(
    space: Space, clock: FixedClock
) -> None:
    dataset_id, offer = _publish(space, GZ, "deidentified-extract")
    approval = _approve(space, GZ, dataset_id, HKU, clock.now() + timedelta(days=30))
    n = _negotiate(space, GZ, HKU, dataset_id, offer)
    assert n["state"] == "FINALIZED"
    with _client(space, "authority", Role.ADMIN) as c:
        r = c.post(f"/admin/export-approvals/{approval['id']}/revoke", json={"reason": "filing withdrawn"})
        assert r.status_code == 200, r.text
    with _client(space, HKU, Role.RESEARCHER) as c:
        t = c.post("/management/transfers", json={"agreement_id": n["agreement_id"]})
        assert t.status_code == 201, t.text
        ended = c.get(
            f"/management/transfers/{t.json()['id']}",
            params={"wait_for": ["STARTED", "TERMINATED"], "timeout_s": 15},
        ).json()
    assert ended["state"] == "TERMINATED"
    assert "needs an export approval" in ended["terminal_reason"]
    (decision,) = _decisions(space, GZ, ended["provider_pid"])
    assert (decision["outcome"], decision["agreement_id"]) == ("denied", n["agreement_id"])
    assert decision["details"]["phase"] == "transfer"


def test_an_expired_approval_denies_with_its_expiry(space: Space, clock: FixedClock) -> None:
    dataset_id, offer = _publish(space, GZ, "deidentified-extract")
    approval = _approve(space, GZ, dataset_id, HKU, clock.now() + timedelta(hours=1))
    clock.advance(timedelta(hours=2))
    n = _negotiate(space, GZ, HKU, dataset_id, offer)
    assert n["state"] == "TERMINATED"
    assert f"export approval {approval['reference']} expired" in n["terminal_reason"]


def test_the_rules_are_public_and_signed_by_the_authority(space: Space) -> None:
    from healthspace.policy.crossborder import DEFAULT_RULES
    from healthspace.policy.registry import verify_rules

    anchor = httpx.get(f"{space.authority.url}/.well-known/healthspace-authority").json()
    token = httpx.get(f"{space.authority.url}/cross-border/rules").json()["rules"]
    _, rules = verify_rules(token, anchor["public_key"], anchor["id"])
    assert rules == dict(DEFAULT_RULES)
