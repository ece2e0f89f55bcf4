"""Standard profiles: the shipped default, loading from JSON, refusing profiles that cannot be applied."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from healthspace.core.errors import ValidationError
from healthspace.data.ingest import ingest_ndjson
from healthspace.data.profile import StandardProfile, default_profile, load_profile
from healthspace.data.store import ClinicalStore
from tests.data import fhirgen as g


def test_default_profile_requires_the_core_elements() -> None:
    p = default_profile()
    assert p.required["Patient"] == ["id", "gender", "birthDate"]
    assert p.allowed_systems("Observation") == {g.LOINC}


def test_profile_round_trips_through_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(default_profile().model_dump_json())
    assert load_profile(path) == default_profile()


def _with(**changes: object) -> bytes:
    doc = default_profile().model_dump(mode="json")
    doc.update(changes)
    return orjson.dumps(doc)


def test_required_element_we_do_not_map_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"Patient\.maritalStatus"):
        load_profile(_with(required={"Patient": ["maritalStatus"]}))


def test_invalid_identifier_pattern_is_refused() -> None:
    with pytest.raises(ValidationError, match="identifier format"):
        load_profile(_with(identifier_formats={"urn:x": "([a-z"}))


def test_range_with_low_above_high_is_refused() -> None:
    with pytest.raises(ValidationError, match="low"):
        load_profile(_with(measurements=[{"code": "1-1", "units": ["kg"], "low": 5, "high": 1}]))


def test_unknown_profile_field_is_refused() -> None:
    with pytest.raises(ValidationError):
        load_profile(_with(colour="blue"))


def test_a_stricter_profile_changes_what_is_accepted(store: ClinicalStore, tmp_path: Path) -> None:
    strict = StandardProfile.model_validate(
        {
            **default_profile().model_dump(),
            "required": {"Encounter": ["id", "subject", "class", "period.end"]},
        }
    )
    e = g.encounter(1, 0)
    del e["period"]["end"]
    r = ingest_ndjson(store, [g.write_ndjson(tmp_path / "e.ndjson", [e])], strict)
    assert (r.profile, r.rules) == ("healthspace-demo@1.0.0", {"required.Encounter.period.end": 1})


def test_closed_measurement_list_rejects_unlisted_loinc(store: ClinicalStore, tmp_path: Path) -> None:
    closed = StandardProfile.model_validate({**default_profile().model_dump(), "measurements_closed": True})
    o = g.observation(1, 0, code={"coding": [{"system": g.LOINC, "code": "718-7"}]})
    r = ingest_ndjson(store, [g.write_ndjson(tmp_path / "o.ndjson", [o])], closed)
    assert r.rules == {"measurement.unknown_code": 1}
