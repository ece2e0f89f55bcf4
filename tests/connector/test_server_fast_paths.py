"""The servers run on uvicorn's C fast paths (ADR 0006): httptools parses HTTP and, where uvloop
exists, it runs the event loop. uvicorn falls back to h11 and asyncio without a word when they are
missing, so an environment that lost them is caught here rather than in the benchmarks."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from uvicorn import Config


def test_uvicorn_parses_http_with_httptools() -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = Config(app=lambda *_: None)  # the defaults every server of ours uses
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not exist on Windows")
def test_uvloop_is_there_for_uvicorns_auto_loop() -> None:
    # uvicorn's loop="auto" takes uvloop whenever it can be imported (how it asks differs by version).
    assert importlib.util.find_spec("uvloop") is not None
