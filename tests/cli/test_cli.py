"""The `healthspace` command: help everywhere, clear errors for operator mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from healthspace.cli.main import app
from healthspace.core.apikeys import Role

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["authority"],
        ["connector"],
        ["audit"],
        ["synth"],
        ["demo"],
        ["bench"],
        ["authority", "init"],
        ["authority", "onboard"],
        ["connector", "init"],
        ["audit", "verify"],
    ],
)
def test_every_command_has_help(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_authority_init_prints_keys_once_and_refuses_to_overwrite(tmp_path: Path) -> None:
    args = [
        "authority",
        "init",
        "--data-dir",
        str(tmp_path),
        "--id",
        "cli-authority",
        "--name",
        "CLI Authority",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "hs_admin_" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 1
    assert "already exists" in second.output


def test_serving_a_directory_without_an_authority_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["authority", "serve", "--data-dir", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert "authority init" in result.output


def test_serving_a_connector_that_was_never_onboarded_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["connector", "serve", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "connector init" in result.output


def test_an_unknown_bench_suite_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "--suite", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "unknown suite" in result.output


def test_an_operator_onboards_lists_and_revokes_from_the_command_line(tmp_path: Path) -> None:
    from healthspace.identity.keys import SigningKey
    from tests.support.space import running_space

    with running_space(tmp_path, {}) as space:
        common = ["--url", space.authority.url, "--api-key", space.authority.keys[Role.ADMIN]]
        credential = tmp_path / "mo.jwt"
        onboard = runner.invoke(
            app,
            [
                "authority",
                "onboard",
                *common,
                "--id",
                "mo-cli-clinic",
                "--name",
                "Macao CLI Clinic",
                "--type",
                "hospital",
                "--jurisdiction",
                "MO",
                "--role",
                "data-provider",
                "--public-key",
                SigningKey.generate().public_key_b64,
                "--credential-out",
                str(credential),
            ],
        )
        assert onboard.exit_code == 0, onboard.output
        assert credential.read_text().count(".") == 2  # a compact JWS
        listed = runner.invoke(app, ["authority", "list", *common, "--json"])
        assert '"mo-cli-clinic"' in listed.output
        revoked = runner.invoke(app, ["authority", "revoke", *common, "mo-cli-clinic", "--reason", "closed"])
        assert revoked.exit_code == 0
        assert "REVOKED" in revoked.output
        again = runner.invoke(app, ["authority", "revoke", *common, "mo-cli-clinic", "--reason", "closed"])
        assert again.exit_code == 1
        assert "cannot go from REVOKED" in again.output
        wrong_key = runner.invoke(
            app, ["authority", "list", "--url", space.authority.url, "--api-key", "nope"]
        )
        assert wrong_key.exit_code == 1
        assert "401" in wrong_key.output


def test_a_connector_without_the_dsp_schemas_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without them every peer's first DSP message would meet a 500; the connector must not start.
    monkeypatch.setenv("HEALTHSPACE_DSP_SCHEMA_DIR", str(tmp_path / "no-schemas"))
    result = runner.invoke(app, ["connector", "serve", "--data-dir", str(tmp_path / "c")])
    assert result.exit_code == 1
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "HEALTHSPACE_DSP_SCHEMA_DIR" in said
    assert "does not hold the DSP 2025-1 schemas" in said


def test_the_demo_without_the_dsp_schemas_stops_before_generating_anything(tmp_path: Path) -> None:
    # Run from a directory with no ../shared next to it and no setting: nothing is generated or started.
    work = tmp_path / "elsewhere" / "cwd"
    work.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "HEALTHSPACE_DSP_SCHEMA_DIR"}
    proc = subprocess.run(
        [sys.executable, "-m", "healthspace", "demo", "--once", "--data-dir", str(tmp_path / "space")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = " ".join(proc.stdout.split())  # the console wraps long lines
    assert "DSP 2025-1 schemas not found" in said
    assert "HEALTHSPACE_DSP_SCHEMA_DIR" in said
    assert not (tmp_path / "space").exists()
