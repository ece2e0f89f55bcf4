"""The data plane's view of the clinical store follows its commits: new rows appear, erased rows go."""

from __future__ import annotations

from pathlib import Path

import pytest

from healthspace.connector.dataplane.store import lazy_store_connection
from healthspace.data.ingest import ingest_ndjson
from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import CDM_TABLES, ClinicalStore, StoreNotFoundError
from tests.data import fhirgen as g


def _persons(connect: object) -> int:
    con = connect()  # type: ignore[operator]
    return int(con.execute("SELECT count(*) FROM person").fetchone()[0])


def test_a_job_after_an_ingestion_sees_the_new_rows(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    store = ClinicalStore.create(tmp_path / "store", "test-dataset", LocalKeyStore(keys))
    try:
        ingest_ndjson(store, [g.write_ndjson(tmp_path / "a.ndjson", g.population(5))])
        connect = lazy_store_connection(tmp_path / "store", keys)
        first = connect()
        assert _persons(connect) == 5
        assert connect() is first  # nothing committed since: the same connection, no reopening

        more = [r for r in g.population(12) if r["resourceType"] == "Patient"][5:]
        ingest_ndjson(store, [g.write_ndjson(tmp_path / "b.ndjson", more)])
        assert _persons(connect) == 12
        assert connect() is not first
    finally:
        store.close()


def test_no_store_yet_is_the_data_package_s_error_on_the_job_until_one_is_created(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    connect = lazy_store_connection(tmp_path / "store", keys)
    with pytest.raises(StoreNotFoundError):
        connect()
    store = ClinicalStore.create(tmp_path / "store", "test-dataset", LocalKeyStore(keys))
    try:
        ingest_ndjson(store, [g.write_ndjson(tmp_path / "a.ndjson", g.population(3))])
        assert _persons(connect) == 3
    finally:
        store.close()


def test_the_data_plane_reads_decrypted_tables_in_memory_equal_to_the_encrypted_views(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    store = ClinicalStore.create(tmp_path / "store", "test-dataset", LocalKeyStore(keys))
    try:
        ingest_ndjson(store, [g.write_ndjson(tmp_path / "a.ndjson", g.population(8))])
        con = lazy_store_connection(tmp_path / "store", keys)()
        kinds = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
        assert kinds["condition_occurrence"] == "BASE TABLE"  # in DuckDB's memory, not a view over files
        views = store.connect()  # the default: views that decrypt on every scan
        for table in [*CDM_TABLES, "quarantine"]:
            # Row hashes summed in DuckDB (fetching zoned timestamps into Python needs pytz).
            q = f"SELECT count(*), sum(hash(r)) FROM {table} r"
            assert con.execute(q).fetchall() == views.execute(q).fetchall(), table
        # A commit through the same store instance refreshes its in-memory tables too.
        mem = ClinicalStore.open(tmp_path / "store", LocalKeyStore(keys))
        try:
            before = mem.connect(in_memory=True).execute("SELECT count(*) FROM person").fetchone()
            more = [r for r in g.population(10) if r["resourceType"] == "Patient"][8:]
            ingest_ndjson(mem, [g.write_ndjson(tmp_path / "b.ndjson", more)])
            after = mem.connect().execute("SELECT count(*) FROM person").fetchone()
            assert (before, after) == ((8,), (10,))
        finally:
            mem.close()
    finally:
        store.close()
