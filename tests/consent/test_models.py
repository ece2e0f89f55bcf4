"""The pure consent decision: default deny, periods, later decisions winning, data-class limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from healthspace.consent.models import (
    ConsentRecord,
    DecisionKind,
    check_consent,
    classes_for_omop_tables,
    classes_of_mask,
    mask_of,
)
from healthspace.core.errors import ValidationError

S = "diabetes-outcomes-research"
T = datetime(2025, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def rec(
    kind: DecisionKind,
    decided: datetime,
    start: datetime | None = None,
    end: datetime | None = None,
    classes: frozenset[str] | None = None,
    seq: int = 0,
    scenario: str = S,
) -> ConsentRecord:
    return ConsentRecord(
        person_id=1,
        scenario_id=scenario,
        decision=kind,
        decided_at=decided,
        valid_from=start or decided,
        valid_until=end,
        data_classes=classes,
        seq=seq,
    )


PERMIT, DENY = DecisionKind.PERMIT, DecisionKind.DENY
LAB = ["laboratory"]


def test_no_record_is_denied() -> None:
    assert not check_consent([], S, T, LAB).allowed


def test_a_record_on_another_scenario_does_not_count() -> None:
    assert not check_consent([rec(PERMIT, T, scenario="other")], S, T + DAY, LAB).allowed


def test_permit_in_force_allows() -> None:
    assert check_consent([rec(PERMIT, T)], S, T + DAY, LAB).allowed


def test_permit_not_yet_begun_is_denied() -> None:
    assert not check_consent([rec(PERMIT, T, start=T + 10 * DAY)], S, T + DAY, LAB).allowed


def test_expired_permit_is_denied() -> None:
    check = check_consent([rec(PERMIT, T, end=T + 5 * DAY)], S, T + 5 * DAY, LAB)
    assert not check.allowed
    assert "expired" in check.reasons[0]


def test_deny_after_permit_wins_from_its_time() -> None:
    records = [rec(PERMIT, T, seq=1), rec(DENY, T + 3 * DAY, seq=2)]
    assert check_consent(records, S, T + 2 * DAY, LAB).allowed
    assert not check_consent(records, S, T + 3 * DAY, LAB).allowed


def test_a_new_permit_after_a_withdrawal_allows_again() -> None:
    records = [rec(PERMIT, T, seq=1), rec(DENY, T + DAY, seq=2), rec(PERMIT, T + 2 * DAY, seq=3)]
    assert check_consent(records, S, T + 3 * DAY, LAB).allowed


def test_an_older_permit_recorded_after_a_withdrawal_does_not_revive_consent() -> None:
    records = [rec(DENY, T + DAY, seq=1), rec(PERMIT, T, seq=2)]
    assert not check_consent(records, S, T + 2 * DAY, LAB).allowed


def test_a_withdrawal_cancels_a_permit_that_had_not_begun() -> None:
    records = [rec(PERMIT, T, start=T + 10 * DAY, seq=1), rec(DENY, T + DAY, seq=2)]
    assert not check_consent(records, S, T + 20 * DAY, LAB).allowed


def test_equal_decision_times_are_ordered_by_recording() -> None:
    records = [rec(DENY, T, seq=2), rec(PERMIT, T, seq=1)]
    assert not check_consent(records, S, T + DAY, LAB).allowed


def test_class_limit_excludes_other_classes() -> None:
    records = [rec(PERMIT, T, classes=frozenset({"demographics", "laboratory"}))]
    assert check_consent(records, S, T + DAY, ["laboratory", "demographics"]).allowed
    check = check_consent(records, S, T + DAY, ["laboratory", "medications"])
    assert not check.allowed
    assert "medications" in check.reasons[0]


def test_a_deny_takes_no_class_limit() -> None:
    with pytest.raises(ValidationError):
        rec(DENY, T, classes=frozenset({"laboratory"}))


def test_a_use_must_name_its_classes() -> None:
    with pytest.raises(ValidationError):
        check_consent([rec(PERMIT, T)], S, T + DAY, [])


def test_unknown_class_is_refused() -> None:
    with pytest.raises(ValidationError):
        mask_of(["genome"])


def test_period_must_end_after_it_starts() -> None:
    with pytest.raises(ValidationError):
        rec(PERMIT, T, end=T)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValidationError):
        rec(PERMIT, datetime(2025, 1, 1))


def test_masks_round_trip_every_class_set() -> None:
    classes = [
        "demographics",
        "encounters",
        "conditions",
        "laboratory",
        "medications",
        "procedures",
        "imaging",
    ]
    for n in range(1 << len(classes)):
        chosen = frozenset(c for i, c in enumerate(classes) if n >> i & 1)
        assert classes_of_mask(mask_of(chosen)) == chosen


def test_omop_tables_map_to_classes() -> None:
    assert classes_for_omop_tables(["measurement", "person"]) == {"laboratory", "demographics"}
    with pytest.raises(ValidationError):
        classes_for_omop_tables(["note"])
