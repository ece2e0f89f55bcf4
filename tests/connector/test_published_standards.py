"""Data standards: the authority publishes them; a hospital connector loads data against the one it names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from healthspace.client import ApiError, AuthorityClient
from healthspace.core.apikeys import Role
from healthspace.data.profile import default_profile
from healthspace.synth.generate import generate
from tests.support.space import PARTICIPANTS, Space, running_space

GZ = "gz-hospital"


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Space]:
    with running_space(tmp_path_factory.mktemp("space"), PARTICIPANTS, patient_prefixes={GZ: "gz-pat-"}) as s:
        generate("gz", 150, 3, s.connectors[GZ].data_dir / "import" / "synth", progress=False)
        yield s


def _steward(space: Space) -> httpx.Client:
    node = space.connectors[GZ]
    return httpx.Client(base_url=node.url, headers={"X-API-Key": node.keys[Role.STEWARD]}, timeout=120)


def _files(space: Space) -> list[str]:
    fhir = space.connectors[GZ].data_dir / "import" / "synth" / "fhir"
    return [f"synth/fhir/{p.name}" for p in sorted(fhir.glob("*.ndjson")) if p.name != "Consent.ndjson"]


def test_the_authority_publishes_versions_and_refuses_republishing_one(space: Space) -> None:
    with space.admin() as admin:
        doc = default_profile().model_dump(mode="json") | {"id": "gba-core", "version": "1.0.0"}
        assert admin.publish_standard(doc)["id"] == "gba-core"
        admin.publish_standard(doc | {"version": "1.1.0", "title": "revised"})
        with pytest.raises(ApiError) as err:
            admin.publish_standard(doc)
        assert err.value.status == 409
    listed = httpx.get(f"{space.authority.url}/standards").json()
    assert {(s["id"], s["version"]) for s in listed} >= {("gba-core", "1.0.0"), ("gba-core", "1.1.0")}
    assert httpx.get(f"{space.authority.url}/standards/gba-core").json()["title"] == "revised"
    assert (
        httpx.get(f"{space.authority.url}/standards/gba-core", params={"version": "1.0.0"}).json()["version"]
        == "1.0.0"
    )


def test_an_invalid_standard_is_refused_and_only_admins_publish(space: Space) -> None:
    with space.admin() as admin, pytest.raises(ApiError) as err:
        admin.publish_standard({"id": "Bad Id", "version": "1"})
    assert err.value.status == 422
    regulator = AuthorityClient(space.authority.url, space.authority.keys[Role.REGULATOR])
    doc = default_profile().model_dump(mode="json") | {"id": "x", "version": "1"}
    with regulator, pytest.raises(ApiError) as err:
        regulator.publish_standard(doc)
    assert err.value.status == 403


def test_ingest_applies_the_standard_the_authority_publishes(space: Space, tmp_path: Path) -> None:
    # A stricter standard: every LOINC code needs a measurement rule, and this one has none.
    strict = default_profile().model_dump(mode="json") | {
        "id": "strict-labs",
        "version": "1.0.0",
        "measurements": [],
        "measurements_closed": True,
    }
    with space.admin() as admin:
        admin.publish_standard(strict)
    observations = sum(
        1
        for line in (space.connectors[GZ].data_dir / "import" / "synth" / "fhir" / "Observation.ndjson")
        .read_bytes()
        .splitlines()
        if line.strip()
    )
    with _steward(space) as steward:
        assert steward.post("/management/data/datasets", json={"dataset_id": "gz-strict"}).status_code == 201
        r = steward.post(
            "/management/data/datasets/gz-strict/ingest",
            json={"paths": _files(space), "source_system": "test", "standard": "strict-labs"},
        )
    assert r.status_code == 200, r.text
    (report,) = r.json()
    assert report["profile"].startswith("strict-labs")
    assert report["rejected"] == observations > 0


def test_naming_a_standard_nobody_published_is_a_clear_error(space: Space) -> None:
    with _steward(space) as steward:
        steward.post("/management/data/datasets", json={"dataset_id": "gz-unknown"})
        r = steward.post(
            "/management/data/datasets/gz-unknown/ingest",
            json={"paths": _files(space), "source_system": "test", "standard": "no-such"},
        )
    assert r.status_code == 422
    assert "publishes no standard 'no-such'" in r.json()["detail"]


def test_a_steward_loads_a_csv_export_through_the_api_with_a_mapping(space: Space) -> None:
    imports = space.connectors[GZ].data_dir / "import"
    (imports / "patients.csv").write_text("mrn,sex,dob\ngz-pat-csv-1,female,1970-05-06\ngz-pat-csv-2,male,\n")
    mapping = {
        "resourceType": "Patient",
        "template": {"resourceType": "Patient", "id": "{mrn}", "gender": "{sex}", "birthDate": "{dob}"},
    }
    with _steward(space) as steward:
        steward.post("/management/data/datasets", json={"dataset_id": "gz-csv"})
        r = steward.post(
            "/management/data/datasets/gz-csv/ingest",
            json={"paths": ["patients.csv"], "source_system": "registration CSV", "csv_mapping": mapping},
        )
        assert r.status_code == 200, r.text
        (report,) = r.json()
        assert (report["inserted"], report["rejected"]) == ({"person": 1}, 1)  # no birth date: refused
        provenance = steward.get("/management/data/datasets/gz-csv/provenance").json()
    entities = [e["what"]["display"] for p in provenance["entry"] for e in p["resource"]["entity"]]
    assert any(e.startswith("patients.csv ") for e in entities)  # the file as received, not converted
