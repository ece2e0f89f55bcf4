"""FHIR Bundles: transaction, batch and collection; references between entries; refused entries and types."""

from __future__ import annotations

from typing import Any

import pytest

from healthspace.core.errors import ValidationError
from healthspace.data import quarantine
from healthspace.data.ingest import ingest_bundle, person_id_for
from healthspace.data.store import ClinicalStore
from tests.data import fhirgen as g


def _transaction(kind: str = "transaction") -> dict[str, Any]:
    pat = g.patient(1)
    del pat["id"]  # a transaction POST names its resources by fullUrl only
    cond = g.condition(1, subject={"reference": "urn:uuid:aaaa-1"})
    del cond["encounter"]
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"fullUrl": "urn:uuid:aaaa-1", "resource": pat, "request": {"method": "POST", "url": "Patient"}},
            {
                "fullUrl": "urn:uuid:bbbb-2",
                "resource": cond,
                "request": {"method": "POST", "url": "Condition"},
            },
        ],
    }


def test_transaction_resolves_urn_uuid_references(store: ClinicalStore) -> None:
    r = ingest_bundle(store, _transaction())
    rows = store.connect().execute("SELECT person_id FROM condition_occurrence").fetchall()
    assert r.inserted == {"person": 1, "condition_occurrence": 1}
    assert rows == [(person_id_for("aaaa-1"),)]


def test_batch_bundle_is_ingested(store: ClinicalStore) -> None:
    assert ingest_bundle(store, _transaction("batch")).inserted == {"person": 1, "condition_occurrence": 1}


def test_collection_bundle_is_ingested(store: ClinicalStore) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": g.patient(2)}, {"resource": g.encounter(2, 0)}]}  # fmt: skip
    assert ingest_bundle(store, bundle).inserted == {"person": 1, "visit_occurrence": 1}


def test_bundle_given_as_bytes_is_ingested_once(store: ClinicalStore) -> None:
    import orjson

    raw = orjson.dumps(_transaction())
    first, second = ingest_bundle(store, raw), ingest_bundle(store, raw)
    assert (first.accepted, second.already_ingested, store.row_counts()["person"]) == (2, True, 1)


def test_delete_entry_is_quarantined_with_its_entry_number(store: ClinicalStore) -> None:
    bundle = _transaction()
    bundle["entry"].append({"request": {"method": "DELETE", "url": "Patient/9"}, "resource": g.patient(9)})
    r = ingest_bundle(store, bundle)
    (entry,) = quarantine.list_entries(store)
    assert (r.rules, entry.line) == ({"bundle.method": 1}, 3)


def test_invalid_entry_is_quarantined_and_the_rest_ingested(store: ClinicalStore) -> None:
    bad = g.patient(3, gender="unknown-gender")
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": g.patient(2)}, {"resource": bad}],
    }
    r = ingest_bundle(store, bundle)
    assert (r.inserted, r.rules) == ({"person": 1}, {"valueset.not_member": 1})


@pytest.mark.parametrize(
    "doc",
    [
        {"resourceType": "Bundle", "type": "searchset", "entry": []},
        {"resourceType": "Patient", "id": "x"},
        b"{not json",
    ],
)
def test_unsupported_or_invalid_bundle_is_refused(store: ClinicalStore, doc: Any) -> None:
    with pytest.raises(ValidationError):
        ingest_bundle(store, doc)
