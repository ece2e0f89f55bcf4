"""Fixtures of the DSP wire-layer suites: one schema registry per session, read from the conformance data."""

from __future__ import annotations

from pathlib import Path

import pytest

from healthspace.protocol.schemas import SchemaRegistry, load_registry


@pytest.fixture(scope="session")
def dsp_dir(conformance_dir: Path) -> Path:
    return conformance_dir / "dsp-2025-1"


@pytest.fixture(scope="session")
def registry(dsp_dir: Path) -> SchemaRegistry:
    return load_registry(dsp_dir)
