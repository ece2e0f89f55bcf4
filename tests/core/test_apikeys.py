"""Management API keys: stored hashed, one role each, revocable; unknown and revoked keys look alike."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import text

from healthspace.core.apikeys import ApiKeyStore, Role
from healthspace.core.db import Database
from healthspace.core.errors import AuthenticationError


@pytest.fixture
def store(make_db: Callable[..., Database]) -> ApiKeyStore:
    return ApiKeyStore(make_db("apikeys"))


def test_an_issued_key_authenticates_with_its_role(store: ApiKeyStore) -> None:
    issued = store.issue(Role.STEWARD, "ward 5 steward")
    assert store.authenticate(issued.secret).role is Role.STEWARD


def test_the_plaintext_is_never_stored(store: ApiKeyStore) -> None:
    issued = store.issue(Role.ADMIN, "admin")
    with store._db.session() as s:
        dumped = " ".join(str(v) for row in s.execute(text("SELECT * FROM api_keys")) for v in row)
    assert issued.secret not in dumped


@pytest.mark.parametrize("secret", [None, "", "hs_admin_nope"])
def test_missing_or_unknown_keys_are_refused(store: ApiKeyStore, secret: str | None) -> None:
    with pytest.raises(AuthenticationError):
        store.authenticate(secret)


def test_a_revoked_key_is_refused_like_an_unknown_one(store: ApiKeyStore) -> None:
    issued = store.issue(Role.RESEARCHER, "r")
    store.revoke(issued.key_id)
    with pytest.raises(AuthenticationError, match="not valid"):
        store.authenticate(issued.secret)
