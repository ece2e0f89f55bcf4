"""Opening the connector's clinical store for the data plane: on the first job, again after each commit."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import duckdb

from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore

__all__ = ["lazy_store_connection"]


def _manifest_identity(path: Path) -> tuple[int, int, int] | None:
    """What changes when a commit replaces the store's manifest (it is written anew and renamed)."""
    try:
        st = os.stat(path / "manifest.json")
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def lazy_store_connection(path: Path, keys_dir: Path) -> Callable[[], duckdb.DuckDBPyConnection]:
    """A `connect` callable for `JobService`: opens the encrypted store on first use, then reuses it
    for as long as no commit (an ingestion, an erasure, a destruction) has replaced its manifest.

    The store is decrypted once into DuckDB's memory (`ClinicalStore.connect(in_memory=True)`), so a
    job scans columnar memory instead of decrypting Parquet. A job must see what the store holds now:
    rows ingested since the last job, and none that were erased or destroyed. One `stat` per job
    tells; a changed manifest reopens the store (the stat is taken before opening, so a commit landing
    in between is seen by the next job). A missing store or key raises the data package's typed error
    on that job (not at start-up), so a connector without clinical data still serves everything else.
    """
    lock = threading.Lock()
    opened: list[tuple[tuple[int, int, int] | None, ClinicalStore]] = []

    def connect() -> duckdb.DuckDBPyConnection:
        with lock:
            seen = _manifest_identity(path)
            if opened and opened[0][0] != seen:
                # Not closed here: a GLM session may still hold the old connection's results; the
                # old store goes when the last reference does.
                opened.clear()
            if not opened:
                opened.append((seen, ClinicalStore.open(path, LocalKeyStore(keys_dir))))
            return opened[0][1].connect(in_memory=True)

    return connect
