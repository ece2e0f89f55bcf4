"""The data plane's verified-token cache: repeated uses skip decoding, never the expiry or the key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest

from healthspace.connector.dsp import dataplane as tokens
from healthspace.connector.dsp.dataplane import mint_access_token, verify_access_token
from healthspace.core.errors import AuthenticationError
from healthspace.identity.keys import SigningKey

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _token(key: SigningKey, ttl: timedelta = timedelta(minutes=10)) -> str:
    return mint_access_token(key, "gz-hospital", "hk-university", "agr-1", "tr-1", NOW, ttl)


def test_a_token_is_decoded_once_then_read_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    key = SigningKey.generate()
    token = _token(key)
    calls = []
    real = jwt.decode
    monkeypatch.setattr(tokens.jwt, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = verify_access_token(key, "gz-hospital", token, NOW)
    again = [verify_access_token(key, "gz-hospital", token, NOW + timedelta(seconds=i)) for i in range(5)]
    assert len(calls) == 1
    assert all(g == first for g in again)
    assert (first.consumer, first.agreement_id, first.transfer_id) == ("hk-university", "agr-1", "tr-1")
    assert first.expires_at == NOW + timedelta(minutes=10)


def test_a_cached_token_still_expires() -> None:
    key = SigningKey.generate()
    token = _token(key, timedelta(seconds=30))
    verify_access_token(key, "gz-hospital", token, NOW)
    with pytest.raises(AuthenticationError) as exc:
        verify_access_token(key, "gz-hospital", token, NOW + timedelta(seconds=30))
    assert exc.value.extra["reason"] == "token-expired"


def test_a_cached_token_is_not_valid_under_another_key_or_provider() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    token = _token(key)
    verify_access_token(key, "gz-hospital", token, NOW)
    for k, provider in ((other, "gz-hospital"), (key, "sz-hospital")):
        with pytest.raises(AuthenticationError) as exc:
            verify_access_token(k, provider, token, NOW)
        assert exc.value.extra["reason"] == "token-invalid"


def test_a_tampered_token_is_refused_after_the_genuine_one_was_cached() -> None:
    key = SigningKey.generate()
    token = _token(key)
    verify_access_token(key, "gz-hospital", token, NOW)
    head, body, sig = token.split(".")
    forged = ".".join((head, body, sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")))
    with pytest.raises(AuthenticationError):
        verify_access_token(key, "gz-hospital", forged, NOW)


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_VERIFIED_MAX", 3)
    monkeypatch.setattr(tokens, "_VERIFIED", {})
    key = SigningKey.generate()
    for i in range(10):
        verify_access_token(key, "gz-hospital", _token(key), NOW + timedelta(seconds=i))
    assert len(tokens._VERIFIED) == 3
