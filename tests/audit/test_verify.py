"""Offline verification of exported logs, and of exports tampered with line by line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from healthspace.audit import merkle
from healthspace.audit.log import AuditLog
from healthspace.audit.models import SignedTreeHead
from healthspace.audit.verify import load_head, verify_entry_inclusion, verify_export
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from tests.audit.conftest import KeySigner, make_entry


@pytest.fixture
def sqlite_log(sqlite_url: str, signer: KeySigner, clock: FixedClock) -> Iterator[AuditLog]:
    db = Database(sqlite_url, branches=["audit"])
    log = AuditLog(db, signer, clock)
    yield log
    log.close()
    db.dispose()


@pytest.fixture
def export(sqlite_log: AuditLog, tmp_path: Path) -> Path:
    sqlite_log.append_many([make_entry(i) for i in range(40)])
    out = tmp_path / "export"
    sqlite_log.export(out)
    return out


def _lines(export: Path) -> list[bytes]:
    return (export / "entries.jsonl").read_bytes().splitlines(keepends=True)


def _write(export: Path, lines: list[bytes]) -> None:
    (export / "entries.jsonl").write_bytes(b"".join(lines))


def test_an_export_verifies_against_its_head_and_the_signer_key(export: Path, signer: KeySigner) -> None:
    report = verify_export(export, public_key_b64=signer.public_key_b64)
    assert report.ok, report.reason
    assert report.entries == 40
    expected = merkle.tree_root([merkle.leaf_hash(make_entry(i).canonical_bytes()) for i in range(40)])
    assert report.root_hash == expected.hex()


def test_an_edited_line_is_reported_at_its_index(export: Path, signer: KeySigner) -> None:
    lines = _lines(export)
    lines[17] = lines[17].replace(b"steward-2", b"steward-0")
    _write(export, lines)
    report = verify_export(export, public_key_b64=signer.public_key_b64)
    assert (report.ok, report.first_bad_index) == (False, 17)


def test_an_edited_line_with_a_rewritten_leaf_hash_fails_the_signed_root(
    export: Path, signer: KeySigner
) -> None:
    lines = _lines(export)
    obj = orjson.loads(lines[17])
    obj["entry"]["reason"] = "nothing to see"
    obj["leaf_hash"] = merkle.leaf_hash(orjson.dumps(obj["entry"], option=orjson.OPT_SORT_KEYS)).hex()
    lines[17] = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) + b"\n"
    _write(export, lines)
    report = verify_export(export, public_key_b64=signer.public_key_b64)
    assert not report.ok
    assert "do not match the signed root" in (report.reason or "")


def test_a_reformatted_line_is_refused_as_non_canonical(export: Path, signer: KeySigner) -> None:
    lines = _lines(export)
    lines[3] = orjson.dumps(orjson.loads(lines[3]), option=orjson.OPT_INDENT_2).replace(b"\n", b" ") + b"\n"
    _write(export, lines)
    report = verify_export(export, public_key_b64=signer.public_key_b64)
    assert (report.ok, report.first_bad_index) == (False, 3)


def test_a_removed_line_is_reported_where_it_is_missing(export: Path, signer: KeySigner) -> None:
    lines = _lines(export)
    del lines[25]
    _write(export, lines)
    report = verify_export(export, public_key_b64=signer.public_key_b64)
    assert (report.ok, report.first_bad_index) == (False, 25)


def test_a_removed_last_line_is_reported(export: Path, signer: KeySigner) -> None:
    _write(export, _lines(export)[:-1])
    report = verify_export(export, public_key_b64=signer.public_key_b64)
    assert (report.ok, report.first_bad_index) == (False, 39)


def test_swapped_lines_are_reported_at_the_first_of_them(export: Path, signer: KeySigner) -> None:
    lines = _lines(export)
    lines[5], lines[30] = lines[30], lines[5]
    _write(export, lines)
    report = verify_export(export, public_key_b64=signer.public_key_b64)
    assert (report.ok, report.first_bad_index) == (False, 5)


def test_a_wrong_public_key_fails(export: Path) -> None:
    report = verify_export(export, public_key_b64=KeySigner("other").public_key_b64)
    assert not report.ok
    assert "signature" in (report.reason or "")


def test_an_older_trusted_head_verifies_the_prefix_and_counts_the_rest_as_unsigned(
    sqlite_log: AuditLog, tmp_path: Path, signer: KeySigner
) -> None:
    sqlite_log.append_many([make_entry(i) for i in range(10)])
    old = sqlite_log.tree_head()
    sqlite_log.append_many([make_entry(i) for i in range(10, 15)])
    sqlite_log.export(tmp_path / "x")
    report = verify_export(tmp_path / "x", head=old, public_key_b64=signer.public_key_b64)
    assert report.ok, report.reason
    assert report.unsigned_entries == 5


def test_a_forged_head_with_a_wrong_size_fails(export: Path, signer: KeySigner) -> None:
    head = load_head(export / "tree-head.json")
    forged = SignedTreeHead.sign(signer, 41, head.root, head.timestamp)
    report = verify_export(export, head=forged, public_key_b64=signer.public_key_b64)
    assert (report.ok, report.first_bad_index) == (False, 40)


def test_one_entry_verifies_with_its_inclusion_proof_and_the_head(
    sqlite_log: AuditLog, signer: KeySigner
) -> None:
    sqlite_log.append_many([make_entry(i) for i in range(30)])
    head = sqlite_log.tree_head()
    proof = sqlite_log.inclusion_proof(12)
    assert verify_entry_inclusion(make_entry(12), 12, proof.path, head, signer.public_key_b64)
    assert not verify_entry_inclusion(make_entry(13), 12, proof.path, head, signer.public_key_b64)
