"""Audit entries' canonical bytes and signed tree heads' signed bytes, defined exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from healthspace.audit.models import AuditEntry, Outcome, SignedTreeHead, b64decode, format_time
from healthspace.core.errors import ValidationError
from tests.audit.conftest import KeySigner

WHEN = datetime(2025, 3, 1, 8, 30, 0, 5, tzinfo=UTC)


def test_canonical_bytes_are_sorted_compact_json_with_a_fixed_time_format() -> None:
    e = AuditEntry(
        time=WHEN,
        actor="a",
        action="b",
        subject="c",
        outcome=Outcome.DENIED,
        reason="r",
        details={"z": 1, "a": [2]},
    )
    assert e.canonical_bytes() == (
        b'{"action":"b","actor":"a","agreement_id":null,"details":{"a":[2],"z":1},"outcome":"denied",'
        b'"reason":"r","scenario_id":null,"subject":"c","time":"2025-03-01T08:30:00.000005Z","v":1}'
    )


def test_times_in_other_zones_are_stored_in_utc() -> None:
    t = datetime(2025, 3, 1, 16, 30, tzinfo=timezone(timedelta(hours=8)))
    assert format_time(t) == "2025-03-01T08:30:00.000000Z"


def test_an_entry_round_trips_through_its_canonical_bytes() -> None:
    e = AuditEntry(
        time=WHEN,
        actor="a",
        action="b",
        subject="c",
        outcome=Outcome.SUCCESS,
        scenario_id="s",
        agreement_id="g",
        details={"k": "v"},
    )
    assert AuditEntry.from_bytes(e.canonical_bytes()) == e


@pytest.mark.parametrize(
    "kwargs",
    [
        {"time": datetime(2025, 1, 1)},
        {"actor": ""},
        {"outcome": "maybe"},
        {"details": {"blob": "x" * 5000}},
        {"details": {"ids": {1, 2}}},
        {"subject": "a\x00b"},
    ],
)
def test_bad_entries_are_refused(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {
        "time": WHEN,
        "actor": "a",
        "action": "b",
        "subject": "c",
        "outcome": "success",
    }
    with pytest.raises(ValidationError):
        AuditEntry(**{**base, **kwargs})  # type: ignore[arg-type]


def test_details_are_copied_so_later_mutation_cannot_change_the_entry() -> None:
    details = {"n": 1}
    e = AuditEntry(time=WHEN, actor="a", action="b", subject="c", outcome=Outcome.SUCCESS, details=details)
    details["n"] = 2
    assert e.details == {"n": 1}


def test_tree_head_signed_bytes_are_the_documented_five_lines() -> None:
    head = SignedTreeHead(tree_size=3, root_hash="ab" * 32, timestamp=WHEN, key_id="k", signature="")
    assert head.signed_bytes() == (
        b"healthspace-audit-tree-head-v1\n3\n2025-03-01T08:30:00.000005Z\n" + b"ab" * 32 + b"\nk\n"
    )


def test_a_signed_head_verifies_and_any_changed_field_does_not() -> None:
    signer = KeySigner()
    head = SignedTreeHead.sign(signer, 3, bytes(32), WHEN)
    assert len(b64decode(head.signature)) == 64
    assert head.verify(signer.public_key_b64)
    for changed in (
        SignedTreeHead(4, head.root_hash, head.timestamp, head.key_id, head.signature),
        SignedTreeHead(3, "01" * 32, head.timestamp, head.key_id, head.signature),
        SignedTreeHead(3, head.root_hash, WHEN + timedelta(microseconds=1), head.key_id, head.signature),
        SignedTreeHead(3, head.root_hash, head.timestamp, "other", head.signature),
    ):
        assert not changed.verify(signer.public_key_b64)
    assert not head.verify(KeySigner().public_key_b64)


def test_a_head_round_trips_through_json() -> None:
    head = SignedTreeHead.sign(KeySigner(), 9, bytes(range(32)), WHEN)
    assert SignedTreeHead.from_json(head.to_json()) == head
