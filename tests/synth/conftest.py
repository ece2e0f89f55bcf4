"""Synthetic populations shared by the synth tests, generated once per session (small, to stay fast)."""

from __future__ import annotations

import pandas as pd
import pytest

from healthspace.synth.generate import generate
from tests.synth._data import Population, baseline

# Sizes: big enough for the tolerances below to be tight, small enough for the suite to stay fast.
REALISM_PATIENTS = {"gz": 12_000, "sz": 12_000, "hk": 20_000}


@pytest.fixture(scope="session")
def baselines(populations: dict[str, Population]) -> dict[str, pd.DataFrame]:
    return {site: baseline(pop) for site, pop in populations.items()}


@pytest.fixture(scope="session")
def populations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Population]:
    root = tmp_path_factory.mktemp("synth-realism")
    return {
        site: Population(generate(site, n, 11, root / site, progress=False))
        for site, n in REALISM_PATIENTS.items()
    }


@pytest.fixture(scope="session")
def small(tmp_path_factory: pytest.TempPathFactory) -> Population:
    """A small gz population for format checks."""
    return Population(generate("gz", 2_000, 3, tmp_path_factory.mktemp("synth-small") / "gz", progress=False))
