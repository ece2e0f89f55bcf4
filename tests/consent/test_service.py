"""Consent use cases: withdrawal at once, subscribers, audit entries, receipts, fail-closed checks."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from healthspace.audit.log import AuditLog
from healthspace.consent.models import DecisionKind, Source, WithdrawalEvent
from healthspace.consent.receipts import verify_chain, verify_receipt
from healthspace.consent.service import ConsentService
from healthspace.core.clock import FixedClock
from healthspace.core.errors import ValidationError
from healthspace.identity.keys import SigningKey
from tests.consent.conftest import DIABETES, QUALITY, T0, pat, person

LAB = ["laboratory"]
STAFF = "steward:k1"


def test_withdrawal_excludes_the_patient_from_the_very_next_cohort(service: ConsentService) -> None:
    for p in (1, 2, 3):
        service.grant(pat(p), DIABETES, actor=STAFF, source=Source.STAFF)
    assert list(service.cohort(DIABETES, LAB, actor="job").person_ids.to_pylist()) == sorted(
        person(p) for p in (1, 2, 3)
    )
    service.withdraw(pat(2), DIABETES, actor="patient", source=Source.PATIENT)
    assert service.cohort(DIABETES, LAB, actor="job").person_ids.to_pylist() == sorted([person(1), person(3)])


def test_withdrawal_tells_every_subscriber(service: ConsentService) -> None:
    seen: list[WithdrawalEvent] = []
    service.on_withdrawal(seen.append)
    service.grant(pat(4), DIABETES, actor=STAFF, source=Source.STAFF)
    change = service.withdraw(pat(4), DIABETES, actor="patient", source=Source.PATIENT)
    assert [(e.person_id, e.scenario_id, e.decision_id) for e in seen] == [
        (person(4), DIABETES, change.record.decision_id)
    ]
    assert seen[0].patient == service.pseudonym(pat(4))


def test_a_failing_subscriber_neither_undoes_the_withdrawal_nor_stops_others(
    service: ConsentService, audit: AuditLog
) -> None:
    def broken(_: WithdrawalEvent) -> None:
        raise RuntimeError("agreement store down")

    seen: list[WithdrawalEvent] = []
    service.on_withdrawal(broken)
    service.on_withdrawal(seen.append)
    service.grant(pat(5), DIABETES, actor=STAFF, source=Source.STAFF)
    service.withdraw(pat(5), DIABETES, actor="patient", source=Source.PATIENT)
    assert len(seen) == 1
    assert service.cohort(DIABETES, LAB, actor="job").person_ids.to_pylist() == []
    last = audit.entries(audit.size - 3, audit.size)
    assert any(e.entry.action == "consent.withdrawal.notify" and e.entry.outcome == "failure" for e in last)


def test_unsubscribed_callbacks_are_not_called(service: ConsentService) -> None:
    seen: list[WithdrawalEvent] = []
    unsubscribe = service.on_withdrawal(seen.append)
    unsubscribe()
    service.withdraw(pat(6), DIABETES, actor="patient", source=Source.PATIENT)
    assert seen == []


def test_each_change_is_audited_under_the_pseudonym_only(service: ConsentService, audit: AuditLog) -> None:
    before = audit.size
    service.grant(pat(123456), DIABETES, actor=STAFF, source=Source.STAFF)
    service.withdraw(pat(123456), DIABETES, actor=STAFF, source=Source.STAFF)
    entries = [e.entry for e in audit.entries(before, audit.size)]
    assert [e.action for e in entries] == ["consent.permit", "consent.withdraw"]
    assert all(e.subject == f"patient:{service.pseudonym(pat(123456))}" for e in entries)
    assert all(b"123456" not in e.canonical_bytes() for e in entries)
    assert all(str(person(123456)).encode() not in e.canonical_bytes() for e in entries)


def test_the_withdrawal_shows_in_the_audit_log(service: ConsentService, audit: AuditLog) -> None:
    service.grant(pat(8), QUALITY, actor=STAFF, source=Source.STAFF)
    service.withdraw(pat(8), QUALITY, actor="patient:x", source=Source.PATIENT)
    (e,) = [e.entry for e in audit.entries(audit.size - 1, audit.size)]
    assert (e.action, e.scenario_id, e.actor, e.outcome) == (
        "consent.withdraw",
        QUALITY,
        "patient:x",
        "success",
    )


def test_cohort_queries_are_audited_with_counts(service: ConsentService, audit: AuditLog) -> None:
    service.grant(pat(9), DIABETES, actor=STAFF, source=Source.STAFF)
    service.cohort(DIABETES, LAB, actor="job:1")
    (e,) = [e.entry for e in audit.entries(audit.size - 1, audit.size)]
    assert (e.action, e.actor, e.details["patients"]) == ("consent.cohort", "job:1", 1)


def test_receipts_chain_and_verify_offline(service: ConsentService) -> None:
    service.grant(pat(10), DIABETES, actor=STAFF, source=Source.STAFF, data_classes=["laboratory"])
    service.grant(pat(10), QUALITY, actor=STAFF, source=Source.STAFF)
    service.withdraw(pat(10), DIABETES, actor=STAFF, source=Source.STAFF)
    docs = [service.receipt(pat(10), r.receipt_id, actor="t") for r in service.receipts(pat(10), actor="t")]
    _, public = service.public_key
    assert verify_chain(docs, public) == 3
    payload = verify_receipt(docs[0], public)
    assert (payload["decision"], payload["scenario_id"], payload["data_classes"]) == (
        "permit",
        DIABETES,
        ["laboratory"],
    )
    assert payload["patient"] == service.pseudonym(pat(10))


def test_an_edited_receipt_does_not_verify(service: ConsentService) -> None:
    change = service.grant(pat(11), DIABETES, actor=STAFF, source=Source.STAFF)
    doc = orjson.loads(orjson.dumps(change.receipt))
    doc["payload"]["decision"] = "deny"
    with pytest.raises(ValidationError, match="does not verify"):
        verify_receipt(doc, service.public_key[1])


def test_a_receipt_does_not_verify_with_another_key(service: ConsentService) -> None:
    change = service.grant(pat(12), DIABETES, actor=STAFF, source=Source.STAFF)
    with pytest.raises(ValidationError):
        verify_receipt(change.receipt, SigningKey.generate().public_key_b64)


def test_a_removed_receipt_breaks_the_chain(service: ConsentService) -> None:
    for sc in (DIABETES, QUALITY, DIABETES):
        service.grant(pat(13), sc, actor=STAFF, source=Source.STAFF)
    docs = [service.receipt(pat(13), r.receipt_id, actor="t") for r in service.receipts(pat(13), actor="t")]
    with pytest.raises(ValidationError, match="missing"):
        verify_chain([docs[0], docs[2]], service.public_key[1])


def test_a_grant_is_never_backdated(service: ConsentService, clock: FixedClock) -> None:
    change = service.grant(
        pat(14), DIABETES, actor=STAFF, source=Source.STAFF, valid_from=T0 - timedelta(days=30)
    )
    assert change.record.valid_from == clock.now()
    assert not service.check(pat(14), DIABETES, LAB, actor="t", at=T0 - timedelta(days=1)).allowed


def test_an_expired_grant_stops_counting(service: ConsentService, clock: FixedClock) -> None:
    service.grant(pat(15), DIABETES, actor=STAFF, source=Source.STAFF, valid_until=T0 + timedelta(days=7))
    assert service.cohort(DIABETES, LAB, actor="job").person_ids.to_pylist() == [person(15)]
    clock.advance(timedelta(days=7))
    assert service.cohort(DIABETES, LAB, actor="job").person_ids.to_pylist() == []


def test_a_failing_check_denies(service: ConsentService, monkeypatch: pytest.MonkeyPatch) -> None:
    service.grant(pat(16), DIABETES, actor=STAFF, source=Source.STAFF)

    def boom(*_: object, **__: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(service._store, "history", boom)
    result = service.check(pat(16), DIABETES, LAB, actor="t")
    assert not result.allowed
    assert "failed" in result.reasons[0]


def test_a_failing_cohort_query_raises_instead_of_returning_anyone(
    service: ConsentService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object, **__: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(service._store, "cohort", boom)
    with pytest.raises(OSError, match="disk gone"):
        service.cohort(DIABETES, LAB, actor="job")


def test_current_shows_the_governing_decision_per_scenario(service: ConsentService) -> None:
    service.grant(pat(17), DIABETES, actor=STAFF, source=Source.STAFF)
    service.grant(pat(17), QUALITY, actor=STAFF, source=Source.STAFF)
    service.withdraw(pat(17), QUALITY, actor=STAFF, source=Source.STAFF)
    current = service.current(pat(17), actor="t")
    assert {k: v.decision if v else None for k, v in current.items()} == {
        DIABETES: DecisionKind.PERMIT,
        QUALITY: DecisionKind.DENY,
    }


def test_pseudonyms_are_stable_distinct_and_keyed(
    service: ConsentService, db: object, audit: AuditLog
) -> None:
    assert service.pseudonym(pat(987654)) == service.pseudonym(pat(987654))
    assert service.pseudonym(pat(987654)) != service.pseudonym(pat(987655))
    assert "987654" not in service.pseudonym(pat(987654))
    other = ConsentService(db, audit, SigningKey.generate(), "other", service.refs)  # type: ignore[arg-type]
    assert other.pseudonym(pat(987654)) != service.pseudonym(pat(987654))


def test_an_unchanged_registry_reuses_the_cohort(service: ConsentService) -> None:
    service.grant(pat(30), DIABETES, actor=STAFF, source=Source.STAFF)
    first = service.cohort(DIABETES, LAB, actor="job")
    again = service.cohort(DIABETES, LAB, actor="job")
    assert again.person_ids is first.person_ids  # not re-ranked: the same Arrow array
    assert again.person_ids.to_pylist() == [person(30)]


def test_a_decision_recorded_by_another_service_on_the_same_database_is_seen_at_once(
    service: ConsentService, db: object, audit: AuditLog, clock: FixedClock
) -> None:
    """Another process (the CLI importing, a second worker) writes to the registry: the cache must miss."""
    service.grant(pat(31), DIABETES, actor=STAFF, source=Source.STAFF)
    assert service.cohort(DIABETES, LAB, actor="job").person_ids.to_pylist() == [person(31)]
    other = ConsentService(db, audit, SigningKey.generate(), "other", service.refs, clock=clock)  # type: ignore[arg-type]
    other.withdraw(pat(31), DIABETES, actor=STAFF, source=Source.STAFF)
    assert service.cohort(DIABETES, LAB, actor="job").person_ids.to_pylist() == []


def test_a_grant_starting_later_counts_from_its_start(service: ConsentService, clock: FixedClock) -> None:
    service.grant(pat(32), DIABETES, actor=STAFF, source=Source.STAFF, valid_from=T0 + timedelta(days=2))
    assert service.cohort(DIABETES, LAB, actor="job").person_ids.to_pylist() == []
    clock.advance(timedelta(days=2))
    assert service.cohort(DIABETES, LAB, actor="job").person_ids.to_pylist() == [person(32)]
    # An earlier instant than the cached cohort's is computed for that instant, not served from the cache.
    assert service.cohort(DIABETES, LAB, actor="job", at=T0).person_ids.to_pylist() == []


def test_a_failing_version_read_raises_instead_of_serving_a_cached_cohort(
    service: ConsentService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service.grant(pat(33), DIABETES, actor=STAFF, source=Source.STAFF)
    service.cohort(DIABETES, LAB, actor="job")

    def boom(*_: object, **__: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(service._store, "version", boom)
    with pytest.raises(OSError, match="disk gone"):
        service.cohort(DIABETES, LAB, actor="job")
