"""The data-plane job API: same answer as run_job and pandas, policy and token refusals, lifecycle."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from healthspace.audit.models import Outcome
from healthspace.compute import DifferencingGuard, DuckDBEngine, JobContext, parse_spec, run_job
from healthspace.compute.disclosure import DisclosureError
from healthspace.compute.guard import decode_ids
from healthspace.compute.tables import CohortHistoryRow
from healthspace.connector.dataplane import JobCreate, JobPublic, JobState, data_classes_of, rules_from_policy
from healthspace.connector.dataplane import service as service_module
from healthspace.connector.dataplane.tables import JobRow
from healthspace.connector.dsp.dataplane import mint_access_token
from healthspace.core.errors import ConflictError
from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore
from healthspace.identity.keys import SigningKey
from healthspace.lab import verify_envelope
from healthspace.policy.compiler import compile_policy
from tests.dataplane.provider import CONSUMER, SCENARIO, Provider

E11 = {"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}
COUNT_SPEC: dict[str, Any] = {
    "version": 1,
    "cohort": {"inclusion": [E11]},
    "analyses": [
        {"type": "count", "id": "n"},
        {"type": "stratified_count", "id": "by_sex", "by": [{"var": "sex"}]},
    ],
}
DP_SPEC: dict[str, Any] = {
    "version": 1,
    "cohort": {"inclusion": [E11]},
    "analyses": [{"type": "count", "id": "n"}],
    "privacy": {"epsilon": 0.6},
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


def post_job(p: Provider, token: str, spec: dict[str, Any], scenario: str = SCENARIO) -> httpx.Response:
    return httpx.post(
        f"{p.url}/dataplane/jobs",
        json={"scenario": scenario, "spec": spec},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def entries(p: Provider, action: str) -> list[Any]:
    return [e for e in p.audit_entries() if e.action == action]


@pytest.fixture(scope="module")
def gz(providers: dict[str, Provider]) -> Provider:
    p = providers["gz"]
    for agreement_id, terms in {
        "agr-plain": {},
        "agr-dp": {"epsilon": 1.0},
        "agr-once": {"max_uses": 1},
        "agr-glm": {},
    }.items():
        p.add_agreement(agreement_id, **terms)
    p.add_agreement("agr-other-consumer", consumer="sg-pharma")
    return p


def test_job_through_the_api_equals_run_job_directly(gz: Provider) -> None:
    r = post_job(gz, gz.token("agr-plain"), COUNT_SPEC)
    assert r.status_code == 200, r.text
    job = r.json()
    spec = parse_spec(COUNT_SPEC)
    consent = gz.consent.cohort(SCENARIO, data_classes_of(spec), actor="test", at=gz.clock.now())
    rules = rules_from_policy(gz.agreements["agr-plain"].policy)
    with ClinicalStore.open(gz.store_path, LocalKeyStore(gz.keys_dir)) as store:
        direct = run_job(
            spec, DuckDBEngine(store.connect()), consent, rules, JobContext("x", CONSUMER, SCENARIO, "d")
        )
    assert job["state"] == "SUCCEEDED"
    assert job["signed"]["payload"]["result"]["analyses"] == direct.analyses


def test_job_count_equals_pandas_ground_truth_with_consent_applied(gz: Provider) -> None:
    job = post_job(gz, gz.token("agr-plain"), COUNT_SPEC).json()
    cohort = gz.with_condition("E11") & gz.consenting_ids()
    analyses = job["signed"]["payload"]["result"]["analyses"]
    assert analyses["n"]["count"] == len(cohort)
    assert analyses["by_sex"]["total"] == len(cohort)
    sexes = gz.sex_of(cohort)
    assert dict(zip(analyses["by_sex"]["levels"][0], analyses["by_sex"]["counts"], strict=True)) == sexes


def test_consent_registry_cohort_is_the_synth_consent_truth(gz: Provider) -> None:
    got = gz.consent.cohort(SCENARIO, ["demographics", "conditions"], actor="test", at=gz.clock.now())
    assert {int(i) for i in got.person_ids.to_pylist()} == gz.store_ids(gz.consenting_ids())


def test_result_is_signed_by_the_provider_key(gz: Provider) -> None:
    job = post_job(gz, gz.token("agr-plain"), COUNT_SPEC).json()
    payload = verify_envelope(job["signed"], gz.key.public_key_b64)
    assert (payload["job_id"], payload["agreement_id"], payload["consumer"]) == (
        job["id"],
        "agr-plain",
        CONSUMER,
    )


def test_tampered_result_fails_verification(gz: Provider) -> None:
    job = post_job(gz, gz.token("agr-plain"), COUNT_SPEC).json()
    job["signed"]["payload"]["result"]["analyses"]["n"]["count"] += 1
    with pytest.raises(Exception, match="signature"):
        verify_envelope(job["signed"], gz.key.public_key_b64)


def test_successful_job_is_audited_with_scenario_agreement_and_job(gz: Provider) -> None:
    job = post_job(gz, gz.token("agr-plain"), COUNT_SPEC).json()
    runs = [e for e in entries(gz, "dataplane.job.run") if e.subject == f"job:{job['id']}"]
    decided = [e for e in entries(gz, "policy.decision") if e.subject == f"job:{job['id']}"]
    assert [(e.outcome, e.scenario_id, e.agreement_id) for e in runs] == [
        (Outcome.SUCCESS, SCENARIO, "agr-plain")
    ]
    assert [e.outcome for e in decided] == [Outcome.ALLOWED]


def test_wrong_scenario_is_refused_403_with_reasons_and_audited(gz: Provider) -> None:
    r = post_job(gz, gz.token("agr-plain"), COUNT_SPEC, scenario="marketing-analytics")
    assert r.status_code == 403
    problem = r.json()
    assert problem["code"] == "policy-denied"
    assert any("purpose" in reason for reason in problem["reasons"])
    denied = [e for e in entries(gz, "policy.decision") if e.subject == f"job:{problem['job_id']}"]
    assert [(e.outcome, e.agreement_id) for e in denied] == [(Outcome.DENIED, "agr-plain")]


def test_refused_job_is_recorded_refused(gz: Provider) -> None:
    token = gz.token("agr-plain")
    problem = post_job(gz, token, COUNT_SPEC, scenario="marketing-analytics").json()
    r = httpx.get(
        f"{gz.url}/dataplane/jobs/{problem['job_id']}", headers={"Authorization": f"Bearer {token}"}
    )
    assert (r.json()["state"], r.json()["reason"] != "") == ("REFUSED", True)


def test_exhausted_privacy_budget_is_refused_403(gz: Provider) -> None:
    first = post_job(gz, gz.token("agr-dp"), DP_SPEC)
    second = post_job(gz, gz.token("agr-dp"), DP_SPEC)
    assert first.status_code == 200, first.text
    assert first.json()["epsilon"] == pytest.approx(0.6)
    assert second.status_code == 403
    assert any("privacy budget" in reason for reason in second.json()["reasons"]), second.text


def test_use_count_limit_is_refused_after_the_last_use(gz: Provider) -> None:
    assert post_job(gz, gz.token("agr-once"), COUNT_SPEC).status_code == 200
    assert post_job(gz, gz.token("agr-once"), COUNT_SPEC).status_code == 403


def test_forged_token_is_401_and_audited(gz: Provider) -> None:
    forged = mint_access_token(
        SigningKey.generate(), gz.id, CONSUMER, "agr-plain", "tr-agr-plain", gz.clock.now()
    )
    before = len(entries(gz, "dataplane.authenticate"))
    r = post_job(gz, forged, COUNT_SPEC)
    assert r.status_code == 401
    assert len(entries(gz, "dataplane.authenticate")) == before + 1


def test_expired_token_is_401(gz: Provider) -> None:
    old = mint_access_token(
        gz.key, gz.id, CONSUMER, "agr-plain", "tr-agr-plain", gz.clock.now() - timedelta(minutes=30)
    )
    r = post_job(gz, old, COUNT_SPEC)
    assert r.status_code == 401
    assert "expired" in r.json()["detail"]


def test_missing_token_is_401(gz: Provider) -> None:
    r = httpx.post(f"{gz.url}/dataplane/jobs", json={"scenario": SCENARIO, "spec": COUNT_SPEC})
    assert r.status_code == 401


def test_token_naming_another_consumers_agreement_is_403(gz: Provider) -> None:
    r = post_job(gz, gz.token("agr-other-consumer", consumer=CONSUMER), COUNT_SPEC)
    assert r.status_code == 403


def test_transfer_not_started_is_403(gz: Provider) -> None:
    gz.add_agreement("agr-suspended")
    gz.transfers["tr-agr-suspended"] = type(gz.transfers["tr-agr-suspended"])(
        "tr-agr-suspended", "agr-suspended", "SUSPENDED"
    )
    r = post_job(gz, gz.token("agr-suspended"), COUNT_SPEC)
    assert r.status_code == 403
    assert "SUSPENDED" in r.json()["detail"]


def test_job_of_another_agreement_is_not_found(gz: Provider) -> None:
    job = post_job(gz, gz.token("agr-plain"), COUNT_SPEC).json()
    r = httpx.get(
        f"{gz.url}/dataplane/jobs/{job['id']}", headers={"Authorization": f"Bearer {gz.token('agr-glm')}"}
    )
    assert r.status_code == 404


def test_invalid_spec_is_a_422_problem_not_500(gz: Provider) -> None:
    r = post_job(gz, gz.token("agr-plain"), {"version": 2, "analyses": []})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")


def test_cancelling_a_finished_job_is_409(gz: Provider) -> None:
    token = gz.token("agr-plain")
    job = post_job(gz, token, COUNT_SPEC).json()
    r = httpx.post(
        f"{gz.url}/dataplane/jobs/{job['id']}/cancel", headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 409


def test_glm_from_cn_gd_without_export_approval_is_refused(gz: Provider) -> None:
    r = post_job(gz, gz.token("agr-glm"), GLM_SPEC)
    assert r.status_code == 403
    assert any("export approval" in reason for reason in r.json()["reasons"])


def test_glm_session_opens_running_and_cancels(providers: dict[str, Provider]) -> None:
    hk = providers["hk"]  # domestic for the HK consumer: no export approval needed
    hk.add_agreement("agr-glm-session")
    token = hk.token("agr-glm-session")
    opened = post_job(hk, token, GLM_SPEC)
    assert opened.status_code == 200, opened.text
    job = opened.json()
    cancelled = httpx.post(
        f"{hk.url}/dataplane/jobs/{job['id']}/cancel", headers={"Authorization": f"Bearer {token}"}
    )
    step = httpx.post(
        f"{hk.url}/dataplane/glm/{job['id']}",
        json={"analysis": "m", "beta": [0.0, 0.0]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert (job["state"], job["glm"]["m"]["n_params"]) == ("RUNNING", 2)
    assert cancelled.json()["state"] == JobState.CANCELLED
    assert step.status_code == 409


def test_job_phase_denial_is_audited_as_a_policy_decision_like_contract_and_transfer(gz: Provider) -> None:
    problem = post_job(gz, gz.token("agr-plain"), COUNT_SPEC, scenario="marketing-analytics").json()
    decided = [e for e in entries(gz, "policy.decision") if e.subject == f"job:{problem['job_id']}"]
    assert len(decided) == 1
    e = decided[0]
    assert (e.outcome, e.actor, e.agreement_id, e.scenario_id) == (
        Outcome.DENIED,
        CONSUMER,
        "agr-plain",
        "marketing-analytics",
    )
    # the keys a regulator filters every policy decision on (connector.gate.record_decision)
    assert {k: e.details[k] for k in ("phase", "check", "dataset_id", "consumer_id", "output_types")} == {
        "phase": "job",
        "check": "job",
        "dataset_id": gz.dataset_id,
        "consumer_id": CONSUMER,
        "output_types": [],
    }
    assert "purpose" in e.reason


def test_an_error_inside_the_gate_denies_the_job(
    providers: dict[str, Provider], monkeypatch: pytest.MonkeyPatch
) -> None:
    sz = providers["sz"]
    sz.add_agreement("agr-gate-error")

    class Broken:
        def get(self, participant_id: str) -> None:
            raise RuntimeError("directory defect")

    monkeypatch.setattr(sz.service.gate, "directory", Broken())
    r = post_job(sz, sz.token("agr-gate-error"), COUNT_SPEC)
    assert r.status_code == 403
    assert r.json()["reasons"] == ["policy gate error (RuntimeError); denied"]


def test_an_unknown_consumer_is_denied_at_the_job_phase(
    providers: dict[str, Provider], monkeypatch: pytest.MonkeyPatch
) -> None:
    sz = providers["sz"]
    sz.add_agreement("agr-unknown-consumer")
    monkeypatch.setattr(sz.service.gate.directory, "get", lambda participant_id: None)
    r = post_job(sz, sz.token("agr-unknown-consumer"), COUNT_SPEC)
    assert r.status_code == 403
    assert "not an active member" in r.json()["reasons"][0]


def test_a_jobs_audit_entries_are_appended_together_in_order_when_it_ends(
    gz: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[list[Any]] = []

    def spy(batch: Any) -> Any:
        batches.append(list(batch))
        return gz.audit.append_many(batch)

    monkeypatch.setattr(gz.service, "_record_many", spy)
    before = gz.audit.size
    job = post_job(gz, gz.token("agr-plain"), COUNT_SPEC).json()
    assert [[(e.action, e.outcome) for e in b] for b in batches] == [
        [
            ("policy.decision", Outcome.ALLOWED),
            ("consent.cohort", Outcome.SUCCESS),
            ("dataplane.job.run", Outcome.SUCCESS),
        ]
    ]
    logged = [e.entry for e in gz.audit.entries(before, gz.audit.size)]
    assert [(e.action, e.subject) for e in logged] == [
        ("policy.decision", f"job:{job['id']}"),
        ("consent.cohort", f"scenario:{SCENARIO}"),
        ("dataplane.job.run", f"job:{job['id']}"),
    ]
    assert logged[1].actor == f"dataplane:{job['id']}"


def test_a_job_refused_after_the_decision_audits_decision_cohort_and_refusal(
    providers: dict[str, Provider],
) -> None:
    hk = providers["hk"]
    hk.add_agreement("agr-empty-cohort")
    nobody = {**E11, "event": {**E11["event"], "codes": ["Z99"]}}  # no such code: an empty cohort
    spec = {"version": 1, "cohort": {"inclusion": [nobody]}, "analyses": [{"type": "count", "id": "n"}]}
    r = post_job(hk, hk.token("agr-empty-cohort"), spec)
    assert (r.status_code, r.json()["code"]) == (403, "disclosure-refused")
    with hk.db.session() as s:
        rows = list(s.scalars(select(JobRow).where(JobRow.agreement_id == "agr-empty-cohort")))
    assert [row.state for row in rows] == [JobState.REFUSED.value]
    job_id = rows[0].id
    mine = [
        (e.action, e.outcome)
        for e in hk.audit_entries()
        if f"job:{job_id}" == e.subject or e.actor == f"dataplane:{job_id}"
    ]
    assert mine == [
        ("policy.decision", Outcome.ALLOWED),
        ("consent.cohort", Outcome.SUCCESS),
        ("dataplane.job.run", Outcome.DENIED),
    ]


def test_a_job_interrupted_mid_run_is_left_running_never_succeeded(
    providers: dict[str, Provider], monkeypatch: pytest.MonkeyPatch
) -> None:
    hk = providers["hk"]
    hk.add_agreement("agr-crash")

    class Crash(BaseException):
        """Stands for the process dying inside the engine: nothing after it runs."""

    def crash() -> Any:
        raise Crash

    monkeypatch.setattr(hk.service, "_connect", crash)
    checked = hk.service.authenticate(f"Bearer {hk.token('agr-crash')}")
    with pytest.raises(Crash):
        hk.service.submit(checked, JobCreate(scenario=SCENARIO, spec=COUNT_SPEC))
    with hk.db.session() as s:
        states = list(s.scalars(select(JobRow.state).where(JobRow.agreement_id == "agr-crash")))
    assert states == [JobState.RUNNING.value]
    assert not [e for e in entries(hk, "dataplane.job.run") if e.agreement_id == "agr-crash"]

    # The restarted data plane (a new process: another runner id) ends it as FAILED, with an audit
    # entry saying it was cut off.
    monkeypatch.undo()
    monkeypatch.setattr(hk.service, "runner", "restarted")
    (job_id,) = hk.service.fail_interrupted()
    with hk.db.session() as s:
        row = s.get(JobRow, job_id)
        assert row is not None
        assert (row.agreement_id, row.state) == ("agr-crash", JobState.FAILED.value)
        assert row.reason is not None
        assert row.reason.startswith("interrupted")
    (entry,) = [e for e in entries(hk, "dataplane.job.run") if e.agreement_id == "agr-crash"]
    assert (entry.outcome, entry.details["job_id"]) == (Outcome.FAILURE, job_id)
    assert hk.service.fail_interrupted() == []  # once


def test_a_job_is_ended_as_interrupted_only_once_the_process_running_it_is_gone(
    providers: dict[str, Provider], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several processes serve one database: a job another live process runs is its own business;
    the sweep ends it only when that process's instance lease has run out."""
    hk = providers["hk"]
    hk.add_agreement("agr-two-processes")
    held, go_on = threading.Event(), threading.Event()
    connect = hk.service._connect

    def slow() -> Any:  # the job is RUNNING (committed) while the engine is held here
        held.set()
        assert go_on.wait(30)
        return connect()

    monkeypatch.setattr(hk.service, "_connect", slow)
    monkeypatch.setattr(hk.service, "runner", "p1")
    token = hk.token("agr-two-processes")
    ended: list[BaseException] = []

    def submit() -> None:
        try:
            hk.service.submit(
                hk.service.authenticate(f"Bearer {token}"), JobCreate(scenario=SCENARIO, spec=COUNT_SPEC)
            )
        except BaseException as exc:
            ended.append(exc)

    job = threading.Thread(target=submit)
    job.start()
    try:
        assert held.wait(30)
        with hk.db.session() as s:
            (running,) = s.execute(
                select(JobRow.id, JobRow.runner).where(JobRow.agreement_id == "agr-two-processes")
            )
        assert running.runner == "p1"
        # p2 sweeps: while p1 is alive, nothing of p1's is touched; p1's own sweep skips it too.
        monkeypatch.setattr(hk.service, "runner", "p2")
        monkeypatch.setattr(hk.service, "_live_runners", lambda: frozenset({"p1", "p2"}))
        assert hk.service.fail_interrupted() == []
        monkeypatch.setattr(hk.service, "_live_runners", lambda: frozenset({"p2", "p3"}))
        assert hk.service.fail_interrupted() == [running.id]
    finally:
        go_on.set()
        job.join(30)
    with hk.db.session() as s:
        row = s.get(JobRow, running.id)
        assert row is not None
        # The job's own end found it no longer RUNNING: it could not succeed after being failed.
        assert (row.state, row.result) == (JobState.FAILED.value, None)
    assert len(ended) == 1
    assert isinstance(ended[0], ConflictError)  # a 409 for the consumer whose job was cut off


def test_a_jobs_person_sets_are_stored_with_it_and_guard_the_next_job(gz: Provider) -> None:
    # A cohort no other test releases (men with diabetes but no hypertension), so its set is new.
    men_with_t2d = {
        "version": 1,
        "cohort": {
            "inclusion": [E11, {"type": "sex", "sex": "male"}],
            "exclusion": [{"type": "event", "event": {"domain": "condition", "codes": ["I10"]}}],
        },
        "analyses": [{"type": "count", "id": "n"}],
    }
    with gz.db.session() as s:
        before = set(s.scalars(select(CohortHistoryRow.seq)))
    r = post_job(gz, gz.token("agr-plain"), men_with_t2d)
    assert r.status_code == 200, r.text
    with gz.db.session() as s:
        new = [row for row in s.scalars(select(CohortHistoryRow)) if row.seq not in before]
    assert [(row.dataset_id, row.consumer_id) for row in new] == [(gz.dataset_id, CONSUMER)]
    cohort = decode_ids(new[0].ids)
    # The stored set is the job's cohort: a later release of it minus one person is refused.
    with pytest.raises(DisclosureError, match="minimum difference"):
        DifferencingGuard(gz.service.history, 10).check(gz.dataset_id, [cohort[1:]])


def test_a_job_cancelled_while_it_runs_does_not_end_succeeded(
    providers: dict[str, Provider], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The success UPDATE applies only to a RUNNING row: a cancel that lands mid-run wins, and the job's
    result is neither stored nor returned."""
    hk = providers["hk"]
    hk.add_agreement("agr-cancel-mid-run")
    checked = hk.service.authenticate(f"Bearer {hk.token('agr-cancel-mid-run')}")
    real_run_job = service_module.run_job

    def cancelled_meanwhile(*args: Any, **kwargs: Any) -> Any:
        out = real_run_job(*args, **kwargs)
        hk.service.cancel(checked, args[4].job_id)  # the consumer's cancel, between run and success
        return out

    monkeypatch.setattr(service_module, "run_job", cancelled_meanwhile)
    with pytest.raises(ConflictError):
        hk.service.submit(checked, JobCreate(scenario=SCENARIO, spec=COUNT_SPEC))
    with hk.db.session() as s:
        rows = s.execute(
            select(JobRow.state, JobRow.result).where(JobRow.agreement_id == "agr-cancel-mid-run")
        ).all()
    assert [tuple(r) for r in rows] == [(JobState.CANCELLED.value, None)]
    # Its held entries are still appended: the decision and the cohort happened, and the run ended
    # without its result being stored.
    (cancel,) = [e for e in entries(hk, "dataplane.job.cancel") if e.agreement_id == "agr-cancel-mid-run"]
    job_id = cancel.subject.removeprefix("job:")
    mine = [e for e in hk.audit_entries() if e.subject == f"job:{job_id}" or e.actor == f"dataplane:{job_id}"]
    assert [(e.action, e.outcome) for e in mine] == [
        ("dataplane.job.cancel", Outcome.SUCCESS),
        ("policy.decision", Outcome.ALLOWED),
        ("consent.cohort", Outcome.SUCCESS),
        ("dataplane.job.run", Outcome.FAILURE),
    ]
    assert mine[-1].reason.startswith("the result was not stored")


def test_a_failing_consent_cohort_ends_the_job_failed_and_audited(
    providers: dict[str, Provider], monkeypatch: pytest.MonkeyPatch
) -> None:
    hk = providers["hk"]
    hk.add_agreement("agr-consent-down")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("registry unreadable")

    monkeypatch.setattr(hk.consent, "cohort", broken)
    r = post_job(hk, hk.token("agr-consent-down"), COUNT_SPEC)
    assert r.status_code == 500
    with hk.db.session() as s:
        rows = list(s.scalars(select(JobRow).where(JobRow.agreement_id == "agr-consent-down")))
    assert [(row.state, row.reason) for row in rows] == [
        (JobState.FAILED.value, "internal error (RuntimeError)")
    ]
    mine = [(e.action, e.outcome) for e in hk.audit_entries() if e.subject == f"job:{rows[0].id}"]
    assert mine == [("policy.decision", Outcome.ALLOWED), ("dataplane.job.run", Outcome.FAILURE)]


def test_the_consent_cohort_is_read_in_the_jobs_decision_transaction(
    gz: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    real = gz.consent.cohort

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("session"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gz.consent, "cohort", spy)
    assert gz.consent.database is gz.service.db
    assert post_job(gz, gz.token("agr-plain"), COUNT_SPEC).status_code == 200
    assert len(seen) == 1
    assert seen[0] is not None


def test_uses_are_counted_only_when_the_policy_may_limit_them(
    gz: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted: list[str] = []
    real = gz.service.gate.reads

    def spy(policy: Any, operand: str) -> bool:
        out = real(policy, operand)
        if operand == "count":
            counted.append("count" if out else "skip")
        return out

    monkeypatch.setattr(gz.service.gate, "reads", spy)
    assert post_job(gz, gz.token("agr-plain"), COUNT_SPEC).status_code == 200
    gz.add_agreement("agr-twice", max_uses=2)
    assert post_job(gz, gz.token("agr-twice"), COUNT_SPEC).status_code == 200
    assert post_job(gz, gz.token("agr-twice"), COUNT_SPEC).status_code == 200
    assert post_job(gz, gz.token("agr-twice"), COUNT_SPEC).status_code == 403  # the third use
    assert counted == ["skip", "count", "count", "count"]


def test_the_budget_is_summed_only_when_the_policy_may_limit_it(
    gz: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    sums: list[str] = []
    real = gz.service.ledger.spent

    def spy(*args: Any, **kwargs: Any) -> float:
        sums.append(args[0].consumer_id)
        return real(*args, **kwargs)

    monkeypatch.setattr(gz.service.ledger, "spent", spy)
    assert post_job(gz, gz.token("agr-plain"), COUNT_SPEC).status_code == 200
    assert sums == []  # no privacyBudget constraint: the ledger is not read
    # A consumer of its own: the ledger is per consumer x scenario x dataset, and other tests spend.
    gz.add_agreement("agr-dp-sums", consumer="sums-university", epsilon=1.0)
    token = gz.token("agr-dp-sums", consumer="sums-university")
    assert post_job(gz, token, DP_SPEC).status_code == 200
    refused = post_job(gz, token, DP_SPEC)  # beyond the budget: still refused
    assert refused.status_code == 403
    assert sums == ["sums-university", "sums-university"]


def _policy(rule: dict[str, Any], kind: str = "permission") -> dict[str, Any]:
    return {
        "@context": "http://www.w3.org/ns/odrl.jsonld",
        "@type": "Agreement",
        "@id": "urn:agreement:count-test",
        "target": "urn:dataset:x",
        "assigner": "gz",
        "assignee": "uni",
        kind: [{"action": "use", **rule}],
    }


def test_the_use_count_is_read_for_a_count_constraint_wherever_it_stands(gz: Provider) -> None:
    gate = gz.service.gate
    count = {"leftOperand": "count", "operator": "lteq", "rightOperand": "3"}
    purpose = {"leftOperand": "purpose", "operator": "eq", "rightOperand": "research"}
    assert not gate.reads(_policy({"constraint": [purpose]}), "count")
    with_count = [
        _policy({"constraint": [count]}),
        _policy({"constraint": [{**count, "leftOperand": "odrl:count"}]}),
        _policy({"constraint": [{"and": [purpose, count]}]}),
        _policy({"constraint": [count]}, kind="prohibition"),
    ]
    for policy in with_count:
        assert "count" in compile_policy(policy).left_operands  # compiles: not the fallback below
        assert gate.reads(policy, "count")
        assert not gate.reads(policy, "privacyBudget")
    # A document that does not compile: count and sum (its decision denies anyway).
    assert gate.reads({"permission": "not a list"}, "count")
    assert gate.reads({"permission": "not a list"}, "privacyBudget")


def test_a_successful_job_opens_one_orm_session(gz: Provider, monkeypatch: pytest.MonkeyPatch) -> None:
    # The decision's transaction (use count, budget, consent version, job row) is the only ORM session;
    # the success is one Core transaction. Main had three sessions (decision, cohort, success).
    opened: list[int] = []
    real = gz.db.session

    def counting() -> Any:
        opened.append(1)
        return real()

    monkeypatch.setattr(gz.db, "session", counting)
    job = post_job(gz, gz.token("agr-plain"), COUNT_SPEC).json()
    assert job["state"] == "SUCCEEDED"
    assert verify_envelope(job["signed"], gz.key.public_key_b64)["job_id"] == job["id"]
    assert len(opened) == 1


def test_an_error_inside_policy_compilation_denies_the_job(
    gz: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The data plane compiles the policy once for the use-count question and the decision; a fault in
    # the compiler must end as a denial (fail closed), never as a 500 or an allowed job.
    import healthspace.connector.gate as gate_module
    import healthspace.policy.gate as decide_module

    def broken(_: Any) -> Any:
        raise RuntimeError("compiler fault")

    monkeypatch.setattr(gate_module, "compile_policy", broken)
    monkeypatch.setattr(decide_module, "compile_policy", broken)
    # A policy document the gate (shared by this module's tests) has not compiled yet: its own k.
    gz.add_agreement("agr-fresh", k=97)
    r = post_job(gz, gz.token("agr-fresh"), COUNT_SPEC)
    assert r.status_code == 403, r.text


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b"{not json", ["body"]),
        (b'{"scenario": "x", "spec": {}, "extra": 1}', ["body", "extra"]),
        (b'{"spec": {}}', ["body", "scenario"]),
        (b"", ["body"]),
    ],
)
def test_a_malformed_job_body_is_a_422_problem_naming_where(
    gz: Provider, body: bytes, where: list[Any]
) -> None:
    # The job route parses its body itself (pydantic's JSON parser): errors must still be the 422
    # problem every other route gives, located in the body, and no job may start.
    r = httpx.post(
        f"{gz.url}/dataplane/jobs",
        content=body,
        headers={"Authorization": f"Bearer {gz.token('agr-plain')}", "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    locs = [e["loc"] for e in r.json()["errors"]]
    assert any(loc[: len(where)] == where for loc in locs), locs


def test_the_job_route_documents_its_body_and_answer(gz: Provider) -> None:
    doc = httpx.get(f"{gz.url}/openapi.json").json()
    op = doc["paths"]["/dataplane/jobs"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:
        body = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert set(body["required"]) == {"scenario", "spec"}
    assert body["additionalProperties"] is False
    assert [(p["name"], p["in"]) for p in op["parameters"]] == [("authorization", "header")]
    answer = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["$ref"].endswith("/JobPublic")


def test_a_job_answer_is_the_public_view_of_its_row(gz: Provider) -> None:
    r = post_job(gz, gz.token("agr-plain"), COUNT_SPEC)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    job = r.json()
    assert JobPublic.model_validate(job).state is JobState.SUCCEEDED
    assert set(job) == set(JobPublic.model_fields)
