"""Keys are unwrapped on the thread that opens the store, never on pyarrow's IO threads during a scan.

Why it matters: DuckDB asks pyarrow for a dataset's readers while holding the GIL; pyarrow opens the
files on its IO threads, and a key not cached there is unwrapped by our Python KMS client, which needs
the GIL: a deadlock (a data-plane job that never returned, seen twice at 200,000 patients). A deadlock
is a race and shows up rarely; where the unwraps happen is deterministic, so that is what is checked.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from healthspace.data.ingest import ingest_ndjson
from healthspace.data.keys import LocalKeyStore
from healthspace.data.schema import CDM_TABLES
from healthspace.data.store import ClinicalStore, _DataKeyKms
from tests.data import fhirgen as g


@pytest.fixture
def several_segments(store: ClinicalStore, tmp_path: Path) -> Path:
    # Three batches: every table has several encrypted files, so a scan opens them in parallel.
    for i in range(3):
        people = [g.patient(10 * i + n) for n in range(10)]
        conditions = [g.condition(10 * i + n) for n in range(10)]
        ingest_ndjson(store, [g.write_ndjson(tmp_path / f"b{i}.ndjson", [*people, *conditions])])
    assert len(store.segment_files("person")) == 3
    return store.path


@pytest.fixture
def unwrap_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    original = _DataKeyKms.unwrap_key

    def recording(self: _DataKeyKms, wrapped_key: str, master_key_identifier: str) -> bytes:
        seen.append(threading.get_ident())
        return original(self, wrapped_key, master_key_identifier)

    monkeypatch.setattr(_DataKeyKms, "unwrap_key", recording)
    return seen


def _scan_every_table(path: Path, keystore: LocalKeyStore, in_memory: bool) -> None:
    with ClinicalStore.open(path, keystore) as store:
        # Views decrypt the segments on every query; in memory, once while connecting (as the data
        # plane opens it): both scan through DuckDB.
        con = store.connect(in_memory=in_memory)
        for table in CDM_TABLES:
            con.execute(f"SELECT count(*) FROM {table}").fetchall()


@pytest.mark.parametrize("in_memory", [False, True], ids=["views", "in-memory"])
def test_scans_unwrap_no_key_off_the_opening_thread(
    several_segments: Path, keystore: LocalKeyStore, unwrap_threads: list[int], in_memory: bool
) -> None:
    _scan_every_table(several_segments, keystore, in_memory)
    assert unwrap_threads, "the store's keys were never unwrapped: the check saw nothing"
    assert set(unwrap_threads) == {threading.get_ident()}


# The control, run in a child process because it may hang: without the warm-up, a fresh store's
# first DuckDB scan unwraps its key on the opening thread in about a third of the runs, on a pyarrow IO
# thread in about half, and deadlocks in the rest (measured over tens of runs).
_WITHOUT_WARM_UP = """
import sys, threading
from pathlib import Path
from healthspace.data.keys import LocalKeyStore
from healthspace.data.schema import CDM_TABLES
from healthspace.data.store import ClinicalStore, _Crypto, _DataKeyKms
seen = []
original = _DataKeyKms.unwrap_key
def recording(self, wrapped, master):
    seen.append(threading.get_ident())
    return original(self, wrapped, master)
_DataKeyKms.unwrap_key = recording
_Crypto.warm = lambda self, paths: None
with ClinicalStore.open(Path(sys.argv[1]), LocalKeyStore(Path(sys.argv[2]))) as store:
    con = store.connect()
    for table in CDM_TABLES:
        con.execute(f"SELECT count(*) FROM {table}").fetchall()
print(sum(1 for t in seen if t != threading.get_ident()))
"""


def test_without_the_warm_up_a_scan_unwraps_off_the_opening_thread_or_hangs(
    several_segments: Path, tmp_path: Path
) -> None:
    # So that the test above can fail: its recording sees the unwraps on pyarrow's threads. Up to
    # eight fresh processes; all eight unwrapping on the opening thread has odds below 1 in 10,000.
    outcomes = []
    for _ in range(8):
        try:
            child = subprocess.run(
                [sys.executable, "-c", _WITHOUT_WARM_UP, str(several_segments), str(tmp_path / "keys")],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
        except subprocess.TimeoutExpired:
            outcomes.append("hung")  # the deadlock itself
            break
        off_thread = int(child.stdout.split()[-1])
        outcomes.append(f"{off_thread} off the opening thread")
        if off_thread:
            break
    assert outcomes[-1] == "hung" or not outcomes[-1].startswith("0 "), outcomes
