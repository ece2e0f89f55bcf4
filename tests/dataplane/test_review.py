"""The output-review airlock on the provider: held results, two distinct reviewers, final rejections."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from healthspace.audit.models import Outcome
from healthspace.core.apikeys import IssuedKey, Role
from healthspace.lab import verify_envelope
from tests.dataplane.provider import CONSUMER, SCENARIO, Provider

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
            "id": "m",
            "family": "gaussian",
            "outcome": {"kind": "age"},
            "covariates": [{"kind": "male"}],
        }
    ],
}


@pytest.fixture(scope="module")
def sz(providers: dict[str, Provider]) -> Provider:
    p = providers["sz"]
    p.add_agreement("agr-review", review_output=True)
    p.add_agreement("agr-no-review")
    return p


@pytest.fixture(scope="module")
def keys(sz: Provider) -> dict[str, IssuedKey]:
    return {
        "steward1": sz.staff_key(Role.STEWARD, "steward one"),
        "steward2": sz.staff_key(Role.STEWARD, "steward two"),
        "reviewer": sz.staff_key(Role.REVIEWER, "output reviewer"),
        "researcher": sz.staff_key(Role.RESEARCHER, "a researcher"),
        "admin": sz.staff_key(Role.ADMIN, "admin"),
        "requester": sz.staff_key(Role.STEWARD, CONSUMER),  # a key labelled as the requester
    }


def submit(p: Provider, agreement_id: str, spec: dict[str, Any] = COUNT_SPEC) -> httpx.Response:
    return httpx.post(
        f"{p.url}/dataplane/jobs",
        json={"scenario": SCENARIO, "spec": spec},
        headers={"Authorization": f"Bearer {p.token(agreement_id)}"},
        timeout=30,
    )


def staff(p: Provider, key: IssuedKey, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        method, f"{p.url}/management/reviews{path}", headers={"X-API-Key": key.secret}, timeout=30, **kw
    )


def held_job(p: Provider) -> dict[str, Any]:
    r = submit(p, "agr-review")
    assert r.status_code == 200, r.text
    return dict(r.json())


def actions(p: Provider, subject: str) -> list[tuple[str, Outcome]]:
    return [
        (e.entry.action, e.entry.outcome)
        for e in p.audit.entries(0, p.audit.size)
        if e.entry.subject == subject
    ]


def test_a_job_under_a_review_duty_ends_held_without_its_result(sz: Provider) -> None:
    job = held_job(sz)
    assert (job["state"], job["signed"]) == ("HELD", None)
    assert (job["review"]["state"], job["review"]["approvals"], job["review"]["required"]) == ("HELD", 0, 2)
    again = httpx.get(
        f"{sz.url}/dataplane/jobs/{job['id']}",
        headers={"Authorization": f"Bearer {sz.token('agr-review')}"},
    ).json()
    assert (again["state"], again["signed"]) == ("HELD", None)


def test_a_job_without_the_duty_is_not_held(sz: Provider) -> None:
    r = submit(sz, "agr-no-review")
    assert (r.json()["state"], r.json()["review"]) == ("SUCCEEDED", None)


def test_two_distinct_reviewers_release_the_signed_result(sz: Provider, keys: dict[str, IssuedKey]) -> None:
    job = held_job(sz)
    review_id = job["review"]["id"]
    first = staff(sz, keys["steward1"], "POST", f"/{review_id}/approve")
    again = staff(sz, keys["steward1"], "POST", f"/{review_id}/approve")
    mid = httpx.get(
        f"{sz.url}/dataplane/jobs/{job['id']}", headers={"Authorization": f"Bearer {sz.token('agr-review')}"}
    ).json()
    second = staff(sz, keys["reviewer"], "POST", f"/{review_id}/approve")
    assert (first.status_code, first.json()["state"]) == (200, "HELD")
    assert (again.status_code, again.json()["reason"]) == (409, "already-approved")
    assert (mid["state"], mid["signed"], mid["review"]["approvals"]) == ("HELD", None, 1)
    assert (second.status_code, second.json()["state"]) == (200, "RELEASED")
    released = httpx.get(
        f"{sz.url}/dataplane/jobs/{job['id']}", headers={"Authorization": f"Bearer {sz.token('agr-review')}"}
    ).json()
    assert released["state"] == "SUCCEEDED"
    payload = verify_envelope(released["signed"], sz.key.public_key_b64)
    truth = len(sz.with_condition("E11") & sz.consenting_ids())
    assert (payload["job_id"], payload["result"]["analyses"]["n"]["count"]) == (job["id"], truth)
    assert actions(sz, f"review:{review_id}") == [
        ("dataplane.review.hold", Outcome.SUCCESS),
        ("dataplane.review.approve", Outcome.SUCCESS),
        ("dataplane.review.approve", Outcome.DENIED),
        ("dataplane.review.approve", Outcome.SUCCESS),
        ("dataplane.review.release", Outcome.SUCCESS),
    ]


def test_a_rejection_needs_a_reason_and_is_final(sz: Provider, keys: dict[str, IssuedKey]) -> None:
    job = held_job(sz)
    review_id = job["review"]["id"]
    empty = staff(sz, keys["steward1"], "POST", f"/{review_id}/reject", json={"reason": ""})
    blank = staff(sz, keys["steward1"], "POST", f"/{review_id}/reject", json={"reason": "   "})
    rejected = staff(sz, keys["steward2"], "POST", f"/{review_id}/reject", json={"reason": "small cells"})
    late = staff(sz, keys["steward1"], "POST", f"/{review_id}/approve")
    assert (empty.status_code, blank.status_code) == (422, 422)
    assert (rejected.json()["state"], rejected.json()["reason"]) == ("REJECTED", "small cells")
    assert (late.status_code, late.json()["reason"]) == (409, "not-held")
    refused = httpx.get(
        f"{sz.url}/dataplane/jobs/{job['id']}", headers={"Authorization": f"Bearer {sz.token('agr-review')}"}
    ).json()
    assert (refused["state"], refused["signed"]) == ("REFUSED", None)
    assert refused["reason"] == "output review rejected: small cells"
    assert refused["review"]["reason"] == "small cells"


def test_the_requester_may_not_review(sz: Provider, keys: dict[str, IssuedKey]) -> None:
    review_id = held_job(sz)["review"]["id"]
    r = staff(sz, keys["requester"], "POST", f"/{review_id}/approve")
    assert (r.status_code, r.json()["reason"]) == (403, "own-result")


def test_roles_other_than_steward_and_reviewer_may_not_decide(
    sz: Provider, keys: dict[str, IssuedKey]
) -> None:
    review_id = held_job(sz)["review"]["id"]
    assert staff(sz, keys["researcher"], "POST", f"/{review_id}/approve").status_code == 403
    assert staff(sz, keys["admin"], "POST", f"/{review_id}/approve").status_code == 403
    assert httpx.post(f"{sz.url}/management/reviews/{review_id}/approve").status_code == 401
    assert staff(sz, keys["researcher"], "GET", "").status_code == 403


def test_staff_list_held_results_and_show_one_with_its_result(
    sz: Provider, keys: dict[str, IssuedKey]
) -> None:
    job = held_job(sz)
    review_id = job["review"]["id"]
    listed = staff(sz, keys["admin"], "GET", "").json()
    shown = staff(sz, keys["steward1"], "GET", f"/{review_id}").json()
    assert review_id in [r["id"] for r in listed]
    assert all(r["state"] == "HELD" and r["result"] is None for r in listed)
    assert shown["result"]["payload"]["job_id"] == job["id"]
    assert ("dataplane.review.view", Outcome.SUCCESS) in actions(sz, f"review:{review_id}")
    assert staff(sz, keys["admin"], "GET", "?state=bogus").status_code == 422
    assert staff(sz, keys["admin"], "GET", "/review-nope").status_code == 404


def test_held_results_count_as_uses_of_the_agreement(sz: Provider) -> None:
    sz.add_agreement("agr-review-once", review_output=True, max_uses=1)
    assert submit(sz, "agr-review-once").json()["state"] == "HELD"
    assert submit(sz, "agr-review-once").status_code == 403


def test_a_glm_under_a_review_duty_is_refused(providers: dict[str, Provider]) -> None:
    hk = providers["hk"]  # domestic for the consumer: only the review duty stands in the way
    hk.add_agreement("agr-review-glm", review_output=True)
    r = submit(hk, "agr-review-glm", GLM_SPEC)
    assert (r.status_code, r.json().get("reason")) == (403, "review-required"), r.text


def test_the_review_cli_lists_approves_and_rejects(sz: Provider, keys: dict[str, IssuedKey]) -> None:
    from typer.testing import CliRunner

    from healthspace.cli.review import review_app

    runner = CliRunner()
    first, second = held_job(sz)["review"]["id"], held_job(sz)["review"]["id"]

    def run(key: IssuedKey, *args: str) -> Any:
        return runner.invoke(review_app, [*args, "--url", sz.url, "--api-key", key.secret, "--json"])

    listed = run(keys["steward1"], "list")
    assert listed.exit_code == 0, listed.output
    assert {first, second} <= {r["id"] for r in json.loads(listed.output)}
    shown = json.loads(run(keys["steward1"], "show", first).output)
    assert shown["result"]["payload"]["job_id"] == shown["job_id"]
    assert json.loads(run(keys["steward1"], "approve", first).output)["state"] == "HELD"
    assert json.loads(run(keys["steward2"], "approve", first).output)["state"] == "RELEASED"
    rejected = run(keys["reviewer"], "reject", second, "--reason", "re-identification risk")
    assert json.loads(rejected.output)["state"] == "REJECTED"
    refused = run(keys["researcher"], "approve", second)
    assert refused.exit_code == 1
    assert "may not do this" in refused.output
