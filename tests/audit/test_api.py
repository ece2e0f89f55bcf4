"""The audit HTTP routes on a loopback server, behind a guard, with problem JSON for bad input.

Real HTTP rather than starlette's httpx.Client, which warns about httpx (warnings are errors here).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Header

from healthspace.audit import merkle
from healthspace.audit.api import MAX_PAGE, make_router
from healthspace.audit.log import AuditLog
from healthspace.audit.models import AuditEntry, SignedTreeHead, parse_time
from healthspace.core.clock import FixedClock
from healthspace.core.db import Database
from healthspace.core.errors import ForbiddenError, install_problem_handlers
from tests.audit.conftest import KeySigner, make_entry
from tests.support.servers import serve


def _guard(x_role: str | None = Header(default=None)) -> None:
    if x_role != "regulator":
        raise ForbiddenError("regulators only")


@pytest.fixture
def api(sqlite_url: str, signer: KeySigner, clock: FixedClock) -> Iterator[tuple[httpx.Client, AuditLog]]:
    db = Database(sqlite_url, branches=["audit"])
    log = AuditLog(db, signer, clock)
    log.append_many([make_entry(i) for i in range(300)])
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(make_router(lambda: log, _guard))
    with serve(app) as url, httpx.Client(base_url=url, headers={"X-Role": "regulator"}) as client:
        yield client, log
    log.close()
    db.dispose()


def _head(body: dict[str, object]) -> SignedTreeHead:
    return SignedTreeHead(
        tree_size=int(str(body["tree_size"])),
        root_hash=str(body["root_hash"]),
        timestamp=parse_time(str(body["timestamp"])),
        key_id=str(body["key_id"]),
        signature=str(body["signature"]),
    )


def test_the_guard_refuses_callers_without_the_role(api: tuple[httpx.Client, AuditLog]) -> None:
    client, _ = api
    r = client.get("/audit/tree-head", headers={"X-Role": "researcher"})
    assert r.status_code == 403
    assert r.headers["content-type"].startswith("application/problem+json")


def test_tree_head_is_signed_by_the_published_key(
    api: tuple[httpx.Client, AuditLog], signer: KeySigner
) -> None:
    client, _ = api
    head = _head(client.get("/audit/tree-head").json())
    key = client.get("/audit/public-key").json()
    assert key["public_key"] == signer.public_key_b64
    assert head.tree_size == 300
    assert head.verify(key["public_key"])


def test_entries_are_paged_and_hash_to_their_leaf_hashes(api: tuple[httpx.Client, AuditLog]) -> None:
    client, _ = api
    body = client.get("/audit/entries", params={"start": 290, "stop": 400}).json()
    assert (body["start"], body["stop"], body["tree_size"]) == (290, 300, 300)
    assert [e["index"] for e in body["entries"]] == list(range(290, 300))
    first = body["entries"][0]
    assert AuditEntry.from_json(first["entry"]) == make_entry(290)
    assert first["leaf_hash"] == merkle.leaf_hash(make_entry(290).canonical_bytes()).hex()


def test_an_inclusion_proof_from_the_api_verifies_against_the_signed_head(
    api: tuple[httpx.Client, AuditLog],
) -> None:
    client, _ = api
    head = _head(client.get("/audit/tree-head").json())
    p = client.get("/audit/proofs/inclusion", params={"index": 257, "tree_size": 300}).json()
    leaf = merkle.leaf_hash(make_entry(257).canonical_bytes())
    assert merkle.verify_inclusion(leaf, 257, 300, [bytes.fromhex(h) for h in p["audit_path"]], head.root)


def test_a_consistency_proof_from_the_api_links_two_signed_heads(api: tuple[httpx.Client, AuditLog]) -> None:
    client, log = api
    old = _head(client.get("/audit/tree-head").json())
    log.append_many([make_entry(i) for i in range(300, 333)])
    new = _head(client.get("/audit/tree-head").json())
    p = client.get("/audit/proofs/consistency", params={"first": 300, "second": 333}).json()
    path = [bytes.fromhex(h) for h in p["consistency"]]
    assert merkle.verify_consistency(300, 333, old.root, new.root, path)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/audit/entries", {"start": -1}),
        ("/audit/entries", {"start": 10, "stop": 5}),
        ("/audit/entries", {"start": 0, "stop": MAX_PAGE + 1}),
        ("/audit/entries", {"start": "x"}),
        ("/audit/proofs/inclusion", {"index": 300}),
        ("/audit/proofs/inclusion", {"index": 1, "tree_size": 301}),
        ("/audit/proofs/inclusion", {}),
        ("/audit/proofs/consistency", {"first": 0, "second": 5}),
        ("/audit/proofs/consistency", {"first": 6, "second": 5}),
        ("/audit/proofs/consistency", {"first": 1, "second": 10**30}),
    ],
)
def test_bad_parameters_get_a_422_problem_never_a_500(
    api: tuple[httpx.Client, AuditLog], path: str, params: dict[str, object]
) -> None:
    client, _ = api
    r = client.get(path, params=params)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
