"""Typed errors and their mapping to RFC 9457 problem responses.

Every error a client can cause is a `HealthspaceError` with a definite status; the handlers below turn it
into `application/problem+json`. Anything else that escapes a route is a server fault: it answers 500 with
no internal detail (secrets and stack traces never reach a client) and is logged.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "ConflictError",
    "ForbiddenError",
    "HealthspaceError",
    "InvalidTransitionError",
    "NotFoundError",
    "ValidationError",
    "install_problem_handlers",
    "problem_for",
    "problem_response",
]

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


class HealthspaceError(Exception):
    """Base of all expected errors. `code` is a stable machine-readable slug; `detail` is for people."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad-request"
    title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def to_problem(self) -> dict[str, Any]:
        return {
            "type": f"https://healthspace.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            **self.extra,
        }


class ValidationError(HealthspaceError):
    status = 422
    code = "validation-failed"
    title = "The request is not valid"


class NotFoundError(HealthspaceError):
    status = 404
    code = "not-found"
    title = "Not found"


class ConflictError(HealthspaceError):
    status = 409
    code = "conflict"
    title = "Conflict with the current state"


class InvalidTransitionError(ConflictError):
    code = "invalid-transition"
    title = "Transition not allowed"


class AuthenticationError(HealthspaceError):
    """The caller could not be authenticated: missing, malformed, forged, expired or replayed token."""

    status = 401
    code = "unauthenticated"
    title = "Authentication failed"


class ForbiddenError(HealthspaceError):
    """The caller is known but may not do this (revoked credential, wrong role)."""

    status = 403
    code = "forbidden"
    title = "Not allowed"


class ConfigurationError(HealthspaceError):
    """The service is set up wrongly; raised at start so it never runs half-configured."""

    status = 500
    code = "configuration"
    title = "Service misconfigured"


def problem_response(status: int, title: str, detail: str, code: str, **extra: Any) -> JSONResponse:
    body = {
        "type": f"https://healthspace.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def problem_for(exc: HealthspaceError) -> JSONResponse:
    """The problem document a `HealthspaceError` leaves a service as."""
    p = exc.to_problem()
    return problem_response(
        p.pop("status"),
        p.pop("title"),
        p.pop("detail"),
        p.pop("code"),
        **{k: v for k, v in p.items() if k != "type"},
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error leave `app` as a problem document."""

    async def on_healthspace_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HealthspaceError)
        return problem_for(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return problem_response(
            422,
            "The request is not valid",
            "request body or parameters are invalid",
            "validation-failed",
            errors=errors,
        )

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return problem_response(exc.status_code, str(exc.detail), str(exc.detail), slug)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(
            500, "Internal error", "the service failed; the operator has the log", "internal"
        )

    app.add_exception_handler(HealthspaceError, on_healthspace_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
