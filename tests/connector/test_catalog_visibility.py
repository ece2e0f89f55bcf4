"""Catalog time: a consumer sees only the offers it could be granted, and the decision is audited."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from healthspace.core.apikeys import Role
from tests.support.space import Space, running_space

GZ, HKU, GDU = "gz-hospital", "hk-university", "gd-university"
PURPOSE = {"leftOperand": "purpose", "operator": "eq", "rightOperand": "diabetes-outcomes-research"}


def _offer(uid: str, *extra: dict[str, Any]) -> dict[str, Any]:
    return {"@id": uid, "permission": [{"action": "use", "constraint": [PURPOSE, *extra]}]}


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Space]:
    participants = {
        GZ: ("Guangzhou Test Hospital", "hospital", "CN-GD", ["data-provider"]),
        HKU: ("Hong Kong Test University", "university", "HK", ["data-consumer"]),
        GDU: ("Guangdong Test University", "university", "CN-GD", ["data-consumer"]),
    }
    with running_space(tmp_path_factory.mktemp("space"), participants) as s:
        node = s.connectors[GZ]
        with httpx.Client(base_url=node.url, headers={"X-API-Key": node.keys[Role.STEWARD]}) as steward:
            for dataset_id, offer in [
                ("urn:ds:open", _offer("urn:offer:open")),
                (
                    "urn:ds:gd-only",
                    _offer(
                        "urn:offer:gd",
                        {"leftOperand": "jurisdiction", "operator": "isAnyOf", "rightOperand": ["CN-GD"]},
                    ),
                ),
            ]:
                r = steward.post(
                    "/management/datasets", json={"id": dataset_id, "title": dataset_id, "offer": offer}
                )
                assert r.status_code == 201, r.text
        yield s


def _browse(space: Space, consumer: str) -> set[str]:
    node = space.connectors[consumer]
    with httpx.Client(base_url=node.url, headers={"X-API-Key": node.keys[Role.RESEARCHER]}, timeout=30) as c:
        r = c.post("/management/catalog/query", json={"url": space.connectors[GZ].url})
    assert r.status_code == 200, r.text
    return {d["@id"] for d in r.json().get("dataset", [])}


def test_an_offer_limited_to_a_jurisdiction_is_listed_only_to_consumers_there(space: Space) -> None:
    assert _browse(space, GDU) == {"urn:ds:open", "urn:ds:gd-only"}
    assert _browse(space, HKU) == {"urn:ds:open"}


def test_catalog_decisions_are_audited_with_reasons(space: Space) -> None:
    _browse(space, HKU)
    node = space.connectors[GZ]
    with httpx.Client(base_url=node.url, headers={"X-API-Key": node.keys[Role.REGULATOR]}) as c:
        size = c.get("/audit/tree-head").json()["tree_size"]
        entries = [
            e["entry"] for e in c.get("/audit/entries", params={"start": 0, "stop": size}).json()["entries"]
        ]
    denied = [
        e
        for e in entries
        if e["action"] == "policy.decision"
        and e["details"].get("phase") == "catalog"
        and e["outcome"] == "denied"
        and e["actor"] == HKU
    ]
    assert denied
    assert denied[-1]["subject"] == "urn:ds:gd-only"
    assert "jurisdiction" in denied[-1]["reason"]
