"""The data-plane HTTP surface: jobs, GLM iterations and token refresh under a data-address bearer token;
the output-review airlock for the provider's staff under their API keys."""
# No `from __future__ import annotations`: FastAPI must see the closure dependency in the annotations.

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from healthspace.connector.dataplane.review import RejectBody, Reviewer, ReviewPublic
from healthspace.connector.dataplane.service import (
    GlmStep,
    JobCreate,
    JobPublic,
    JobService,
    TokenPublic,
)
from healthspace.connector.dataplane.states import ReviewState
from healthspace.core.apikeys import Role, StoredKey

__all__ = ["make_dataplane_router", "make_review_router"]

Authorization = Annotated[str | None, Header()]


def make_dataplane_router(get_service: Callable[[], JobService]) -> APIRouter:
    """Routes under `/dataplane` (the endpoint of a compute-to-data data address).

    Every route needs `Authorization: Bearer <data-plane token>`; errors are problem JSON (401 for a
    bad token, 403 for a policy or disclosure refusal with its reasons, 404, 409, 422).
    `get_service` runs on the event loop and must not block (it returns a service built already).
    """
    router = APIRouter(prefix="/dataplane", tags=["dataplane"])

    # A coroutine: FastAPI runs a plain-def dependency in its thread pool, one more thread hop per
    # request before the route's own (the routes stay plain defs: they block on SQL and DuckDB).
    async def service() -> JobService:
        return get_service()

    @router.post("/token")
    def refresh_token(
        svc: Annotated[JobService, Depends(service)], authorization: Authorization = None
    ) -> TokenPublic:
        """A fresh token for the same transfer, given a valid or just-expired one (each refreshes once).

        401 `refresh-window-passed` when the token expired beyond the grace, `token-reused` when it was
        refreshed already; 403 when the transfer or agreement is no longer usable (with reasons)."""
        return svc.refresh_token(authorization)

    # The route every study pays for on every site: its body is parsed by pydantic's own JSON parser
    # and its answer written by pydantic's serializer, where FastAPI would parse with `json`, validate,
    # and validate the answer again before encoding it, and it reads its header and service itself,
    # without FastAPI's dependency solving (together ≈ 0.6 ms of a job's 5 outside the engine). What
    # it documents is the same (`openapi_extra`, `response_model`).
    @router.post(
        "/jobs",
        status_code=status.HTTP_200_OK,
        response_model=JobPublic,
        openapi_extra={
            "parameters": [
                {"name": "authorization", "in": "header", "required": False, "schema": {"type": "string"}}
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": JobCreate.model_json_schema()}},
            },
        },
    )
    async def submit_job(request: Request) -> Response:
        """Run a query spec now (SUCCEEDED with the signed result) or open a GLM session (RUNNING)."""
        svc, authorization = get_service(), request.headers.get("authorization")
        try:
            body = JobCreate.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors(include_url=False)]
            ) from None
        job = await run_in_threadpool(lambda: svc.submit(svc.authenticate(authorization), body))
        return Response(job.model_dump_json(), media_type="application/json")

    @router.get("/jobs/{job_id}")
    def get_job(
        job_id: str, svc: Annotated[JobService, Depends(service)], authorization: Authorization = None
    ) -> JobPublic:
        return svc.get(svc.authenticate(authorization), job_id)

    @router.post("/jobs/{job_id}/cancel")
    def cancel_job(
        job_id: str, svc: Annotated[JobService, Depends(service)], authorization: Authorization = None
    ) -> JobPublic:
        return svc.cancel(svc.authenticate(authorization), job_id)

    @router.post("/glm/{job_id}")
    def glm_step(
        job_id: str,
        body: GlmStep,
        svc: Annotated[JobService, Depends(service)],
        authorization: Authorization = None,
    ) -> dict[str, Any]:
        """One IRLS iteration of a GLM session: the signed site statistics at the given β."""
        return svc.glm_step(svc.authenticate(authorization), job_id, body)

    @router.post("/glm/{job_id}/finish")
    def glm_finish(
        job_id: str, svc: Annotated[JobService, Depends(service)], authorization: Authorization = None
    ) -> JobPublic:
        return svc.glm_finish(svc.authenticate(authorization), job_id)

    return router


def make_review_router(get_service: Callable[[], JobService], staff: Callable[..., Any]) -> APIRouter:
    """Routes under `/management/reviews`: the provider's output-review airlock (staff API keys).

    `staff(*roles)` makes the API-key dependency (`role_guard`). Admins, stewards and reviewers read
    the airlock; stewards and reviewers approve or reject (two distinct approvals release a result).
    """
    router = APIRouter(prefix="/management/reviews", tags=["output review"])
    read_guard = staff(Role.ADMIN, Role.STEWARD, Role.REVIEWER)
    decide_guard = staff(Role.STEWARD, Role.REVIEWER)

    def service() -> JobService:
        return get_service()

    def reviewer(key: StoredKey) -> Reviewer:
        return Reviewer(key.key_id, key.role.value, key.label)

    @router.get("")
    def list_reviews(
        svc: Annotated[JobService, Depends(service)],
        key: Annotated[StoredKey, Depends(read_guard)],
        state: Annotated[str, Query(pattern="^(HELD|RELEASED|REJECTED|all)$")] = "HELD",
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[ReviewPublic]:
        """Results in the airlock (default: those still held), oldest first, without the results."""
        return svc.review.held(None if state == "all" else ReviewState(state), limit, offset)

    @router.get("/{review_id}")
    def show_review(
        review_id: str,
        svc: Annotated[JobService, Depends(service)],
        key: Annotated[StoredKey, Depends(read_guard)],
    ) -> ReviewPublic:
        """One review with the signed result under review (the view is audited)."""
        return svc.review.show(review_id, reviewer(key))

    @router.post("/{review_id}/approve")
    def approve_review(
        review_id: str,
        svc: Annotated[JobService, Depends(service)],
        key: Annotated[StoredKey, Depends(decide_guard)],
    ) -> ReviewPublic:
        return svc.review.approve(review_id, reviewer(key))

    @router.post("/{review_id}/reject")
    def reject_review(
        review_id: str,
        body: RejectBody,
        svc: Annotated[JobService, Depends(service)],
        key: Annotated[StoredKey, Depends(decide_guard)],
    ) -> ReviewPublic:
        """Reject with a reason: final; the job becomes REFUSED and the result never leaves."""
        return svc.review.reject(review_id, reviewer(key), body.reason)

    return router
