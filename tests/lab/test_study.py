"""The lab: a study over three HTTP data planes, honest partial failures, federated GLM, review airlock."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import statsmodels.api as sm
from fastapi import FastAPI

from healthspace.compute import DuckDBEngine, GlmSite, parse_spec
from healthspace.connector.dataplane import data_classes_of, rules_from_policy
from healthspace.core.errors import AuthenticationError, ForbiddenError
from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore
from healthspace.lab import (
    Airlock,
    ReviewState,
    Site,
    Study,
    fit_federated_glm,
    run_study,
    site_from_transfer,
)
from healthspace.lab.sites import verify_envelope
from healthspace.policy import ExportApproval
from tests.dataplane.provider import CONSUMER, SCENARIO, Provider
from tests.support.servers import bind_loopback, serve, url_of

E11 = {"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}
COUNT_SPEC: dict[str, Any] = {
    "version": 1,
    "cohort": {"inclusion": [E11]},
    "analyses": [{"type": "count", "id": "n"}],
}
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


@pytest.fixture(scope="module")
def sites(providers: dict[str, Provider]) -> dict[str, Site]:
    out = {}
    for name, p in providers.items():
        p.add_agreement("agr-lab")
        p.approvals.append(
            ExportApproval("CAC-TEST-1", p.dataset_id, CONSUMER, SCENARIO, p.clock.now() + timedelta(days=30))
        )
        out[name] = Site(p.id, f"{p.url}/dataplane", p.token("agr-lab"), "agr-lab")
    return out


def test_study_count_is_the_sum_of_pandas_truth_over_three_sites(
    providers: dict[str, Provider], sites: dict[str, Site]
) -> None:
    result = run_study(Study(SCENARIO, COUNT_SPEC, list(sites.values())), timeout_s=30)
    truth = sum(len(p.with_condition("E11") & p.consenting_ids()) for p in providers.values())
    assert [s.status for s in result.sites] == ["ok", "ok", "ok"]
    assert result.combined["n"] == {"type": "count", "count": truth, "exact": True}


def test_study_keeps_provenance_of_agreements_and_jobs(sites: dict[str, Site]) -> None:
    result = run_study(Study(SCENARIO, COUNT_SPEC, list(sites.values())))
    prov = result.provenance
    assert prov["agreements"] == {s.id: "agr-lab" for s in sites.values()}
    assert set(prov["jobs"]) == {s.id for s in sites.values()}
    assert all(prov["jobs"].values())
    assert prov["missing"] == []


def test_dead_site_is_reported_unreachable_and_the_rest_combined(
    providers: dict[str, Provider], sites: dict[str, Site]
) -> None:
    closed = bind_loopback()  # bound, never listening: connections are refused
    dead = Site("dead-hospital", f"{url_of(closed)}/dataplane", "x")
    try:
        result = run_study(Study(SCENARIO, COUNT_SPEC, [sites["gz"], dead]), timeout_s=5)
    finally:
        closed.close()
    gz = providers["gz"]
    assert [(s.site, s.status) for s in result.sites] == [(gz.id, "ok"), ("dead-hospital", "unreachable")]
    assert result.combined["n"]["count"] == len(gz.with_condition("E11") & gz.consenting_ids())
    assert not result.complete


def test_slow_site_times_out_instead_of_hanging(sites: dict[str, Site]) -> None:
    slow = FastAPI()

    @slow.post("/dataplane/jobs")
    async def never_on_time() -> dict[str, str]:
        await asyncio.sleep(3)
        return {}

    with serve(slow) as url:
        t0 = time.perf_counter()
        result = run_study(
            Study(SCENARIO, COUNT_SPEC, [sites["hk"], Site("slow", f"{url}/dataplane", "x")]), timeout_s=0.5
        )
        elapsed = time.perf_counter() - t0
    assert [s.status for s in result.sites] == ["ok", "timeout"]
    assert elapsed < 2.5


def test_refusing_site_is_reported_with_its_reasons(sites: dict[str, Site]) -> None:
    result = run_study(Study("marketing-analytics", COUNT_SPEC, [sites["sz"]]))
    (outcome,) = result.sites
    assert (outcome.status, outcome.http_status) == ("refused", 403)
    assert any("purpose" in r for r in outcome.reasons)
    assert result.combined == {}


def test_result_signed_by_another_key_is_rejected(
    sites: dict[str, Site], providers: dict[str, Provider]
) -> None:
    wrong = providers["gz"].key.public_key_b64
    result = run_study(Study(SCENARIO, COUNT_SPEC, [sites["sz"]]), public_keys={sites["sz"].id: wrong})
    assert result.sites[0].status == "bad-signature"


def test_envelope_with_wrong_key_id_fails(providers: dict[str, Provider]) -> None:
    from healthspace.connector.dataplane import sign_payload

    env = sign_payload(providers["gz"].key, {"a": 1})
    with pytest.raises(AuthenticationError):
        verify_envelope(env, providers["hk"].key.public_key_b64)


def _pooled_design(providers: dict[str, Provider]) -> tuple[np.ndarray, np.ndarray]:
    spec = parse_spec(GLM_SPEC)
    xs, ys = [], []
    for p in providers.values():
        consent = p.consent.cohort(SCENARIO, data_classes_of(spec), actor="test", at=p.clock.now())
        rules = rules_from_policy(p.agreements["agr-lab"].policy)
        with ClinicalStore.open(p.store_path, LocalKeyStore(p.keys_dir)) as store:
            site = GlmSite(DuckDBEngine(store.connect()), consent, spec, "death", rules)
        xs.append(site._x)
        ys.append(site._y)
    return np.vstack(xs), np.concatenate(ys)


def test_federated_glm_over_three_http_sites_equals_the_pooled_fit(
    providers: dict[str, Provider], sites: dict[str, Site]
) -> None:
    out = fit_federated_glm(Study(SCENARIO, GLM_SPEC, list(sites.values())), "death")
    x, y = _pooled_design(providers)
    pooled = sm.GLM(y, x, family=sm.families.Binomial()).fit(tol=1e-12)
    assert out.fit is not None, out.detail
    np.testing.assert_allclose(out.fit.coef, pooled.params, atol=1e-6)
    np.testing.assert_allclose(out.fit.se, pooled.bse, atol=1e-6)
    assert [s.result["result"]["analyses"]["death"]["type"] for s in out.sites if s.result] == ["glm"] * 3


def test_site_from_a_started_transfer_reads_the_data_address() -> None:
    transfer = {
        "id": "t1",
        "state": "STARTED",
        "counterparty_id": "gz-hospital",
        "agreement_id": "agr-1",
        "data_address": {
            "endpoint": "http://gz.example/dataplane",
            "endpointProperties": [
                {"name": "authorization", "value": "tok"},
                {"name": "authType", "value": "bearer"},
            ],
        },
    }
    assert site_from_transfer(transfer) == Site("gz-hospital", "http://gz.example/dataplane", "tok", "agr-1")


def test_airlock_releases_only_after_two_reviewers_who_are_not_the_requester() -> None:
    airlock = Airlock()
    held = airlock.hold("alice", {"n": 1})
    with pytest.raises(ForbiddenError):
        airlock.approve(held.id, "alice")
    airlock.approve(held.id, "bob")
    with pytest.raises(ForbiddenError):
        airlock.released(held.id)
    assert airlock.approve(held.id, "carol").state is ReviewState.RELEASED
    assert airlock.released(held.id) == {"n": 1}


def test_airlock_does_not_count_one_reviewer_twice() -> None:
    airlock = Airlock()
    held = airlock.hold("alice", {"n": 1})
    airlock.approve(held.id, "bob")
    with pytest.raises(Exception, match="already approved"):
        airlock.approve(held.id, "bob")
    assert held.state is ReviewState.HELD


def test_envelope_checks_reuse_the_parsed_key_and_still_refuse_a_bad_signature(
    providers: dict[str, Provider], monkeypatch: pytest.MonkeyPatch
) -> None:
    from healthspace.connector.dataplane import sign_payload
    from healthspace.lab import sites

    key = providers["gz"].key
    parsed = []
    real = sites.public_key_from_b64
    monkeypatch.setattr(sites, "public_key_from_b64", lambda b64: parsed.append(b64) or real(b64))
    sites._provider_key.cache_clear()
    env = sign_payload(key, {"job_id": "j", "result": {"n": 12}})
    for _ in range(3):
        assert verify_envelope(env, key.public_key_b64) == env["payload"]
    assert parsed == [key.public_key_b64]
    forged = {**env, "payload": {"job_id": "j", "result": {"n": 13}}}
    with pytest.raises(AuthenticationError) as exc:
        verify_envelope(forged, key.public_key_b64)
    assert exc.value.extra["reason"] == "bad-signature"
    with pytest.raises(AuthenticationError) as exc:
        verify_envelope(env, providers["hk"].key.public_key_b64)
    assert exc.value.extra["reason"] == "wrong-key"
