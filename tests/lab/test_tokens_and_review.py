"""The lab keeps data-plane tokens fresh by itself and reports results held for review honestly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from healthspace.audit.models import Outcome
from healthspace.connector.dataplane import Reviewer
from healthspace.connector.dsp.dataplane import mint_access_token
from healthspace.identity.keys import SigningKey
from healthspace.lab import Site, Study, TokenKeeper, fetch_released, run_study
from tests.dataplane.provider import SCENARIO, Provider
from tests.support.servers import serve

E11 = {"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}
COUNT_SPEC: dict[str, Any] = {
    "version": 1,
    "cohort": {"inclusion": [E11]},
    "analyses": [{"type": "count", "id": "n"}],
}


def truth(p: Provider) -> int:
    return len(p.with_condition("E11") & p.consenting_ids())


def site(p: Provider, agreement_id: str, **terms: Any) -> Site:
    if agreement_id not in p.agreements:
        p.add_agreement(agreement_id, **terms)
    return Site(p.id, f"{p.url}/dataplane", p.token(agreement_id), agreement_id)


@contextmanager
def provider_time_moved(p: Provider, delta: timedelta) -> Iterator[None]:
    p.clock.advance(delta)
    try:
        yield
    finally:
        p.clock.advance(-delta)


def refreshes(p: Provider, transfer_id: str) -> list[Outcome]:
    return [
        e.entry.outcome
        for e in p.audit.entries(0, p.audit.size)
        if e.entry.action == "dataplane.token.refresh" and e.entry.subject == f"transfer:{transfer_id}"
    ]


def test_an_expired_token_is_refreshed_on_401_and_the_study_completes(
    providers: dict[str, Provider],
) -> None:
    hk = providers["hk"]
    s = site(hk, "agr-lab-expiry")
    keeper = TokenKeeper()
    with provider_time_moved(hk, timedelta(minutes=12)):  # expired 2 minutes ago at the provider
        result = run_study(Study(SCENARIO, COUNT_SPEC, [s]), tokens=keeper)
    assert result.sites[0].status == "ok", result.sites[0].detail
    assert result.combined["n"]["count"] == truth(hk)
    assert refreshes(hk, "tr-agr-lab-expiry") == [Outcome.SUCCESS]


def test_a_token_near_expiry_is_refreshed_before_the_call(providers: dict[str, Provider]) -> None:
    gz = providers["gz"]
    s = site(gz, "agr-lab-ahead")
    now = [1000.0]
    keeper = TokenKeeper(refresh_before_s=60, clock=lambda: now[0])
    first = run_study(Study(SCENARIO, COUNT_SPEC, [s]), tokens=keeper)
    now[0] += 550  # 50 s of the token's 600 left: inside the refresh margin
    second = run_study(Study(SCENARIO, COUNT_SPEC, [s]), tokens=keeper)
    now[0] += 100  # the fresh token has 500 s left: no refresh
    third = run_study(Study(SCENARIO, COUNT_SPEC, [s]), tokens=keeper)
    assert [r.sites[0].status for r in (first, second, third)] == ["ok", "ok", "ok"]
    assert refreshes(gz, "tr-agr-lab-ahead") == [Outcome.SUCCESS]


def test_a_token_too_old_to_refresh_is_reported_refused_with_the_reason(
    providers: dict[str, Provider],
) -> None:
    sz = providers["sz"]
    s = site(sz, "agr-lab-too-old")
    with provider_time_moved(sz, timedelta(minutes=20)):
        result = run_study(Study(SCENARIO, COUNT_SPEC, [s]), tokens=TokenKeeper())
    out = result.sites[0]
    assert (out.status, out.http_status) == ("refused", 401)
    assert "can no longer be refreshed" in out.detail
    assert result.combined == {}


@pytest.fixture
def review_study(providers: dict[str, Provider]) -> tuple[Study, Provider]:
    gz, sz, hk = providers["gz"], providers["sz"], providers["hk"]
    n = len(sz.agreements)
    sites = [
        site(gz, f"agr-lab-plain-{n}"),
        site(sz, f"agr-lab-review-{n}", review_output=True),
        site(hk, f"agr-lab-plain-{n}"),
    ]
    return Study(SCENARIO, COUNT_SPEC, sites), sz


def test_a_held_site_is_reported_held_neither_result_nor_failure(
    providers: dict[str, Provider], review_study: tuple[Study, Provider]
) -> None:
    study, sz = review_study
    result = run_study(study)
    held = next(o for o in result.sites if o.site == sz.id)
    assert (held.status, held.result, held.review["approvals"]) == ("held", None, 0)
    assert "held for output review" in held.detail
    assert result.combined["n"]["count"] == truth(providers["gz"]) + truth(providers["hk"])
    assert (result.complete, result.provenance["held"], result.provenance["missing"]) == (
        False,
        [sz.id],
        [],
    )


def test_a_released_result_is_fetched_and_combined(
    providers: dict[str, Provider], review_study: tuple[Study, Provider]
) -> None:
    study, sz = review_study
    result = run_study(study)
    held = next(o for o in result.sites if o.held)
    review_id = held.review["id"]
    sz.service.review.approve(review_id, Reviewer("k-a", "steward"))
    still = fetch_released(study, result)
    sz.service.review.approve(review_id, Reviewer("k-b", "reviewer"))
    done = fetch_released(study, still)
    assert [o.status for o in still.sites] == ["ok", "held", "ok"]
    assert [o.status for o in done.sites] == ["ok", "ok", "ok"]
    assert done.complete
    assert done.combined["n"]["count"] == sum(truth(p) for p in providers.values())


def test_a_rejected_result_is_reported_refused_with_the_reviewers_reason(
    review_study: tuple[Study, Provider],
) -> None:
    study, sz = review_study
    result = run_study(study)
    review_id = next(o for o in result.sites if o.held).review["id"]
    sz.service.review.reject(review_id, Reviewer("k-a", "steward"), "cells too small to publish")
    after = fetch_released(study, result)
    rejected = next(o for o in after.sites if o.site == sz.id)
    assert (rejected.status, rejected.detail) == (
        "refused",
        "output review rejected: cells too small to publish",
    )
    assert after.combined["n"]["count"] == result.combined["n"]["count"]


def test_a_newer_data_address_token_replaces_the_chain_held(providers: dict[str, Provider]) -> None:
    from healthspace.connector.dsp.dataplane import mint_access_token

    gz = providers["gz"]
    old = mint_access_token(gz.key, gz.id, "hk-university", "agr-x", "tr-x", gz.clock.now())
    new = mint_access_token(
        gz.key, gz.id, "hk-university", "agr-x", "tr-x", gz.clock.now() + timedelta(minutes=1)
    )
    keeper = TokenKeeper()
    with httpx.Client() as http:
        first = keeper.token(http, Site(gz.id, f"{gz.url}/dataplane", old, "agr-x"))
        second = keeper.token(http, Site(gz.id, f"{gz.url}/dataplane", new, "agr-x"))
        again_old = keeper.token(http, Site(gz.id, f"{gz.url}/dataplane", old, "agr-x"))
    assert (first, second, again_old) == (old, new, new)


GLM_SPEC: dict[str, Any] = {
    "version": 1,
    "analyses": [
        {
            "type": "glm",
            "id": "death",
            "family": "binomial",
            "outcome": {"kind": "has", "criterion": {"type": "event", "event": {"domain": "death"}}},
            "covariates": [{"kind": "age", "center": 60, "scale": 10}, {"kind": "male"}],
        }
    ],
}


def test_a_federated_fit_outlives_its_tokens(providers: dict[str, Provider]) -> None:
    from healthspace.lab import fit_federated_glm
    from healthspace.policy import ExportApproval

    sites = []
    for p in providers.values():
        p.add_agreement("agr-lab-long-fit")
        p.approvals.append(
            ExportApproval(
                "CAC-LONG", p.dataset_id, "hk-university", SCENARIO, p.clock.now() + timedelta(days=30)
            )
        )
        sites.append(Site(p.id, f"{p.url}/dataplane", p.token("agr-lab-long-fit"), "agr-lab-long-fit"))
    now = [0.0]

    def slow_clock() -> float:
        now[0] += 120.0  # each look at the clock is two minutes later: tokens age fast
        return now[0]

    study = Study(SCENARIO, GLM_SPEC, sites)
    long = fit_federated_glm(study, "death", tokens=TokenKeeper(clock=slow_clock))
    plain = fit_federated_glm(study, "death", tokens=TokenKeeper())
    assert long.fit is not None, long.detail
    assert plain.fit is not None, plain.detail
    np.testing.assert_allclose(long.fit.coef, plain.fit.coef, rtol=0, atol=1e-12)
    assert [s.status for s in long.sites] == ["ok", "ok", "ok"]
    assert all(len(refreshes(p, "tr-agr-lab-long-fit")) >= 2 for p in providers.values())


def test_token_claims_are_read_once_per_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from healthspace.lab import sites as lab_sites

    decoded = []
    real = lab_sites.jwt.decode
    monkeypatch.setattr(lab_sites.jwt, "decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    lab_sites._claims.cache_clear()
    key = SigningKey.generate()
    token = mint_access_token(key, "gz-hospital", "hk-university", "agr", "tr-9", datetime.now(UTC))
    assert [lab_sites._claims(token)[0] for _ in range(4)] == ["tr-9"] * 4
    assert len(decoded) == 1


def test_a_call_sends_its_body_as_json_once_encoded_and_resends_it_after_a_refresh() -> None:
    key = SigningKey.generate()
    now = datetime.now(UTC)
    old = mint_access_token(key, "p", "c", "agr", "tr-1", now - timedelta(hours=1), timedelta(minutes=10))
    fresh = mint_access_token(key, "p", "c", "agr", "tr-1", now)
    seen: list[tuple[str, str, bytes]] = []
    app = FastAPI()

    @app.post("/dataplane/jobs")
    async def jobs(request: Request) -> JSONResponse:
        seen.append((request.headers["authorization"], request.headers["content-type"], await request.body()))
        if request.headers["authorization"] != f"Bearer {fresh}":
            return JSONResponse({"reason": "token-expired"}, status_code=401)
        return JSONResponse({"ok": True})

    @app.post("/dataplane/token")
    def token() -> dict[str, str]:
        return {"token": fresh}

    body = {"scenario": "s", "spec": {"codes": [f"C{i:03d}" for i in range(1000)], "x": 0.5}}
    with serve(app) as url, httpx.Client() as http:
        site = Site("p", f"{url}/dataplane", old)
        r = TokenKeeper(refresh_before_s=0).call(http, site, "POST", "/jobs", body)
    assert r.status_code == 200
    assert [(a, t) for a, t, _ in seen] == [
        (f"Bearer {old}", "application/json"),
        (f"Bearer {fresh}", "application/json"),
    ]
    assert seen[0][2] == seen[1][2]
    assert httpx.Response(200, content=seen[1][2]).json() == body
