"""generate(): determinism, the manifest, and argument checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from healthspace.core.errors import ConflictError, ValidationError
from healthspace.synth import OUTCOME_COEFFICIENTS, SITES
from healthspace.synth.generate import generate
from healthspace.synth.model import condition_scales
from tests.synth._data import Population


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    generate("sz", 1_500, 5, tmp_path / "a", progress=False)
    generate("sz", 1_500, 5, tmp_path / "b", progress=False)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_different_seed_gives_different_files(tmp_path: Path) -> None:
    generate("sz", 1_500, 5, tmp_path / "a", progress=False)
    generate("sz", 1_500, 6, tmp_path / "b", progress=False)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert all(a[k] != b[k] for k in a if k.endswith((".ndjson", ".parquet")))


def test_same_seed_at_two_sites_gives_different_patients(tmp_path: Path) -> None:
    generate("gz", 500, 1, tmp_path / "gz", progress=False)
    generate("hk", 500, 1, tmp_path / "hk", progress=False)
    gz = pq.read_table(tmp_path / "gz" / "omop" / "person.parquet").column("birth_datetime")
    hk = pq.read_table(tmp_path / "hk" / "omop" / "person.parquet").column("birth_datetime")
    assert gz != hk


def test_manifest_records_digests_of_the_files(small: Population) -> None:
    manifest = json.loads((small.out / "manifest.json").read_text())
    actual = _digests(small.out)
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == {
        k: v for k, v in actual.items() if k != "manifest.json"
    }


def test_manifest_records_row_counts_of_the_files(small: Population) -> None:
    manifest = json.loads((small.out / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        path = small.out / rel
        rows = path.read_bytes().count(b"\n") if rel.endswith(".ndjson") else pq.read_metadata(path).num_rows
        assert entry["rows"] == rows, rel


def test_manifest_records_site_seed_and_model(small: Population) -> None:
    manifest = json.loads((small.out / "manifest.json").read_text())
    assert (manifest["site"], manifest["seed"], manifest["patients"]) == ("gz", 3, 2_000)
    assert manifest["model"]["outcome"]["coefficients"] == dict(OUTCOME_COEFFICIENTS)
    assert manifest["site_parameters"]["prevalence"] == dict(SITES["gz"].prevalence)
    assert manifest["generator_version"]


def test_summary_counts_match_the_manifest(small: Population) -> None:
    manifest = json.loads((small.out / "manifest.json").read_text())
    for table, rows in small.summary.omop_rows.items():
        assert manifest["files"][f"omop/{table}.parquet"]["rows"] == rows
    assert small.summary.total_rows == sum(small.summary.omop_rows.values()) > 0
    assert small.summary.seconds > 0


def test_several_chunks_continue_ids_without_gaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("healthspace.synth.generate.CHUNK_PATIENTS", 300)
    generate("hk", 1_000, 2, tmp_path / "out", progress=False)
    for table, column in (
        ("person", "person_id"),
        ("measurement", "measurement_id"),
        ("consent", "consent_id"),
    ):
        ids = pq.read_table(tmp_path / "out" / "omop" / f"{table}.parquet").column(column).to_pylist()
        assert ids == list(range(1, len(ids) + 1)), table


def test_unknown_site_is_an_error_listing_the_known_sites(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="unknown site 'xx'; known sites: gz, hk, sz"):
        generate("xx", 10, 0, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("patients", [0, -5, True])
def test_patient_count_below_one_is_rejected(tmp_path: Path, patients: int) -> None:
    with pytest.raises(ValidationError, match="patients"):
        generate("gz", patients, 0, tmp_path / "out", progress=False)


def test_negative_seed_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="seed"):
        generate("gz", 10, -1, tmp_path / "out", progress=False)


def test_non_empty_directory_is_refused_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConflictError, match="not empty"):
        generate("gz", 10, 0, tmp_path, progress=False)


def test_overwrite_replaces_an_earlier_population(tmp_path: Path) -> None:
    generate("gz", 20, 0, tmp_path / "out", progress=False)
    summary = generate("gz", 30, 0, tmp_path / "out", progress=False, overwrite=True)
    assert pq.read_metadata(tmp_path / "out" / "omop" / "person.parquet").num_rows == 30 == summary.patients


def test_output_path_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValidationError, match="not a directory"):
        generate("gz", 10, 0, tmp_path / "file", progress=False, overwrite=True)


@pytest.mark.parametrize("site", sorted(SITES))
def test_site_parameters_keep_every_probability_below_the_cap(site: str) -> None:
    assert all(s > 0 for s in condition_scales(SITES[site]))
