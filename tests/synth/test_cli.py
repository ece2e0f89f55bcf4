"""The `synth` command, driven through typer's CliRunner inside a one-command app."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from healthspace.synth.cli import synth_command

app = typer.Typer()
app.command()(synth_command)
runner = CliRunner()


def test_cli_writes_a_population(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["--site", "hk", "--patients", "200", "--seed", "4", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert (manifest["site"], manifest["patients"], manifest["seed"]) == ("hk", 200, 4)


def test_cli_defaults_to_1000_patients_and_seed_0(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--site", "sz", "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert (manifest["patients"], manifest["seed"]) == (1000, 0)


def test_cli_unknown_site_fails_listing_known_sites(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--site", "mo", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "known sites: gz, hk, sz" in result.output


def test_cli_rejects_zero_patients(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--site", "gz", "--patients", "0", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "patients" in result.output


def test_cli_refuses_a_non_empty_directory_without_force(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    result = runner.invoke(app, ["--site", "gz", "--patients", "10", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "--force" in result.output


def test_cli_force_overwrites_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    result = runner.invoke(
        app, ["--site", "gz", "--patients", "10", "--out", str(tmp_path / "o"), "--force", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "manifest.json").exists()


def test_cli_requires_out(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--site", "gz"])
    assert result.exit_code != 0


def test_cli_help_describes_every_option() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for option in ("--site", "--patients", "--seed", "--out", "--quiet", "--force"):
        assert option in result.output
