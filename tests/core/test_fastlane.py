"""The fast lane serves the routes it was given exactly as FastAPI would, and leaves everything else to
FastAPI. Each case runs against a real uvicorn server on loopback, with and without the lane."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, Response

from healthspace.core.errors import NotFoundError, install_problem_handlers
from healthspace.core.fastlane import FastLane, lane_eligible
from tests.support.servers import serve


def _router() -> APIRouter:
    r = APIRouter()

    # Each endpoint says which way it was reached: FastAPI's router puts the route into the scope.
    def seen(request: Request, **values: str) -> Response:
        via = "router" if "route" in request.scope else "lane"
        params = ",".join(f"{k}={v}" for k, v in sorted(request.path_params.items()))
        return Response(f"{via} {values} {params}".encode(), media_type="text/plain")

    @r.post("/things/special")
    async def special(request: Request) -> Response:
        return seen(request, which="special")

    @r.post("/things/{tid}")
    async def thing(request: Request, tid: str) -> Response:
        body = await request.body()
        return seen(request, tid=tid, body=body.decode())

    @r.post("/things/{tid}/parts/{part}")
    async def part(request: Request, tid: str, part: str) -> Response:
        return seen(request, tid=tid, part=part)

    @r.post("/things/{tid}/missing")
    async def missing(request: Request, tid: str) -> Response:
        raise NotFoundError(f"no thing {tid!r}", thing=tid)

    @r.post("/things/{tid}/broken")
    async def broken(request: Request, tid: str) -> Response:
        raise RuntimeError("a bug")

    async def dependency(request: Request) -> str:
        return "dep"

    @r.post("/other/{tid}")
    async def other(request: Request, tid: str, dep: Annotated[str, Depends(dependency)]) -> Response:
        return seen(request, tid=tid, dep=dep)

    return r


def _app(lane: bool) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    router = _router()
    app.include_router(router)
    if lane:
        app.add_middleware(FastLane, routes=[r for r in router.routes if lane_eligible(r)])
    return app


@pytest.fixture(scope="module")
def urls() -> Iterator[tuple[str, str]]:
    """(without the lane, with it)."""
    with serve(_app(lane=False)) as plain, serve(_app(lane=True)) as fast:
        yield plain, fast


def _post(base: str, path: str, body: bytes = b"") -> httpx.Response:
    return httpx.post(f"{base}{path}", content=body, timeout=5.0)


@pytest.mark.parametrize(
    ("path", "answer"),
    [
        ("/things/special", "{'which': 'special'} "),  # the literal route comes first, as in FastAPI
        ("/things/t%201", "{'tid': 't 1', 'body': 'hello'} tid=t 1"),  # decoded, as FastAPI has it
        ("/things/7/parts/wheel", "{'tid': '7', 'part': 'wheel'} part=wheel,tid=7"),
    ],
)
def test_a_lane_route_answers_as_through_fastapi_without_its_router(
    urls: tuple[str, str], path: str, answer: str
) -> None:
    plain, fast = (_post(base, path, b"hello") for base in urls)
    assert (plain.status_code, plain.text) == (200, f"router {answer}")
    assert (fast.status_code, fast.text) == (200, f"lane {answer}")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/other/1"),  # has a dependency: not eligible, so never given to the lane
        ("POST", "/things/1/"),  # trailing slash: FastAPI's own answer (a redirect)
        ("POST", "/things//parts/x"),  # an empty parameter matches no lane route
        ("GET", "/things/1"),  # another method
        ("POST", "/things/t%2F1"),  # decoded to three segments: no route either way
        ("POST", "/nowhere"),
    ],
)
def test_what_the_lane_does_not_take_goes_to_fastapi_unchanged(
    urls: tuple[str, str], method: str, path: str
) -> None:
    plain, fast = (
        httpx.request(method, f"{base}{path}", follow_redirects=False, timeout=5.0) for base in urls
    )

    def where(r: httpx.Response) -> str:  # a redirect names the server's own port
        return httpx.URL(r.headers.get("location", "")).path

    assert (fast.status_code, where(fast), fast.text) == (plain.status_code, where(plain), plain.text)


def test_a_healthspace_error_leaves_as_the_same_problem_document(urls: tuple[str, str]) -> None:
    plain, fast = (_post(base, "/things/9/missing") for base in urls)
    assert fast.status_code == plain.status_code == 404
    assert fast.headers["content-type"] == plain.headers["content-type"] == "application/problem+json"
    assert fast.json() == plain.json()
    assert fast.json()["thing"] == "9"


def test_an_unexpected_error_is_a_500_problem_as_through_fastapi(urls: tuple[str, str]) -> None:
    plain, fast = (_post(base, "/things/9/broken") for base in urls)
    assert fast.status_code == plain.status_code == 500
    assert fast.json() == plain.json()
    assert fast.json()["code"] == "internal"


def test_only_routes_with_nothing_for_fastapi_to_resolve_are_eligible() -> None:
    router = _router()

    @router.post("/sync/{tid}")
    def sync_endpoint(request: Request, tid: str) -> Response:
        return Response()

    @router.post("/typed/{n}")
    async def typed(request: Request, n: int) -> Response:
        return Response()

    @router.post("/path/{rest:path}")
    async def converter(request: Request, rest: str) -> Response:
        return Response()

    @router.post("/query/{tid}")
    async def query(request: Request, tid: str, q: str = "") -> Response:
        return Response()

    eligible = {r.path for r in router.routes if lane_eligible(r)}
    assert eligible == {
        "/things/special",
        "/things/{tid}",
        "/things/{tid}/parts/{part}",
        "/things/{tid}/missing",
        "/things/{tid}/broken",
    }
    not_eligible = next(r for r in router.routes if getattr(r, "path", "") == "/typed/{n}")
    with pytest.raises(ValueError, match="cannot take the fast lane"):
        FastLane(FastAPI(), [not_eligible])  # type: ignore[list-item]
