"""The data-plane HTTP surface: jobs and GLM iterations under a data-address bearer token."""
# No `from __future__ import annotations`: FastAPI must see the closure dependency in the annotations.

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, status

from healthspace.connector.dataplane.service import GlmStep, JobCreate, JobPublic, JobService

__all__ = ["make_dataplane_router"]

Authorization = Annotated[str | None, Header()]


def make_dataplane_router(get_service: Callable[[], JobService]) -> APIRouter:
    """Routes under `/dataplane` (the endpoint of a compute-to-data data address).

    Every route needs `Authorization: Bearer <data-plane token>`; errors are problem JSON (401 for a
    bad token, 403 for a policy or disclosure refusal with its reasons, 404, 409, 422).
    """
    router = APIRouter(prefix="/dataplane", tags=["dataplane"])

    def service() -> JobService:
        return get_service()

    @router.post("/jobs", status_code=status.HTTP_200_OK)
    def submit_job(
        body: JobCreate, svc: Annotated[JobService, Depends(service)], authorization: Authorization = None
    ) -> JobPublic:
        """Run a query spec now (SUCCEEDED with the signed result) or open a GLM session (RUNNING)."""
        return svc.submit(svc.authenticate(authorization), body)

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
