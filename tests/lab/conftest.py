"""Three synthetic hospitals with their data planes on loopback, built once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dataplane.provider import Provider, build_provider, serving

SITES = {"gz": (1500, 11), "sz": (1500, 12), "hk": (1500, 13)}


@pytest.fixture(scope="session")
def providers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Provider]]:
    root = tmp_path_factory.mktemp("dataplane")
    built = [build_provider(root, site, n, seed) for site, (n, seed) in SITES.items()]
    with serving(built):
        yield {p.site: p for p in built}
    for p in built:
        p.audit.close()
        p.db.dispose()
