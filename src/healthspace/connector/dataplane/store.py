"""Opening the connector's clinical store for the data plane: once, on the first job."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import duckdb

from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore

__all__ = ["lazy_store_connection"]


def lazy_store_connection(path: Path, keys_dir: Path) -> Callable[[], duckdb.DuckDBPyConnection]:
    """A `connect` callable for `JobService`: opens the encrypted store on first use, then reuses it.

    A missing store or key raises the data package's typed error on that job (not at start-up), so a
    connector without clinical data still serves everything else.
    """
    lock = threading.Lock()
    opened: list[ClinicalStore] = []

    def connect() -> duckdb.DuckDBPyConnection:
        with lock:
            if not opened:
                opened.append(ClinicalStore.open(path, LocalKeyStore(keys_dir)))
            return opened[0].connect()

    return connect
