"""`healthspace data` lifecycle commands against a connector-style data directory (database, signing key)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from healthspace.core.settings import Settings
from healthspace.data.provenance import verify_fhir_provenance
from healthspace.identity.keys import SigningKey
from tests.data import fhirgen as g

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], SigningKey]:
    data_dir = tmp_path / "connector"
    data_dir.mkdir()
    for var in ("HEALTHSPACE_KEK", "HEALTHSPACE_DATABASE_URL", "HEALTHSPACE_ENV"):
        monkeypatch.delenv(var, raising=False)
    key = SigningKey.generate()
    key.save(data_dir / "participant.key", Settings(data_dir=data_dir).key_encryption_key())
    opts = ["--data-dir", str(data_dir), "--keys", str(tmp_path / "keys"), "--organisation", "hospital-gz"]
    return opts, key


def _run(*args: str) -> str:
    from healthspace.data.cli import data_app

    r = runner.invoke(data_app, list(args))
    assert r.exit_code == 0, r.output
    return r.stdout


def _loaded(home: tuple[list[str], SigningKey], tmp_path: Path) -> list[str]:
    opts, _ = home
    _run("register", "gz", "--create", *opts, "--actor", "steward:alice")
    f = g.write_ndjson(tmp_path / "export.ndjson", list(g.population(3)))
    _run("load", "gz", str(f), "--source-system", "his-gz", *opts, "--json")
    return opts


def test_load_then_export_verifiable_provenance(home: tuple[list[str], SigningKey], tmp_path: Path) -> None:
    opts = _loaded(home, tmp_path)
    bundle = orjson.loads(_run("provenance", "gz", *opts))
    record = verify_fhir_provenance(bundle["entry"][0]["resource"], home[1].public_key_b64)
    assert (record["steward"], record["counts"]["inserted"]["person"]) == ("cli", 3)


def test_archive_status_restore(home: tuple[list[str], SigningKey], tmp_path: Path) -> None:
    opts = _loaded(home, tmp_path)
    _run("archive", "gz", *opts, "--retain-until", "2099-01-01")
    status = orjson.loads(_run("status", "gz", *opts, "--json"))
    assert (status["state"], status["retain_until"][:10]) == ("archived", "2099-01-01")
    _run("restore", "gz", *opts)
    assert orjson.loads(_run("status", "gz", *opts, "--json"))["state"] == "curated"


def test_erase_patient_reports_rows_removed(home: tuple[list[str], SigningKey], tmp_path: Path) -> None:
    opts = _loaded(home, tmp_path)
    out = orjson.loads(
        _run("erase-patient", "gz", *opts, "--patient", "pat-1", "--reason", "art. 17", "--json")
    )
    assert out["rows_removed"]["person"] == 1


def test_destroy_needs_yes_then_prints_a_certificate(
    home: tuple[list[str], SigningKey], tmp_path: Path
) -> None:
    from healthspace.data.cli import data_app

    opts = _loaded(home, tmp_path)
    refused = runner.invoke(data_app, ["destroy", "gz", *opts, "--reason", "done"])
    assert refused.exit_code == 1
    cert = orjson.loads(_run("destroy", "gz", *opts, "--reason", "done", "--yes"))
    assert cert["certificate"]["key_id"] == "hs-data-gz"


def test_a_refused_move_is_one_line_and_exit_1(home: tuple[list[str], SigningKey], tmp_path: Path) -> None:
    from healthspace.data.cli import data_app

    opts = _loaded(home, tmp_path)
    r = runner.invoke(data_app, ["move", "gz", "published", *opts])
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    assert "cannot go from acquired to published" in r.output
