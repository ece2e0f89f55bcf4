"""Signed cross-border documents and the connector's cache of them: forgery refused, failures closed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from healthspace.core.clock import FixedClock
from healthspace.identity.keys import SigningKey
from healthspace.policy import DEFAULT_RULES, ExportApproval
from healthspace.policy.registry import (
    CrossBorderCache,
    CrossBorderSet,
    CrossBorderUnavailableError,
    InvalidCrossBorderDocumentError,
    rules_from_json,
    rules_to_json,
    sign_approvals,
    sign_rules,
    verify_approvals,
    verify_rules,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)
KEY = SigningKey.generate()
APPROVAL = ExportApproval("CAC-1", "ds", "hku", "sc", T0 + timedelta(days=30))


def test_rules_round_trip_through_json() -> None:
    assert rules_from_json(rules_to_json(DEFAULT_RULES)) == dict(DEFAULT_RULES)


def test_an_unknown_treatment_is_refused_not_skipped() -> None:
    doc = rules_to_json(DEFAULT_RULES)
    doc["HK"]["abroad"]["aggregate"] = "maybe"
    with pytest.raises(InvalidCrossBorderDocumentError, match="unknown treatment"):
        rules_from_json(doc)


def test_signed_rules_verify_with_the_authority_key() -> None:
    issued, rules = verify_rules(sign_rules(KEY, "auth", T0, DEFAULT_RULES), KEY.public_key_b64, "auth")
    assert (issued, rules) == (T0, dict(DEFAULT_RULES))


def test_rules_signed_by_another_key_are_refused() -> None:
    token = sign_rules(SigningKey.generate(), "auth", T0, DEFAULT_RULES)
    with pytest.raises(InvalidCrossBorderDocumentError):
        verify_rules(token, KEY.public_key_b64, "auth")


def test_an_approval_list_is_not_accepted_as_a_rule_set() -> None:
    token = sign_approvals(KEY, "auth", T0, "gz", [APPROVAL])
    with pytest.raises(InvalidCrossBorderDocumentError, match="not a rules document"):
        verify_rules(token, KEY.public_key_b64, "auth")


def test_approvals_round_trip_for_their_provider_only() -> None:
    token = sign_approvals(KEY, "auth", T0, "gz", [APPROVAL])
    assert verify_approvals(token, KEY.public_key_b64, "auth", "gz")[1] == [APPROVAL]
    with pytest.raises(InvalidCrossBorderDocumentError, match="another provider"):
        verify_approvals(token, KEY.public_key_b64, "auth", "mo")


def _set(at: datetime) -> CrossBorderSet:
    return CrossBorderSet(DEFAULT_RULES, (APPROVAL,), at)


def test_the_cache_fails_closed_when_nothing_was_ever_fetched() -> None:
    def down() -> CrossBorderSet:
        raise OSError("authority unreachable")

    with pytest.raises(CrossBorderUnavailableError):
        CrossBorderCache(down, clock=FixedClock(T0)).current()


def test_the_cache_keeps_a_recent_set_through_an_outage_then_fails_closed() -> None:
    clock = FixedClock(T0)
    up = [True]

    def fetch() -> CrossBorderSet:
        if not up[0]:
            raise OSError("authority unreachable")
        return _set(clock.now())

    cache = CrossBorderCache(fetch, clock=clock, max_age=timedelta(0), hard_limit=timedelta(minutes=10))
    cache.current()
    up[0] = False
    clock.advance(timedelta(minutes=5))
    assert cache.current().issued_at == T0
    clock.advance(timedelta(minutes=6))
    with pytest.raises(CrossBorderUnavailableError, match="out of date"):
        cache.current()


def test_the_cache_refuses_a_set_older_than_the_one_held() -> None:
    clock = FixedClock(T0)
    answers = [_set(T0), _set(T0 - timedelta(minutes=1))]
    cache = CrossBorderCache(lambda: answers.pop(0), clock=clock, max_age=timedelta(0))
    cache.current()
    assert cache.current().issued_at == T0
