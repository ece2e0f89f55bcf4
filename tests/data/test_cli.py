"""`healthspace data` commands: init, ingest, report, quality, resubmit; clear errors without tracebacks."""

from __future__ import annotations

from pathlib import Path

import orjson
from typer.testing import CliRunner

from healthspace.data.cli import data_app
from tests.data import fhirgen as g

runner = CliRunner()


def _args(tmp_path: Path) -> list[str]:
    return ["--store", str(tmp_path / "store"), "--keys", str(tmp_path / "keys")]


def _init(tmp_path: Path) -> None:
    r = runner.invoke(data_app, ["init", *_args(tmp_path), "--dataset", "cli-test"])
    assert r.exit_code == 0, r.output


def test_ingest_then_report_in_json(tmp_path: Path) -> None:
    _init(tmp_path)
    bad = g.patient(9, gender="?")
    f = g.write_ndjson(tmp_path / "in.ndjson", [*g.population(3), bad])
    ingest = runner.invoke(data_app, ["ingest", *_args(tmp_path), str(f), "--json"])
    report = runner.invoke(data_app, ["report", *_args(tmp_path), "--json", "--quarantine"])
    doc = orjson.loads(report.stdout)
    assert (ingest.exit_code, report.exit_code) == (0, 0)
    assert orjson.loads(ingest.stdout)["inserted"]["person"] == 3
    assert (doc["open_quarantine"], doc["quarantine"][0]["resource_id"]) == (1, "pat-9")


def test_quality_prints_the_score(tmp_path: Path) -> None:
    _init(tmp_path)
    runner.invoke(
        data_app, ["ingest", *_args(tmp_path), str(g.write_ndjson(tmp_path / "in.ndjson", g.population(3)))]
    )
    r = runner.invoke(data_app, ["quality", *_args(tmp_path), "--json"])
    doc = orjson.loads(r.stdout)
    assert r.exit_code == 0
    assert doc["score"] == doc["passed"] / (doc["passed"] + doc["failed"])


def test_resubmit_with_a_fixed_file(tmp_path: Path) -> None:
    _init(tmp_path)
    runner.invoke(
        data_app,
        ["ingest", *_args(tmp_path), str(g.write_ndjson(tmp_path / "in.ndjson", [g.patient(1, gender="?")]))],
    )
    qid = orjson.loads(
        runner.invoke(data_app, ["report", *_args(tmp_path), "--json", "--quarantine"]).stdout
    )["quarantine"][0]["quarantine_id"]
    (tmp_path / "fixed.json").write_bytes(orjson.dumps(g.patient(1)))
    r = runner.invoke(data_app, ["resubmit", *_args(tmp_path), qid, "--file", str(tmp_path / "fixed.json")])
    assert r.exit_code == 0, r.output
    assert "inserted 1" in r.stdout


def test_wrong_key_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    _init(tmp_path)
    r = runner.invoke(
        data_app, ["report", "--store", str(tmp_path / "store"), "--keys", str(tmp_path / "elsewhere")]
    )
    assert r.exit_code == 1
    assert "Encryption key unavailable" in r.stderr
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
