"""Fixtures of the identity tests: a fixed clock and a small data space on it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from healthspace.core.clock import FixedClock

from .kit import START, Space


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(START + timedelta(days=10))


@pytest.fixture
def space(clock: FixedClock) -> Space:
    return Space(clock)
