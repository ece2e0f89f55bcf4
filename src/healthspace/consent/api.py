"""HTTP routes of the consent registry: the patient-facing API and the stewards' management routes.

Patients authenticate with a patient token (see consent/tokens.py), never with staff API keys; every
patient route acts on the token's own patient only, so there is no way to name another patient.
"""

# No `from __future__ import annotations`: FastAPI must see the route dependencies, which are local
# aliases inside the router factories, as objects rather than names it cannot resolve.

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from healthspace.consent.models import ConsentRecord, ScenarioInfo, Source, check_consent
from healthspace.consent.service import Change, ConsentService
from healthspace.core.apikeys import StoredKey
from healthspace.core.errors import NotFoundError, ValidationError

__all__ = [
    "ChangePublic",
    "DecisionPublic",
    "GrantCreate",
    "ImportReportPublic",
    "PatientTokenCreate",
    "PatientTokenPublic",
    "ReceiptSummary",
    "ScenarioDecisionPublic",
    "WithdrawalCreate",
    "make_patient_router",
    "make_staff_router",
]

MAX_IMPORT_BYTES = 256 * 1024 * 1024
NDJSON = "application/fhir+ndjson"


class GrantCreate(BaseModel):
    """A patient's permit for one scenario. Omitted classes mean every class the scenario uses."""

    model_config = ConfigDict(extra="forbid")

    scenario_id: str = Field(min_length=1, max_length=200)
    valid_from: datetime | None = Field(default=None, description="defaults to now; never earlier than now")
    valid_until: datetime | None = None
    data_classes: list[str] | None = Field(default=None, min_length=1)


class WithdrawalCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scenario_id: str = Field(min_length=1, max_length=200)


class DecisionPublic(BaseModel):
    decision_id: str
    scenario_id: str
    decision: Literal["permit", "deny"]
    decided_at: datetime
    valid_from: datetime
    valid_until: datetime | None
    data_classes: list[str] | None
    source: str

    @classmethod
    def of(cls, r: ConsentRecord) -> "DecisionPublic":
        return cls(
            decision_id=r.decision_id,
            scenario_id=r.scenario_id,
            decision=r.decision.value,
            decided_at=r.decided_at,
            valid_from=r.valid_from,
            valid_until=r.valid_until,
            data_classes=None if r.data_classes is None else sorted(r.data_classes),
            source=r.source.value,
        )


class ScenarioDecisionPublic(BaseModel):
    """A registered scenario and the patient's decision in force now (`none`: never decided, so denied)."""

    scenario_id: str
    title: str
    description: str
    scenario_data_classes: list[str]
    decision: Literal["permit", "deny", "none"]
    consented: bool = Field(description="whether the scenario may use this patient's data now")
    current: DecisionPublic | None


class ChangePublic(BaseModel):
    decision: DecisionPublic
    receipt_id: str
    receipt: dict[str, Any] = Field(description="signed consent receipt; verify with the connector's key")


class ReceiptSummary(BaseModel):
    receipt_id: str
    chain_seq: int
    decision_id: str
    issued_at: datetime


class PatientTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_days: int = Field(default=90, ge=1, le=366)


class PatientTokenPublic(BaseModel):
    patient_id: str
    token: str = Field(description="shown once; give it to the patient")
    expires_at: datetime


class ImportReportPublic(BaseModel):
    lines: int
    imported: int
    unchanged: int
    conflicts: int
    rejected: int
    rejections: list[dict[str, Any]]


class CohortCount(BaseModel):
    scenario_id: str
    at: datetime
    data_classes: list[str]
    patients: int


def _change(c: Change) -> ChangePublic:
    return ChangePublic(decision=DecisionPublic.of(c.record), receipt_id=c.receipt_id, receipt=c.receipt)


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def make_patient_router(
    get_service: Callable[[], ConsentService],
    scenarios: Callable[[], Iterable[ScenarioInfo]],
    prefix: str = "/consent/patient",
) -> APIRouter:
    """Routes for patients: their scenarios and decisions, grant, withdraw, history, receipts.

    `scenarios` lists the registered scenarios (from the authority's registry) when called.
    """
    router = APIRouter(prefix=prefix, tags=["consent (patient)"])

    def patient(request: Request) -> str:
        return get_service().authenticate_patient(_bearer(request))

    Patient = Annotated[str, Depends(patient)]  # noqa: N806 (a type alias)

    def actor(svc: ConsentService, patient_id: str) -> str:
        return f"patient:{svc.pseudonym(patient_id)}"

    def registered(scenario_id: str) -> ScenarioInfo:
        for sc in scenarios():
            if sc.scenario_id == scenario_id:
                return sc
        raise NotFoundError(f"no registered scenario {scenario_id!r}")

    @router.get("/scenarios", response_model=list[ScenarioDecisionPublic])
    def my_scenarios(patient_id: Patient) -> list[ScenarioDecisionPublic]:
        """The registered scenarios, each with my decision in force now."""
        svc = get_service()
        current = svc.current(patient_id, actor=actor(svc, patient_id))
        out = []
        for sc in scenarios():
            g = current.get(sc.scenario_id)
            consented = (
                g is not None
                and check_consent([g], sc.scenario_id, svc.now(), sc.data_classes or ["demographics"]).allowed
            )
            out.append(
                ScenarioDecisionPublic(
                    scenario_id=sc.scenario_id,
                    title=sc.title,
                    description=sc.description,
                    scenario_data_classes=list(sc.data_classes),
                    decision="none" if g is None else g.decision.value,
                    consented=consented,
                    current=None if g is None else DecisionPublic.of(g),
                )
            )
        return out

    @router.post("/grants", response_model=ChangePublic, status_code=201)
    def grant(body: GrantCreate, patient_id: Patient) -> ChangePublic:
        """Permit a scenario to use my data (from now, optionally until a date, optionally some classes)."""
        registered(body.scenario_id)
        svc = get_service()
        return _change(
            svc.grant(
                patient_id,
                body.scenario_id,
                actor=actor(svc, patient_id),
                source=Source.PATIENT,
                valid_from=body.valid_from,
                valid_until=body.valid_until,
                data_classes=body.data_classes,
            )
        )

    @router.post("/withdrawals", response_model=ChangePublic, status_code=201)
    def withdraw(body: WithdrawalCreate, patient_id: Patient) -> ChangePublic:
        """Withdraw my consent for a scenario, effective at once."""
        registered(body.scenario_id)
        svc = get_service()
        return _change(
            svc.withdraw(patient_id, body.scenario_id, actor=actor(svc, patient_id), source=Source.PATIENT)
        )

    @router.get("/history", response_model=list[DecisionPublic])
    def history(
        patient_id: Patient, scenario_id: Annotated[str | None, Query(max_length=200)] = None
    ) -> list[DecisionPublic]:
        svc = get_service()
        return [
            DecisionPublic.of(r)
            for r in svc.history(patient_id, actor=actor(svc, patient_id), scenario_id=scenario_id)
        ]

    @router.get("/receipts", response_model=list[ReceiptSummary])
    def receipts(patient_id: Patient) -> list[ReceiptSummary]:
        svc = get_service()
        return [
            ReceiptSummary(
                receipt_id=r.receipt_id,
                chain_seq=r.chain_seq,
                decision_id=r.decision_id,
                issued_at=r.issued_at,
            )
            for r in svc.receipts(patient_id, actor=actor(svc, patient_id))
        ]

    @router.get("/receipts/{receipt_id}")
    def receipt(receipt_id: str, patient_id: Patient) -> dict[str, Any]:
        """One of my signed receipts, as issued (verifies offline with the connector's public key)."""
        svc = get_service()
        return svc.receipt(patient_id, receipt_id, actor=actor(svc, patient_id))

    return router


def make_staff_router(
    get_service: Callable[[], ConsentService],
    guard: Callable[[Request], StoredKey],
    prefix: str = "/management/consent",
) -> APIRouter:
    """Routes for data stewards: FHIR import and export, a patient's decisions, cohort counts, tokens.

    `guard` is the staff dependency (e.g. `role_guard(..., Role.ADMIN, Role.STEWARD)`).
    """
    router = APIRouter(prefix=prefix, tags=["consent (staff)"])
    Staff = Annotated[StoredKey, Depends(guard)]  # noqa: N806 (a type alias)

    def actor(key: StoredKey) -> str:
        return f"{key.role.value}:{key.key_id}"

    @router.post("/import", response_model=ImportReportPublic)
    async def import_ndjson(request: Request, key: Staff) -> ImportReportPublic:
        """Import FHIR R4 Consent NDJSON (one resource per line); idempotent on resource id."""
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > MAX_IMPORT_BYTES:
                raise ValidationError(f"import bodies are limited to {MAX_IMPORT_BYTES} bytes; use the CLI")
        report = get_service().import_ndjson(bytes(body).splitlines(), actor=actor(key))
        return ImportReportPublic(**report.to_json())

    @router.get("/export")
    def export_ndjson(
        key: Staff, patient_id: Annotated[str | None, Query(max_length=64)] = None
    ) -> StreamingResponse:
        """The registry's history (or one patient's, by FHIR Patient id) as FHIR R4 Consent NDJSON."""
        svc = get_service()
        if patient_id is not None:
            svc.person_id(patient_id)  # a bad id is a 422 now, not a broken stream later
        lines = svc.export_ndjson(actor=actor(key), patient_id=patient_id)
        return StreamingResponse(lines, media_type=NDJSON)

    @router.get("/patients/{patient_id}/decisions", response_model=list[DecisionPublic])
    def decisions(
        patient_id: str, key: Staff, scenario_id: Annotated[str | None, Query(max_length=200)] = None
    ) -> list[DecisionPublic]:
        """A patient's decisions, by FHIR Patient id (e.g. `gz-pat-17`)."""
        return [
            DecisionPublic.of(r)
            for r in get_service().history(patient_id, actor=actor(key), scenario_id=scenario_id)
        ]

    @router.post("/patients/{patient_id}/tokens", response_model=PatientTokenPublic, status_code=201)
    def issue_token(patient_id: str, body: PatientTokenCreate, key: Staff) -> PatientTokenPublic:
        """Issue a patient access token (hand it to the patient; it is not stored)."""
        issued = get_service().issue_patient_token(
            patient_id, actor=actor(key), ttl=timedelta(days=body.ttl_days)
        )
        return PatientTokenPublic(
            patient_id=issued.patient_id, token=issued.token, expires_at=issued.expires_at
        )

    @router.get("/cohort", response_model=CohortCount)
    def cohort(
        key: Staff,
        scenario_id: Annotated[str, Query(min_length=1, max_length=200)],
        data_class: Annotated[list[str], Query(min_length=1)],
        at: datetime | None = None,
    ) -> CohortCount:
        """How many patients consent to a scenario for these classes (a count, never the ids)."""
        f = get_service().cohort(scenario_id, data_class, actor=actor(key), at=at)
        return CohortCount(
            scenario_id=scenario_id, at=f.at, data_classes=sorted(f.data_classes), patients=len(f)
        )

    return router
