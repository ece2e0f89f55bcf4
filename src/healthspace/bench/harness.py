"""Measuring with baselines: every figure is reported with a baseline measured in the same run.

This machine is shared and noisy, so an absolute number means little on its own; the ratio to a
baseline that suffers the same noise (the raw SQLite insert, plain SHA-256, ...) is what we compare
across runs. Medians, never means, and every sample kept in the JSON.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Figure", "rate", "seconds"]


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
