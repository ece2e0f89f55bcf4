"""The servers run on uvicorn's C fast paths (ADR 0006): httptools parses HTTP and, where uvloop
exists, it runs the event loop. uvicorn falls back to h11 and asyncio without a word when they are
missing, so an environment that lost them is caught here rather than in the benchmarks. And the
connector's DSP messages take the fast lane past FastAPI's routing (core.fastlane)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from typing import cast

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from uvicorn import Config

from healthspace.core.fastlane import FastLane
from tests.support.space import running_space


def test_uvicorn_parses_http_with_httptools() -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = Config(app=lambda *_: None)  # the defaults every server of ours uses
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not exist on Windows")
def test_uvloop_is_there_for_uvicorns_auto_loop() -> None:
    # uvicorn's loop="auto" takes uvloop whenever it can be imported (how it asks differs by version).
    assert importlib.util.find_spec("uvloop") is not None


@pytest.fixture(scope="module")
def connector_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    with running_space(tmp_path_factory.mktemp("space")) as space:
        app = space.connectors["gz-hospital"].app
        assert app is not None
        yield app


def _template_matches(template: str, path: str) -> bool:
    """Whether a route template could route `path`: `{x}` takes one non-empty segment, `{x:path}` the rest."""
    want, got = template.split("/"), path.split("/")
    for i, seg in enumerate(want):
        if seg.startswith("{") and seg.endswith(":path}"):
            return len(got) > i
        if i >= len(got) or not (seg == got[i] or (seg.startswith("{") and got[i])):
            return False
    return len(want) == len(got)


def test_the_dsp_fast_lane_takes_every_message_post_and_nothing_fastapi_would_route_elsewhere(
    connector_app: FastAPI,
) -> None:
    # The lane (core.fastlane) answers ahead of FastAPI's router. It may do so only where FastAPI has
    # no other choice: of every POST route the app has, the lane's own is the one that can match.
    (lane,) = [m for m in connector_app.user_middleware if getattr(m, "cls", None) is FastLane]
    routes = cast(list[APIRoute], lane.kwargs["routes"])
    assert {r.path for r in routes} == {
        "/negotiations/request",
        "/negotiations/offers",
        *(f"/negotiations/{{pid}}/{s}" for s in ("request", "offers", "events", "agreement")),
        "/negotiations/{pid}/agreement/verification",
        "/negotiations/{pid}/termination",
        "/transfers/request",
        *(f"/transfers/{{pid}}/{s}" for s in ("start", "completion", "suspension", "termination")),
    }
    posts = [p for p, ops in connector_app.openapi()["paths"].items() if "post" in ops]
    assert len(posts) > len(routes)  # the management API and the rest are there too
    for route in routes:
        path = route.path.replace("{pid}", "urn:uuid:1")
        assert [t for t in posts if _template_matches(t, path)] == [route.path], path
