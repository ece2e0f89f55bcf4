"""A fast lane in front of FastAPI's routing for the few routes that carry a protocol's traffic.

Every DSP message a connector receives is a POST to one of a dozen paths whose endpoint reads the
request itself (`request: Request` plus path parameters as strings) and returns a `Response`. For
such an endpoint FastAPI's exception middleware, router, route matching across every router of the
app and dependency solving do nothing but cost: ≈ 250 µs of CPU per request on this project's bench
machine, against ≈ 200 µs for all the rest of uvicorn and Starlette (measured with an empty endpoint;
ADR 0009). `FastLane` is an ASGI middleware that matches those routes itself (a dict
look-up on method and number of segments, then the segments) and awaits the endpoint directly.

What stays the same: the routes remain registered with FastAPI (OpenAPI, and any request the lane
does not take, such as a trailing slash or a mounted root path, goes the usual way); the middlewares
outside the lane (the body-size limit, the 500 handler) still apply; a `HealthspaceError` the
endpoint raises leaves as the same problem document `install_problem_handlers` renders; any other
exception propagates to the server-error middleware as it would from the router. Middleware added
to the app before the lane ends up inside it and does not see the lane's requests; middleware added
after it wraps it (Starlette puts each new middleware outermost; ADR 0009).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeGuard

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from healthspace.core.errors import HealthspaceError, problem_for

__all__ = ["FastLane", "lane_eligible"]

_Endpoint = Callable[..., Awaitable[Response]]


def _template(route: APIRoute) -> tuple[tuple[str | None, ...], tuple[str, ...]] | None:
    """The route's path as segments (None where a plain `{name}` parameter stands) and the parameter
    names in order; None when the path uses anything else (converters, partial segments)."""
    segments: list[str | None] = []
    names: list[str] = []
    for seg in route.path.split("/")[1:]:
        if seg.startswith("{") and seg.endswith("}") and seg[1:-1].isidentifier():
            segments.append(None)
            names.append(seg[1:-1])
        elif seg and "{" not in seg and "}" not in seg:
            segments.append(seg)
        else:
            return None
    return tuple(segments), tuple(names)


def _lane_shape(route: object) -> tuple[tuple[str | None, ...], tuple[str, ...]] | None:
    """`route`'s `_template` if the lane can serve it exactly as FastAPI would (see `lane_eligible`),
    else None."""
    if not isinstance(route, APIRoute) or not inspect.iscoroutinefunction(route.endpoint):
        return None
    shape = _template(route)
    if shape is None:
        return None
    params = inspect.signature(route.endpoint).parameters
    if list(params) != ["request", *shape[1]]:
        return None
    return shape if all(params[n].annotation in (str, "str") for n in shape[1]) else None


def lane_eligible(route: object) -> TypeGuard[APIRoute]:
    """Whether the lane can serve `route` exactly as FastAPI would: an `APIRoute` whose coroutine
    endpoint takes `request` and its path parameters (annotated `str`) and nothing else, so there is
    nothing for FastAPI to resolve, validate or serialise."""
    return _lane_shape(route) is not None


class FastLane:
    """ASGI middleware serving `routes` (each `lane_eligible`) straight from their endpoints."""

    def __init__(self, app: ASGIApp, routes: Sequence[APIRoute]) -> None:
        self.app = app
        # (method, number of segments) -> [(segments, parameter names, endpoint)], in route order:
        # the first match wins, as in FastAPI's router.
        self._table: dict[tuple[str, int], list[tuple[tuple[str | None, ...], tuple[str, ...], _Endpoint]]]
        self._table = {}
        for route in routes:
            shape = _lane_shape(route)
            if shape is None:
                raise ValueError(f"route {route.path!r} cannot take the fast lane (see lane_eligible)")
            segments, names = shape
            for method in sorted(route.methods or ()):
                self._table.setdefault((method, len(segments)), []).append((segments, names, route.endpoint))

    def _match(self, method: str, path: str) -> tuple[_Endpoint, dict[str, str]] | None:
        candidates = self._table.get((method, path.count("/")))
        if not candidates:
            return None
        parts = path.split("/")[1:]
        for segments, names, endpoint in candidates:
            values: list[str] = []
            for want, got in zip(segments, parts, strict=True):
                if want is None:
                    if not got:
                        break
                    values.append(got)
                elif want != got:
                    break
            else:
                return endpoint, dict(zip(names, values, strict=True))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            found = self._match(scope["method"], scope["path"])
            if found is not None:
                endpoint, params = found
                scope["path_params"] = params
                try:
                    response = await endpoint(Request(scope, receive), **params)
                except HealthspaceError as exc:
                    response = problem_for(exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
