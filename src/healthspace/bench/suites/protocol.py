"""DSP 2025-1 message parsing and emitting with schema validation (see protocol/_bench.py)."""

from __future__ import annotations

from healthspace.bench.harness import Figure
from healthspace.protocol._bench import run as _run

__all__ = ["run"]


def run(quick: bool) -> list[Figure]:
    return _run(quick)
