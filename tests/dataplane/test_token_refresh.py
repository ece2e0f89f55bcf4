"""Refreshing a data-plane token: same transfer, only while it is usable, once per token, audited."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import httpx
import pytest

from healthspace.audit.models import Outcome
from healthspace.connector.dsp.dataplane import mint_access_token, verify_access_token
from healthspace.identity.keys import SigningKey
from tests.dataplane.provider import CONSUMER, Provider

COUNT_SPEC: dict[str, Any] = {"version": 1, "analyses": [{"type": "count", "id": "n"}]}


def refresh(p: Provider, token: str) -> httpx.Response:
    return httpx.post(f"{p.url}/dataplane/token", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def minted(p: Provider, agreement_id: str, *, age: timedelta, ttl: timedelta = timedelta(minutes=10)) -> str:
    """A token for `agreement_id` minted `age` ago (so it expires at `now - age + ttl`)."""
    return mint_access_token(
        p.key, p.id, CONSUMER, agreement_id, f"tr-{agreement_id}", p.clock.now() - age, ttl
    )


def actions(p: Provider, action: str) -> list[Any]:
    return [e.entry for e in p.audit.entries(0, p.audit.size) if e.entry.action == action]


@pytest.fixture(scope="module")
def hk(providers: dict[str, Provider]) -> Provider:
    p = providers["hk"]
    for agreement_id in ("agr-tok", "agr-tok-retired", "agr-tok-suspended", "agr-tok-old"):
        p.add_agreement(agreement_id)
    return p


def test_a_valid_token_is_exchanged_for_a_fresh_one_for_the_same_transfer(hk: Provider) -> None:
    old = minted(hk, "agr-tok", age=timedelta(minutes=8))
    r = refresh(hk, old)
    assert r.status_code == 200, r.text
    body = r.json()
    grant = verify_access_token(hk.key, hk.id, body["token"], hk.clock.now())
    assert (grant.consumer, grant.agreement_id, grant.transfer_id) == (CONSUMER, "agr-tok", "tr-agr-tok")
    assert grant.expires_at == hk.clock.now() + timedelta(minutes=10)
    assert body["expires_in"] == 600
    job = httpx.post(
        f"{hk.url}/dataplane/jobs",
        json={"scenario": "diabetes-outcomes-research", "spec": COUNT_SPEC},
        headers={"Authorization": f"Bearer {body['token']}"},
        timeout=30,
    )
    assert job.status_code == 200, job.text


def test_a_just_expired_token_refreshes_within_the_grace(hk: Provider) -> None:
    expired = minted(hk, "agr-tok", age=timedelta(minutes=13))  # expired 3 minutes ago; grace is 5
    assert refresh(hk, expired).status_code == 200


def test_a_token_expired_beyond_the_grace_is_401_and_audited(hk: Provider) -> None:
    before = len(actions(hk, "dataplane.token.refresh"))
    r = refresh(hk, minted(hk, "agr-tok", age=timedelta(minutes=16)))
    assert r.status_code == 401
    assert r.json()["reason"] == "refresh-window-passed"
    denied = actions(hk, "dataplane.token.refresh")[before:]
    assert [(e.outcome, e.reason) for e in denied] == [(Outcome.DENIED, "refresh-window-passed")]


def test_a_token_refreshes_only_once(hk: Provider) -> None:
    token = minted(hk, "agr-tok", age=timedelta(minutes=1))
    first, second = refresh(hk, token), refresh(hk, token)
    assert first.status_code == 200
    assert (second.status_code, second.json()["reason"]) == (401, "token-reused")


def test_the_fresh_token_refreshes_in_turn(hk: Provider) -> None:
    first = refresh(hk, minted(hk, "agr-tok", age=timedelta(minutes=2))).json()["token"]
    assert refresh(hk, first).status_code == 200


def test_a_forged_token_is_401(hk: Provider) -> None:
    forged = mint_access_token(
        SigningKey.generate(), hk.id, CONSUMER, "agr-tok", "tr-agr-tok", hk.clock.now()
    )
    assert refresh(hk, forged).status_code == 401


def test_no_token_is_401(hk: Provider) -> None:
    assert httpx.post(f"{hk.url}/dataplane/token").status_code == 401


def test_a_retired_agreement_is_403(hk: Provider) -> None:
    a = hk.agreements["agr-tok-retired"]
    hk.agreements[a.id] = dataclasses.replace(a, retired_at=hk.clock.now() - timedelta(minutes=1))
    r = refresh(hk, minted(hk, a.id, age=timedelta(minutes=1)))
    assert (r.status_code, r.json()["reason"]) == (403, "agreement-not-usable")
    assert "retired" in r.json()["detail"]


def test_a_transfer_no_longer_started_is_403(hk: Provider) -> None:
    t = hk.transfers["tr-agr-tok-suspended"]
    hk.transfers[t.id] = dataclasses.replace(t, state="SUSPENDED")
    r = refresh(hk, minted(hk, "agr-tok-suspended", age=timedelta(minutes=1)))
    assert r.status_code == 403
    assert "SUSPENDED" in r.json()["detail"]


def test_an_agreement_past_its_validity_period_is_403_with_the_policy_reasons(hk: Provider) -> None:
    a = hk.agreements["agr-tok-old"]  # the template's validity: elapsedTime ≤ P365D from signing
    hk.agreements[a.id] = dataclasses.replace(a, signed_at=hk.clock.now() - timedelta(days=400))
    before = len(actions(hk, "policy.decision"))
    r = refresh(hk, minted(hk, a.id, age=timedelta(minutes=1)))
    assert r.status_code == 403
    assert any("elapsed time P400D" in reason for reason in r.json()["reasons"]), r.text
    decided = actions(hk, "policy.decision")[before:]
    assert [(e.outcome, e.details["phase"], e.details["check"]) for e in decided] == [
        (Outcome.DENIED, "transfer", "token-refresh")
    ]


def test_a_successful_refresh_is_audited_with_the_transfer(hk: Provider) -> None:
    before = len(actions(hk, "dataplane.token.refresh"))
    assert refresh(hk, minted(hk, "agr-tok", age=timedelta(minutes=3))).status_code == 200
    done = actions(hk, "dataplane.token.refresh")[before:]
    assert [(e.outcome, e.subject, e.agreement_id) for e in done] == [
        (Outcome.SUCCESS, "transfer:tr-agr-tok", "agr-tok")
    ]
