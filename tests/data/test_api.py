"""The clinical data management API on a loopback server: roles, lifecycle, erasure, problem documents."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from healthspace.core.apikeys import ApiKeyStore, Role, role_guard
from healthspace.core.db import Database
from healthspace.core.errors import install_problem_handlers
from healthspace.data.api import make_data_router
from healthspace.data.service import DataService
from tests.data import fhirgen as g
from tests.support.servers import serve

PREFIX = "/management/data"


@pytest.fixture
def api(
    service: DataService, sqlite_url: str, tmp_path: Path
) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    keys_db = Database(sqlite_url, branches=["apikeys"])
    keys = ApiKeyStore(keys_db)
    secrets = {r.value: keys.issue(r, r.value).secret for r in Role}
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(make_data_router(lambda: service, lambda *roles: role_guard(lambda _: keys, *roles)))
    g.write_ndjson(tmp_path / "import" / "export.ndjson", list(g.population(3)))
    try:
        with serve(app) as url, httpx.Client(base_url=url + PREFIX, timeout=30) as client:
            yield client, secrets
    finally:
        keys_db.dispose()


def _h(secrets: dict[str, str], role: str) -> dict[str, str]:
    return {"X-API-Key": secrets[role]}


def _create(client: httpx.Client, s: dict[str, str]) -> None:
    r = client.post("/datasets", json={"dataset_id": "gz"}, headers=_h(s, "steward"))
    assert r.status_code == 201, r.text


def _ingest(client: httpx.Client, s: dict[str, str]) -> httpx.Response:
    return client.post(
        "/datasets/gz/ingest",
        json={"paths": ["export.ndjson"], "source_system": "his-gz"},
        headers=_h(s, "steward"),
    )


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    return body


def test_steward_creates_and_ingests_from_the_import_directory(
    api: tuple[httpx.Client, dict[str, str]],
) -> None:
    client, s = api
    _create(client, s)
    r = _ingest(client, s)
    assert r.status_code == 200, r.text
    assert r.json()[0]["inserted"]["person"] == 3


def test_a_path_outside_the_import_directory_is_forbidden(api: tuple[httpx.Client, dict[str, str]]) -> None:
    client, s = api
    _create(client, s)
    r = client.post(
        "/datasets/gz/ingest",
        json={"paths": ["../keys/hs-data-gz.kek"], "source_system": "x"},
        headers=_h(s, "steward"),
    )
    _problem(r, 403)


def test_regulator_reads_status_report_and_provenance(api: tuple[httpx.Client, dict[str, str]]) -> None:
    client, s = api
    _create(client, s)
    _ingest(client, s)
    reg = _h(s, "regulator")
    codes = [
        client.get(p, headers=reg).status_code
        for p in ("/datasets/gz", "/datasets/gz/report", "/datasets/gz/provenance")
    ]
    assert codes == [200, 200, 200]
    assert (
        client.get("/datasets/gz/provenance", headers=reg).json()["entry"][0]["resource"]["resourceType"]
        == "Provenance"
    )


def test_regulator_cannot_change_anything_or_see_quarantined_records(
    api: tuple[httpx.Client, dict[str, str]],
) -> None:
    client, s = api
    _create(client, s)
    reg = _h(s, "regulator")
    assert (
        _problem(client.post("/datasets/gz/moves", json={"target": "curated"}, headers=reg), 403)["code"]
        == "forbidden"
    )
    _problem(client.get("/datasets/gz/quarantine", headers=reg), 403)
    _problem(client.post("/datasets/gz/destroy", json={"reason": "x", "confirm": "gz"}, headers=reg), 403)


def test_researcher_may_not_read_at_all(api: tuple[httpx.Client, dict[str, str]]) -> None:
    client, s = api
    _create(client, s)
    _problem(client.get("/datasets/gz", headers=_h(s, "researcher")), 403)


def test_no_key_is_unauthenticated(api: tuple[httpx.Client, dict[str, str]]) -> None:
    client, _ = api
    _problem(client.get("/datasets"), 401)


def test_a_refused_move_is_a_409_problem(api: tuple[httpx.Client, dict[str, str]]) -> None:
    client, s = api
    _create(client, s)
    body = _problem(
        client.post("/datasets/gz/moves", json={"target": "published"}, headers=_h(s, "steward")), 409
    )
    assert body["code"] == "invalid-transition"


def test_lifecycle_over_http_archive_restore_erase_destroy(api: tuple[httpx.Client, dict[str, str]]) -> None:
    client, s = api
    st = _h(s, "steward")
    _create(client, s)
    _ingest(client, s)
    arch = client.post("/datasets/gz/archive", json={"retain_until": "2099-01-01T00:00:00Z"}, headers=st)
    assert (arch.status_code, arch.json()["state"]) == (200, "archived")
    assert client.post("/datasets/gz/restore", json={}, headers=st).json()["state"] == "curated"
    erased = client.post(
        "/datasets/gz/erasures", json={"patient_id": "pat-1", "reason": "art. 17"}, headers=st
    )
    assert erased.json()["rows_removed"]["person"] == 1
    cert = client.post("/datasets/gz/destroy", json={"reason": "done", "confirm": "gz"}, headers=st)
    assert cert.json()["certificate"]["dataset_id"] == "gz"
    assert _problem(client.get("/datasets/gz/report", headers=st), 410)["code"] == "dataset-destroyed"


def test_client_mistakes_are_problems_not_500(api: tuple[httpx.Client, dict[str, str]]) -> None:
    client, s = api
    st = _h(s, "steward")
    _create(client, s)
    assert _problem(client.get("/datasets/nope", headers=st), 404)["code"] == "not-found"
    _problem(client.post("/datasets", json={"dataset_id": "../x"}, headers=st), 422)
    _problem(
        client.post("/datasets/gz/archive", json={"retain_until": "2000-01-01T00:00:00Z"}, headers=st), 422
    )
    _problem(client.post("/datasets/gz/destroy", json={"reason": "x", "confirm": "other"}, headers=st), 422)
    _problem(client.post("/datasets/gz/erasures", json={"reason": "x"}, headers=st), 422)
    _problem(client.post("/datasets/gz/moves", json={"target": "gone"}, headers=st), 422)
    _problem(client.post("/datasets", json={"dataset_id": "gz"}, headers=st), 409)
