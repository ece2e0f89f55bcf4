"""`healthspace audit verify` and `export`: exit codes and messages on valid and tampered exports."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from healthspace.audit.cli import audit_app
from healthspace.audit.log import AuditLog
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from tests.audit.conftest import KeySigner, make_entry

runner = CliRunner()


def _export(sqlite_url: str, signer: KeySigner, clock: FixedClock, out: Path) -> None:
    db = Database(sqlite_url, branches=["audit"])
    log = AuditLog(db, signer, clock)
    log.append_many([make_entry(i) for i in range(12)])
    log.tree_head()
    log.close()
    result = runner.invoke(audit_app, ["export", "--database-url", sqlite_url, "--out", str(out)])
    db.dispose()
    assert result.exit_code == 0, result.output


def test_verify_exits_0_with_a_summary_for_a_valid_export(
    sqlite_url: str, signer: KeySigner, clock: FixedClock, tmp_path: Path
) -> None:
    _export(sqlite_url, signer, clock, tmp_path / "x")
    result = runner.invoke(audit_app, ["verify", str(tmp_path / "x"), "--public-key", signer.public_key_b64])
    assert result.exit_code == 0, result.output
    assert "valid: 12 entries" in result.output


def test_verify_exits_1_naming_the_first_bad_index(
    sqlite_url: str, signer: KeySigner, clock: FixedClock, tmp_path: Path
) -> None:
    _export(sqlite_url, signer, clock, tmp_path / "x")
    entries = tmp_path / "x" / "entries.jsonl"
    lines = entries.read_bytes().splitlines(keepends=True)
    entries.write_bytes(b"".join(lines[:4] + lines[5:]))
    result = runner.invoke(audit_app, ["verify", str(tmp_path / "x"), "--public-key", signer.public_key_b64])
    assert result.exit_code == 1
    assert "INVALID at index 4" in result.output


def test_verify_exits_1_with_a_key_that_did_not_sign(
    sqlite_url: str, signer: KeySigner, clock: FixedClock, tmp_path: Path
) -> None:
    _export(sqlite_url, signer, clock, tmp_path / "x")
    other = KeySigner().public_key_b64
    result = runner.invoke(audit_app, ["verify", str(tmp_path / "x"), "--public-key", other])
    assert result.exit_code == 1
    assert "signature" in result.output


def test_verify_exits_2_when_the_export_is_missing(tmp_path: Path) -> None:
    result = runner.invoke(audit_app, ["verify", str(tmp_path / "nothing")])
    assert result.exit_code == 2
