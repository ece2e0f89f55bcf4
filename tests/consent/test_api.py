"""The patient and staff HTTP routes, on a real loopback server: authentication, isolation, receipts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import jwt
import pytest
from fastapi import FastAPI

from healthspace.audit.log import AuditLog
from healthspace.consent.api import make_patient_router, make_staff_router
from healthspace.consent.fhir import PatientRefs
from healthspace.consent.models import ScenarioInfo, Source
from healthspace.consent.receipts import verify_chain, verify_receipt
from healthspace.consent.service import ConsentService
from healthspace.consent.tokens import PATIENT_AUDIENCE, PATIENT_TOKEN_TYPE
from healthspace.core.apikeys import ApiKeyStore, Role, role_guard
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from healthspace.core.errors import install_problem_handlers
from healthspace.identity.keys import SigningKey
from tests.consent.conftest import DIABETES, QUALITY, T0, pat, person
from tests.support.servers import serve

SCENARIOS = [
    ScenarioInfo(DIABETES, "Diabetes outcomes research", data_classes=("demographics", "laboratory")),
    ScenarioInfo(QUALITY, "Hospital quality improvement", data_classes=("encounters",)),
]


@dataclass
class Api:
    url: str
    service: ConsentService
    clock: FixedClock
    key: SigningKey
    steward: str
    researcher: str

    def patient(self, patient_id: str) -> httpx.Client:
        token = self.service.issue_patient_token(patient_id, actor="test").token
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=10)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    db = Database(f"sqlite:///{(tmp_path / 'c.db').as_posix()}", branches=["audit", "consent", "apikeys"])
    key = SigningKey.generate()
    clock = FixedClock(T0)
    audit = AuditLog(db, key, clock)
    service = ConsentService(db, audit, key, "hospital-gz", PatientRefs("gz-pat-"), clock=clock)
    keys = ApiKeyStore(db)
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(make_patient_router(lambda: service, lambda: SCENARIOS))
    app.include_router(
        make_staff_router(lambda: service, role_guard(lambda _: keys, Role.ADMIN, Role.STEWARD))
    )
    steward = keys.issue(Role.STEWARD, "steward").secret
    researcher = keys.issue(Role.RESEARCHER, "researcher").secret
    with serve(app) as url:
        yield Api(url, service, clock, key, steward, researcher)
    audit.close()
    db.dispose()


def test_a_missing_token_is_401(api: Api) -> None:
    r = httpx.get(f"{api.url}/consent/patient/scenarios")
    assert r.status_code == 401


def test_a_token_signed_by_another_key_is_401(api: Api) -> None:
    forged = jwt.encode(
        {"iss": "hospital-gz", "aud": PATIENT_AUDIENCE, "sub": "1", "iat": 0, "exp": 2**40, "jti": "x"},
        SigningKey.generate().private_key,
        algorithm="EdDSA",
        headers={"typ": PATIENT_TOKEN_TYPE},
    )
    r = httpx.get(f"{api.url}/consent/patient/scenarios", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401


def test_an_edited_token_is_401(api: Api) -> None:
    token = api.service.issue_patient_token(pat(1), actor="t").token
    header, _payload, sig = token.split(".")
    other = api.service.issue_patient_token(pat(2), actor="t").token.split(".")[1]
    r = httpx.get(
        f"{api.url}/consent/patient/scenarios", headers={"Authorization": f"Bearer {header}.{other}.{sig}"}
    )
    assert r.status_code == 401


def test_an_expired_token_is_401(api: Api) -> None:
    with api.patient(pat(1)) as c:
        assert c.get("/consent/patient/scenarios").status_code == 200
        api.clock.advance(timedelta(days=91))
        assert c.get("/consent/patient/scenarios").status_code == 401


def test_a_staff_api_key_is_not_a_patient_token(api: Api) -> None:
    r = httpx.get(f"{api.url}/consent/patient/scenarios", headers={"Authorization": f"Bearer {api.steward}"})
    assert r.status_code == 401


def test_a_patient_token_is_not_a_staff_key(api: Api) -> None:
    token = api.service.issue_patient_token(pat(1), actor="t").token
    r = httpx.get(f"{api.url}/management/consent/patients/gz-pat-1/decisions", headers={"X-API-Key": token})
    assert r.status_code == 401


def test_scenarios_default_to_no_decision_and_not_consented(api: Api) -> None:
    with api.patient(pat(1)) as c:
        body = c.get("/consent/patient/scenarios").json()
    assert [(s["scenario_id"], s["decision"], s["consented"]) for s in body] == [
        (DIABETES, "none", False),
        (QUALITY, "none", False),
    ]


def test_grant_returns_a_receipt_that_verifies_offline(api: Api) -> None:
    with api.patient(pat(1)) as c:
        r = c.post("/consent/patient/grants", json={"scenario_id": DIABETES, "data_classes": ["laboratory"]})
        assert r.status_code == 201
        listed = c.get("/consent/patient/scenarios").json()
        downloaded = c.get(f"/consent/patient/receipts/{r.json()['receipt_id']}").json()
    payload = verify_receipt(downloaded, api.key.public_key_b64)
    assert payload == r.json()["receipt"]["payload"]
    assert (payload["decision"], payload["data_classes"]) == ("permit", ["laboratory"])
    assert listed[0]["decision"] == "permit"
    assert listed[0]["consented"] is False  # the scenario also reads demographics, which was not granted


def test_withdraw_over_http_excludes_the_patient_from_the_next_cohort(api: Api) -> None:
    with api.patient(pat(7)) as c:
        c.post("/consent/patient/grants", json={"scenario_id": DIABETES})
        assert api.service.cohort(DIABETES, ["laboratory"], actor="job").person_ids.to_pylist() == [person(7)]
        r = c.post("/consent/patient/withdrawals", json={"scenario_id": DIABETES})
        assert r.status_code == 201
        history = c.get("/consent/patient/history").json()
        receipts = [
            c.get(f"/consent/patient/receipts/{x['receipt_id']}").json()
            for x in c.get("/consent/patient/receipts").json()
        ]
    assert api.service.cohort(DIABETES, ["laboratory"], actor="job").person_ids.to_pylist() == []
    assert [h["decision"] for h in history] == ["permit", "deny"]
    assert verify_chain(receipts, api.key.public_key_b64) == 2


def test_a_patient_never_sees_another_patients_consent(api: Api) -> None:
    with api.patient(pat(1)) as alice, api.patient(pat(2)) as bob:
        r = alice.post("/consent/patient/grants", json={"scenario_id": DIABETES})
        assert bob.get(f"/consent/patient/receipts/{r.json()['receipt_id']}").status_code == 404
        assert bob.get("/consent/patient/history").json() == []
        assert bob.get("/consent/patient/receipts").json() == []
        assert bob.get("/consent/patient/scenarios").json()[0]["decision"] == "none"


def test_a_patient_cannot_change_another_patients_consent(api: Api) -> None:
    with api.patient(pat(1)) as alice, api.patient(pat(2)) as bob:
        alice.post("/consent/patient/grants", json={"scenario_id": DIABETES})
        # The body has no patient field: naming one is refused, and bob's own calls touch only bob.
        r = bob.post("/consent/patient/withdrawals", json={"scenario_id": DIABETES, "patient_id": pat(1)})
        assert r.status_code == 422
        bob.post("/consent/patient/withdrawals", json={"scenario_id": DIABETES})
    assert api.service.cohort(DIABETES, ["laboratory"], actor="job").person_ids.to_pylist() == [person(1)]


def test_granting_an_unregistered_scenario_is_404(api: Api) -> None:
    with api.patient(pat(1)) as c:
        assert c.post("/consent/patient/grants", json={"scenario_id": "crypto-mining"}).status_code == 404


def test_staff_import_export_and_cohort_count(api: Api) -> None:
    api.service.grant(pat(3), DIABETES, actor="s", source=Source.STAFF)
    h = {"X-API-Key": api.steward}
    exported = httpx.get(f"{api.url}/management/consent/export", headers=h)
    assert exported.status_code == 200
    assert exported.text.count("\n") == 1
    again = httpx.post(f"{api.url}/management/consent/import", headers=h, content=exported.content)
    assert again.json()["unchanged"] == 1
    count = httpx.get(
        f"{api.url}/management/consent/cohort",
        headers=h,
        params={"scenario_id": DIABETES, "data_class": ["laboratory"]},
    )
    assert count.json()["patients"] == 1


def test_staff_routes_refuse_other_roles(api: Api) -> None:
    r = httpx.get(f"{api.url}/management/consent/export", headers={"X-API-Key": api.researcher})
    assert r.status_code == 403


def test_a_steward_issues_a_patient_token_that_works(api: Api) -> None:
    r = httpx.post(
        f"{api.url}/management/consent/patients/gz-pat-9/tokens", headers={"X-API-Key": api.steward}, json={}
    )
    assert r.status_code == 201
    assert r.json()["patient_id"] == "gz-pat-9"
    token = r.json()["token"]
    me = httpx.get(f"{api.url}/consent/patient/history", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200


def test_a_steward_cannot_issue_a_token_for_another_sites_patient(api: Api) -> None:
    r = httpx.post(
        f"{api.url}/management/consent/patients/hk-pat-9/tokens", headers={"X-API-Key": api.steward}, json={}
    )
    assert r.status_code == 422
