"""NDJSON ingestion: row counts, mapping, validation rules, quarantine, idempotence, atomicity."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from healthspace.data import quarantine
from healthspace.data.ingest import IngestReport, _Pipeline, ingest_ndjson, person_id_for
from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore
from tests.data import fhirgen as g

N = 30


@pytest.fixture
def loaded(store: ClinicalStore, tmp_path: Path) -> ClinicalStore:
    ingest_ndjson(store, [g.write_ndjson(tmp_path / "pop.ndjson", g.population(N))])
    return store


def _one(
    store: ClinicalStore, tmp_path: Path, *resources: dict[str, Any], name: str = "x.ndjson"
) -> IngestReport:
    return ingest_ndjson(store, [g.write_ndjson(tmp_path / name, list(resources))])


def test_row_counts_equal_the_population_built(loaded: ClinicalStore) -> None:
    assert loaded.row_counts() == g.expected_rows(N)


def test_person_id_is_the_md5_natural_key_of_the_fhir_id(loaded: ClinicalStore) -> None:
    import hashlib

    ids = dict(loaded.connect().execute("SELECT hs_fhir_id, person_id FROM person").fetchall())
    truth = int.from_bytes(hashlib.md5(b"Patient/pat-7").digest()[:8], "little") >> 1
    assert ids["Patient/pat-7"] == truth == person_id_for("pat-7")


def test_events_reference_their_person_and_visit(loaded: ClinicalStore) -> None:
    row = (
        loaded.connect()
        .execute(
            "SELECT person_id, visit_occurrence_id FROM condition_occurrence "
            "WHERE hs_fhir_id = 'Condition/cond-3'"
        )
        .fetchone()
    )
    visits = dict(
        loaded.connect().execute("SELECT hs_fhir_id, visit_occurrence_id FROM visit_occurrence").fetchall()
    )
    assert row == (person_id_for("pat-3"), visits["Encounter/enc-3-0"])


def test_source_codes_are_kept_with_their_code_system(loaded: ClinicalStore) -> None:
    con = loaded.connect()
    got = {
        t: con.execute(f"SELECT DISTINCT hs_source_vocabulary || ':' || {c} FROM {t}").fetchall()
        for t, c in [
            ("condition_occurrence", "condition_source_value"),
            ("drug_exposure", "drug_source_value"),
            ("procedure_occurrence", "procedure_source_value"),
        ]
    }
    loinc = {
        r[0]
        for r in con.execute(
            "SELECT hs_source_vocabulary || ':' || measurement_source_value FROM measurement"
        ).fetchall()
    }
    assert got == {
        "condition_occurrence": [("ICD10:E11.9",)],
        "drug_exposure": [("ATC:A10BA02",)],
        "procedure_occurrence": [("SNOMED:29303009",)],
    }
    assert loinc == {"LOINC:4548-4", "LOINC:8480-6", "LOINC:29463-7"}


def test_dates_keep_the_local_date_and_store_utc_datetimes(loaded: ClinicalStore) -> None:
    # enc-1-0 starts 2021-01-02T09:00:00+08:00: local date 2021-01-02, 01:00 UTC.
    row = (
        loaded.connect()
        .execute(
            "SELECT CAST(visit_start_date AS VARCHAR), CAST(visit_start_datetime AS VARCHAR) "
            "FROM visit_occurrence WHERE hs_fhir_id = 'Encounter/enc-1-0'"
        )
        .fetchone()
    )
    assert row == ("2021-01-02", "2021-01-02 01:00:00+00")


def test_drug_end_date_is_start_plus_days_supply_minus_one(loaded: ClinicalStore) -> None:
    row = (
        loaded.connect()
        .execute(
            "SELECT drug_exposure_end_date - drug_exposure_start_date, days_supply FROM drug_exposure LIMIT 1"
        )
        .fetchone()
    )
    assert row == (89, 90)


def test_consent_is_counted_as_not_clinical_and_not_stored(store: ClinicalStore, tmp_path: Path) -> None:
    r = _one(store, tmp_path, g.consent(1))
    assert (r.not_clinical, r.accepted, r.rejected) == ({"Consent": 1}, 0, 0)


def test_malformed_line_is_quarantined_with_its_line_number(store: ClinicalStore, tmp_path: Path) -> None:
    p = tmp_path / "bad.ndjson"
    p.write_bytes(
        orjson.dumps(g.patient(1))
        + b"\n\n"
        + b'{"resourceType": "Patient", "id": \n'
        + orjson.dumps(g.patient(2))
        + b"\n"
    )
    r = ingest_ndjson(store, [p])
    (entry,) = quarantine.list_entries(store)
    assert (r.inserted, r.rules) == ({"person": 2}, {"json.malformed": 1})
    assert (entry.source, entry.line, entry.rules) == ("bad.ndjson", 3, ["json.malformed"])


def test_missing_required_element_is_rejected_with_its_rule(store: ClinicalStore, tmp_path: Path) -> None:
    c = g.condition(1)
    del c["onsetDateTime"]
    r = _one(store, tmp_path, g.patient(1), c)
    (entry,) = quarantine.list_entries(store)
    assert r.rules == {"required.Condition.onset": 1}
    assert (entry.resource_type, entry.resource_id, entry.reason) == (
        "Condition",
        "cond-1",
        "Condition.onset is missing",
    )


def test_code_from_a_system_outside_the_standard_is_rejected(store: ClinicalStore, tmp_path: Path) -> None:
    c = g.condition(1, code={"coding": [{"system": "http://example.org/local-codes", "code": "DM2"}]})
    r = _one(store, tmp_path, c)
    assert r.rules == {"codesystem.not_allowed": 1}
    assert "http://example.org/local-codes is not allowed" in quarantine.list_entries(store)[0].reason


def test_allowed_coding_is_picked_when_it_is_not_the_first(store: ClinicalStore, tmp_path: Path) -> None:
    c = g.condition(1, code={"coding": [{"system": "http://example.org/local", "code": "DM2"},
                                        {"system": g.ICD10, "code": "E11.9"}]})  # fmt: skip
    r = _one(store, tmp_path, c)
    assert (r.inserted, r.rejected) == ({"condition_occurrence": 1}, 0)


def test_out_of_range_value_is_rejected_with_the_range(store: ClinicalStore, tmp_path: Path) -> None:
    o = g.observation(1, 0, valueQuantity={"value": 71, "unit": "%", "code": "%"})
    r = _one(store, tmp_path, o)
    assert r.rules == {"measurement.range": 1}
    assert quarantine.list_entries(store)[0].reason == "4548-4 value 71.0 outside plausible range [2.0, 25.0]"


@pytest.mark.parametrize("value", ["abc", "7.1", True, [7.1]])
def test_a_quantity_value_that_is_not_a_number_is_rejected_not_dropped(
    store: ClinicalStore, tmp_path: Path, value: object
) -> None:
    o = g.observation(1, 0, valueQuantity={"value": value, "unit": "%", "code": "%"})
    r = _one(store, tmp_path, o)
    assert r.rules == {"format.quantity": 1}
    assert "is not a number" in quarantine.list_entries(store)[0].reason


def test_wrong_unit_is_rejected(store: ClinicalStore, tmp_path: Path) -> None:
    o = g.observation(1, 1, valueQuantity={"value": 120, "unit": "kPa", "code": "kPa"})
    assert _one(store, tmp_path, o).rules == {"measurement.unit": 1}


def test_value_outside_its_value_set_is_rejected(store: ClinicalStore, tmp_path: Path) -> None:
    assert _one(store, tmp_path, g.patient(1, gender="M")).rules == {"valueset.not_member": 1}


def test_identifier_not_matching_its_format_is_rejected(store: ClinicalStore, tmp_path: Path) -> None:
    p = g.patient(1, identifier=[{"system": g.MRN, "value": "12"}])
    assert _one(store, tmp_path, p).rules == {"identifier.format": 1}


def test_unparseable_date_is_rejected(store: ClinicalStore, tmp_path: Path) -> None:
    assert _one(store, tmp_path, g.patient(1, birthDate="31/12/1970")).rules == {"format.datetime": 1}


def test_partial_birth_date_is_accepted_as_year_and_month(store: ClinicalStore, tmp_path: Path) -> None:
    _one(store, tmp_path, g.patient(1, birthDate="1970-03"))
    row = store.connect().execute("SELECT year_of_birth, month_of_birth, day_of_birth FROM person").fetchone()
    assert row == (1970, 3, None)


def test_subject_that_is_not_a_patient_is_rejected(store: ClinicalStore, tmp_path: Path) -> None:
    c = g.condition(1, subject={"reference": "Group/g1"})
    assert _one(store, tmp_path, c).rules == {"reference.subject": 1}


def test_every_failing_rule_of_a_record_is_reported(store: ClinicalStore, tmp_path: Path) -> None:
    p = g.patient(1, gender="x", birthDate="yesterday")
    r = _one(store, tmp_path, p)
    assert (r.rejected, r.rules) == (1, {"format.datetime": 1, "valueset.not_member": 1})


def test_real_fhir_type_we_do_not_map_is_counted_as_unmapped(store: ClinicalStore, tmp_path: Path) -> None:
    r = _one(store, tmp_path, {"resourceType": "AllergyIntolerance", "id": "a1"},
             {"resourceType": "DiagnosticReport", "id": "d1"}, g.patient(1))  # fmt: skip
    assert (r.unmapped, r.rejected, r.inserted) == (
        {"AllergyIntolerance": 1, "DiagnosticReport": 1},
        0,
        {"person": 1},
    )


def test_type_that_is_not_fhir_r4_is_quarantined(store: ClinicalStore, tmp_path: Path) -> None:
    r = _one(store, tmp_path, {"resourceType": "Pateint", "id": "p1"}, {"id": "no-type"})
    assert r.rules == {"resource.type_missing": 1, "resource.type_unknown": 1}


def test_nothing_is_dropped_silently(store: ClinicalStore, tmp_path: Path) -> None:
    bad = g.observation(2, 0, valueQuantity={"value": 99, "unit": "%"})
    resources = [*g.population(5), bad, g.patient(0), {"resourceType": "Flag", "id": "f"}]
    p = g.write_ndjson(tmp_path / "mix.ndjson", resources)
    p.write_bytes(p.read_bytes() + b"not json\n")
    r = ingest_ndjson(store, [p])
    stored_resources = r.accepted - r.inserted.get("death", 0) - r.inserted.get("observation_period", 0)
    assert r.read == len(resources) + 1
    assert r.read == stored_resources + r.duplicates + r.rejected + sum(r.unmapped.values()) + sum(
        r.not_clinical.values()
    )


def test_reingesting_the_same_file_adds_nothing(loaded: ClinicalStore, tmp_path: Path) -> None:
    before = loaded.row_counts()
    r = ingest_ndjson(loaded, [tmp_path / "pop.ndjson"])
    assert (r.already_ingested, loaded.row_counts(), len(loaded.batches)) == (True, before, 1)


def test_resources_seen_before_in_another_file_are_duplicates(loaded: ClinicalStore, tmp_path: Path) -> None:
    before = loaded.row_counts()
    r = _one(loaded, tmp_path, g.patient(3), g.condition(3), g.patient(N + 1), name="again.ndjson")
    after = loaded.row_counts()
    assert (r.duplicates, r.inserted) == (2, {"person": 1})
    assert after == {**before, "person": before["person"] + 1}


def test_duplicate_ids_within_one_batch_keep_the_first(store: ClinicalStore, tmp_path: Path) -> None:
    r = _one(store, tmp_path, g.patient(1, gender="female"), g.patient(1, gender="male"))
    gender = store.connect().execute("SELECT gender_source_value FROM person").fetchall()
    assert (r.duplicates, gender) == (1, [("female",)])


def test_batch_failing_half_way_leaves_the_store_as_it_was(
    loaded: ClinicalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before_counts, before_files = loaded.row_counts(), sorted((loaded.path / "segments").rglob("*"))
    manifest = (loaded.path / "manifest.json").read_bytes()
    calls = {"n": 0}
    original = _Pipeline.process

    def failing(self: _Pipeline, chunk: list[tuple[int, int, bytes]]) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        original(self, chunk)

    monkeypatch.setattr(_Pipeline, "process", failing)
    p = g.write_ndjson(tmp_path / "more.ndjson", g.population(N + 20))
    with pytest.raises(RuntimeError, match="disk on fire"):
        ingest_ndjson(loaded, [p], chunk_records=40)
    assert calls["n"] == 3
    assert loaded.row_counts() == before_counts
    assert (loaded.path / "manifest.json").read_bytes() == manifest
    assert sorted((loaded.path / "segments").rglob("*")) == before_files


def test_killed_batch_leaves_the_store_as_it_was_and_is_cleaned_later(
    loaded: ClinicalStore, keystore: LocalKeyStore, tmp_path: Path
) -> None:
    before = loaded.row_counts()
    p = g.write_ndjson(tmp_path / "more.ndjson", g.population(N + 20))
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from healthspace.data.ingest import _Pipeline, ingest_ndjson
        from healthspace.data.keys import LocalKeyStore
        from healthspace.data.store import ClinicalStore
        original, calls = _Pipeline.process, []
        def dying(self, chunk):
            calls.append(1)
            if len(calls) == 3:
                self.wait()
                self._flush(final=True)  # segments on disk, manifest not yet written
                os._exit(9)
            original(self, chunk)
        _Pipeline.process = dying
        store = ClinicalStore.open(Path({str(loaded.path)!r}), LocalKeyStore(Path({str(keystore._dir)!r})))
        ingest_ndjson(store, [Path({str(p)!r})], chunk_records=40)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=False)
    assert proc.returncode == 9, proc.stderr.decode()
    reopened = ClinicalStore.open(loaded.path, keystore)
    orphans = {f for f in (loaded.path / "segments").rglob("*.parquet")} - set(reopened.scan_files())
    assert reopened.row_counts() == before
    assert orphans
    r = _one(reopened, tmp_path, g.patient(N + 101), name="next.ndjson")
    assert r.inserted == {"person": 1}
    assert not any(f.exists() for f in orphans)
    reopened.close()


def test_large_file_is_processed_in_bounded_chunks(
    store: ClinicalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    original = _Pipeline.process

    def spy(self: _Pipeline, chunk: list[tuple[int, int, bytes]]) -> None:
        sizes.append(len(chunk))
        original(self, chunk)

    monkeypatch.setattr(_Pipeline, "process", spy)
    p = g.write_ndjson(tmp_path / "pop.ndjson", g.population(N))
    ingest_ndjson(store, [p], chunk_records=50)
    assert max(sizes) == 50
    assert sum(sizes) == len(list(g.population(N)))
    assert store.row_counts() == g.expected_rows(N)
