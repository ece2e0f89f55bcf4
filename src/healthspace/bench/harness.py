"""Measuring with baselines: every figure is reported with a baseline measured in the same run.

This machine is shared and noisy, so an absolute number means little on its own; the ratio to a
baseline that suffers the same noise (the raw SQLite insert, plain SHA-256, ...) is what we compare
across runs. Medians, never means, and every sample kept in the JSON.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Figure", "loopback_socket", "rate", "seconds", "serve"]


@dataclass(frozen=True)
class Figure:
    """One reported figure. `unit` is e.g. "ops/s" or "s"; `better` says which direction is good."""

    name: str
    unit: str
    samples: list[float]
    better: Literal["higher", "lower"] = "higher"
    baseline_name: str | None = None
    baseline_samples: list[float] = field(default_factory=list)
    target: float | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def baseline_median(self) -> float | None:
        return statistics.median(self.baseline_samples) if self.baseline_samples else None

    @property
    def ratio(self) -> float | None:
        """Figure / baseline (both medians)."""
        b = self.baseline_median
        return None if not b else self.median / b

    @property
    def meets_target(self) -> bool | None:
        if self.target is None:
            return None
        return self.median >= self.target if self.better == "higher" else self.median <= self.target

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            median=self.median,
            baseline_median=self.baseline_median,
            ratio=self.ratio,
            meets_target=self.meets_target,
        )
        return d


def seconds(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `fn()` for each of `repeat` runs after `warmup` unmeasured runs."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def rate(fn: Callable[[], object], ops: int, repeat: int = 5, warmup: int = 1) -> list[float]:
    """Operations per second for each run of `fn()`, which performs `ops` operations."""
    return [ops / s for s in seconds(fn, repeat=repeat, warmup=warmup)]


def loopback_socket(*, bind: bool = True) -> socket.socket:
    """A socket for a server on 127.0.0.1 (bound to a free port unless `bind` is false), typed TCP:
    asyncio turns Nagle off on accepted connections only for a listener created with IPPROTO_TCP;
    otherwise each response waits ~40 ms."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if bind:
        sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve(app: Any, sock: socket.socket | None = None) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on loopback in a thread for the block; yields its base URL."""
    import uvicorn  # the servers' dependency, only when a suite serves something

    sock = sock or loopback_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: server.run(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("a bench server did not start")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
