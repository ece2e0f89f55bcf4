"""GLM sessions survive a data-plane restart: the same fit, the iteration cap kept, changed data refused."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import numpy as np
import pytest
import statsmodels.api as sm
from fastapi import FastAPI
from sqlalchemy import update

from healthspace.audit.log import AuditLog
from healthspace.compute import DuckDBEngine, GlmSite, SiteStats, fit_glm, parse_spec
from healthspace.connector.dataplane import (
    JobService,
    data_classes_of,
    make_dataplane_router,
    rules_from_policy,
)
from healthspace.connector.dataplane.tables import GlmSessionRow
from healthspace.consent.fhir import PatientRefs
from healthspace.consent.service import ConsentService
from healthspace.core.db import Database
from healthspace.core.errors import install_problem_handlers
from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore
from healthspace.lab import verify_envelope
from tests.dataplane.provider import BRANCHES, SCENARIO, Provider, control_plane, job_service
from tests.support.servers import serve

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


@dataclass
class Plane:
    """One run of a provider's data plane on a control database: a restart is a new `Plane`."""

    p: Provider
    url: str
    stack: ExitStack = field(default_factory=ExitStack)
    db: Database | None = None
    audit: AuditLog | None = None
    service: JobService | None = None
    base: str = ""

    def start(self, *, first: bool) -> None:
        if first:
            self.db, self.audit, consent = control_plane(
                self.url, self.p.site, self.p.synth, self.p.key, self.p.clock
            )
        else:
            self.db = Database(self.url, branches=BRANCHES)
            self.audit = AuditLog(self.db, self.p.key, self.p.clock)
            consent = ConsentService(
                self.db,
                self.audit,
                self.p.key,
                self.p.id,
                PatientRefs(f"{self.p.site}-pat-"),
                clock=self.p.clock,
            )
        self.service = job_service(self.p, self.db, self.audit, consent)
        # As the connector starts: jobs cut off are failed, but an open GLM session must survive it.
        self.service.fail_interrupted()
        app = FastAPI()
        install_problem_handlers(app)
        service = self.service
        app.include_router(make_dataplane_router(lambda: service))
        self.base = self.stack.enter_context(serve(app))

    def stop(self) -> None:
        self.stack.close()
        self.stack = ExitStack()
        assert self.audit is not None
        assert self.db is not None
        self.audit.close()
        self.db.dispose()

    def post(self, path: str, token: str, body: Any = None) -> httpx.Response:
        return httpx.post(
            f"{self.base}/dataplane{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )

    def actions(self) -> list[str]:
        assert self.audit is not None
        return [e.entry.action for e in self.audit.entries(0, self.audit.size)]


@pytest.fixture
def plane(providers: dict[str, Provider], db_url: str) -> Iterator[Plane]:
    hk = providers["hk"]  # domestic for the HK consumer: a model needs no export approval
    out = Plane(hk, db_url)
    out.start(first=True)
    yield out
    out.stop()


def open_session(plane: Plane, agreement_id: str) -> tuple[str, str]:
    plane.p.add_agreement(agreement_id)
    token = plane.p.token(agreement_id)
    r = plane.post("/jobs", token, {"scenario": SCENARIO, "spec": GLM_SPEC})
    assert r.status_code == 200, r.text
    return r.json()["id"], token


def pooled_truth(p: Provider, consent_db: Database, agreement_id: str) -> Any:
    spec = parse_spec(GLM_SPEC)
    audit = AuditLog(consent_db, p.key, p.clock)
    consent = ConsentService(consent_db, audit, p.key, p.id, PatientRefs(f"{p.site}-pat-"), clock=p.clock)
    cohort = consent.cohort(SCENARIO, data_classes_of(spec), actor="test", at=p.clock.now())
    with ClinicalStore.open(p.store_path, LocalKeyStore(p.keys_dir)) as store:
        site = GlmSite(
            DuckDBEngine(store.connect()),
            cohort,
            spec,
            "death",
            rules_from_policy(p.agreements[agreement_id].policy),
        )
    audit.close()
    return sm.GLM(site._y, site._x, family=sm.families.Binomial()).fit(tol=1e-12)


def test_a_restart_between_iterations_continues_to_the_same_fit(
    plane: Plane, make_db: Callable[..., Database]
) -> None:
    agreement_id = f"agr-restart-{len(plane.p.agreements)}"
    job_id, token = open_session(plane, agreement_id)
    calls = [0]

    def site(beta: np.ndarray) -> SiteStats:
        calls[0] += 1
        if calls[0] == 3:  # the provider goes down and comes back between iterations 2 and 3
            plane.stop()
            plane.start(first=False)
        r = plane.post(f"/glm/{job_id}", token, {"analysis": "death", "beta": [float(b) for b in beta]})
        assert r.status_code == 200, r.text
        payload = verify_envelope(r.json(), plane.p.key.public_key_b64)
        assert payload["iteration"] == calls[0]  # the count survived the restart
        return SiteStats.from_dict(payload["stats"])

    fit = fit_glm([site], "binomial", 3, names=["intercept", "age", "male"])
    finished = plane.post(f"/glm/{job_id}/finish", token)
    truth = pooled_truth(plane.p, make_db(), agreement_id)
    np.testing.assert_allclose(fit.coef, truth.params, atol=1e-6)
    np.testing.assert_allclose(fit.se, truth.bse, atol=1e-6)
    assert fit.converged
    assert calls[0] > 3
    assert finished.json()["state"] == "SUCCEEDED"
    assert finished.json()["signed"]["payload"]["result"]["analyses"]["death"]["iterations"] == calls[0]
    assert "dataplane.glm.resume" in plane.actions()


def test_the_iteration_cap_holds_across_a_restart(plane: Plane) -> None:
    job_id, token = open_session(plane, f"agr-cap-{len(plane.p.agreements)}")
    assert plane.db is not None
    with plane.db.session() as s:
        s.execute(update(GlmSessionRow).where(GlmSessionRow.job_id == job_id).values(iterations=100))
    plane.stop()
    plane.start(first=False)
    r = plane.post(f"/glm/{job_id}", token, {"analysis": "death", "beta": [0.0, 0.0, 0.0]})
    assert (r.status_code, r.json()["reason"]) == (403, "glm-iterations")


def test_a_session_whose_data_changed_is_closed_not_mixed(plane: Plane) -> None:
    job_id, token = open_session(plane, f"agr-changed-{len(plane.p.agreements)}")
    assert plane.db is not None
    with plane.db.session() as s:
        row = s.get(GlmSessionRow, job_id)
        assert row is not None
        # Stands in for a withdrawal or new records since the session opened: the recorded digest
        # no longer matches the design rebuilt after the restart.
        row.analyses = row.analyses.replace('"design_sha256":"', '"design_sha256":"0')
    plane.stop()
    plane.start(first=False)
    r = plane.post(f"/glm/{job_id}", token, {"analysis": "death", "beta": [0.0, 0.0, 0.0]})
    job = httpx.get(
        f"{plane.base}/dataplane/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).json()
    assert (r.status_code, r.json()["reason"]) == (409, "glm-data-changed")
    assert job["state"] == "FAILED"
    assert "changed since the session opened" in job["reason"]


def test_an_abandoned_session_is_closed_when_another_opens(plane: Plane) -> None:
    idle_job, token = open_session(plane, f"agr-idle-{len(plane.p.agreements)}")
    plane.p.clock.advance(timedelta(hours=25))
    try:
        open_session(plane, f"agr-next-{len(plane.p.agreements)}")
    finally:
        plane.p.clock.advance(-timedelta(hours=25))
    job = httpx.get(
        f"{plane.base}/dataplane/jobs/{idle_job}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).json()
    assert job["state"] == "FAILED"
    assert "idle" in job["reason"]
    assert "dataplane.glm.close" in plane.actions()
