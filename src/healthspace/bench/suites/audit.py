"""Audit log throughput: durable single appends, batched appends and full verification, with baselines.

Baselines run in the same process on the same rows: plain sqlite3 doing what the log must do at the
least (one durable commit per row; executemany into a plain table) and raw hashlib over the same leaf
bytes, so the ratios say how close the log comes to the physical limits of this machine.
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from healthspace.audit.log import AuditLog
from healthspace.audit.models import AuditEntry, Outcome, b64encode
from healthspace.bench.harness import Figure, rate
from healthspace.core.db import Database

__all__ = ["run"]

_T0 = datetime(2025, 3, 1, tzinfo=UTC)


class _Signer:
    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.key_id = "bench"
        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key_b64 = b64encode(raw)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def _entries(n: int) -> list[AuditEntry]:
    """Entries shaped like the connector's (about 330 bytes each when encoded)."""
    return [
        AuditEntry(
            time=_T0 + timedelta(milliseconds=i),
            actor=f"participant:hospital-gz/steward-{i % 40}",
            action="dataplane.job.run",
            subject=f"job:urn:uuid:{i:032x}",
            outcome=Outcome.ALLOWED,
            reason="policy permitted: purpose, count and budget within the agreement",
            scenario_id="diabetes-outcomes-research",
            agreement_id=f"urn:uuid:{i * 7:032x}",
            details={"cells_suppressed": i % 5},
        )
        for i in range(n)
    ]


def _raw_table(path: Path, full: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (seq INTEGER PRIMARY KEY, data TEXT NOT NULL, leaf_hash BLOB)")
    return conn


def _fresh_log(root: Path, name: str) -> tuple[Database, AuditLog]:
    db = Database(f"sqlite:///{(root / name).as_posix()}", branches=["audit"])
    return db, AuditLog(db, _Signer())


def run(quick: bool) -> list[Figure]:
    n_single = 300 if quick else 3000
    n_batch = 5_000 if quick else 100_000
    n_verify = 20_000 if quick else 300_000
    repeat = 1 if quick else 3
    figures: list[Figure] = []
    entries = _entries(max(n_batch, n_verify))
    datas = [e.canonical_bytes() for e in entries]
    rows = [(i, d.decode(), hashlib.sha256(b"\x00" + d).digest()) for i, d in enumerate(datas)]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        counter = iter(range(1_000_000))

        # -- one durable commit per entry --
        def raw_single() -> None:
            conn = _raw_table(root / f"raw{next(counter)}.db", full=True)
            for r in rows[:n_single]:
                conn.execute("BEGIN")
                conn.execute("INSERT INTO t VALUES (?, ?, ?)", r)
                conn.execute("COMMIT")
            conn.close()

        def log_single() -> None:
            db, log = _fresh_log(root, f"single{next(counter)}.db")
            for e in entries[:n_single]:
                log.append(e)
            log.close()
            db.dispose()

        def log_concurrent(threads: int) -> Callable[[], None]:
            def go() -> None:
                db, log = _fresh_log(root, f"conc{next(counter)}.db")
                per = n_single // threads

                def work(k: int) -> None:
                    for e in entries[k * per : (k + 1) * per]:
                        log.append(e)

                ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                log.close()
                db.dispose()

            return go

        raw_single_rate = rate(raw_single, n_single, repeat=repeat)
        figures.append(
            Figure(
                name="audit.append.single_durable",
                unit="entries/s",
                samples=rate(log_single, n_single, repeat=repeat),
                baseline_name="sqlite3 one-row durable commits (WAL, synchronous=FULL)",
                baseline_samples=raw_single_rate,
                target=5000,
                note="one thread, append() returns after its own fsync'd commit; bounded by fsync latency",
            )
        )
        figures.append(
            Figure(
                name="audit.append.concurrent_durable_8_threads",
                unit="entries/s",
                samples=rate(log_concurrent(8), n_single, repeat=repeat),
                baseline_name="sqlite3 one-row durable commits (WAL, synchronous=FULL)",
                baseline_samples=raw_single_rate,
                target=5000,
                note="8 threads calling append(); group commit shares each fsync among waiting callers",
            )
        )

        # -- batched --
        def raw_batched() -> None:
            conn = _raw_table(root / f"rawb{next(counter)}.db", full=True)
            for k in range(0, n_batch, 1000):
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO t VALUES (?, ?, ?)", rows[k : k + 1000])
                conn.execute("COMMIT")
            conn.close()

        def log_batched() -> None:
            db, log = _fresh_log(root, f"batch{next(counter)}.db")
            for k in range(0, n_batch, 1000):
                log.append_many(entries[k : k + 1000])
            log.close()
            db.dispose()

        figures.append(
            Figure(
                name="audit.append.batched_1000",
                unit="entries/s",
                samples=rate(log_batched, n_batch, repeat=repeat),
                baseline_name="sqlite3 executemany of the same rows, 1000 per durable commit",
                baseline_samples=rate(raw_batched, n_batch, repeat=repeat),
                target=20000,
                note="append_many of 1000 entries per call, including encoding and leaf hashing",
            )
        )

        # -- verification --
        db, log = _fresh_log(root, "verify.db")
        for k in range(0, n_verify, 10_000):
            log.append_many(entries[k : min(k + 10_000, n_verify)])
        log.tree_head()
        leaf_datas = datas[:n_verify]

        def raw_hash() -> None:
            sha = hashlib.sha256
            for d in leaf_datas:
                sha(b"\x00" + d).digest()

        def verify() -> None:
            if not log.verify().ok:
                raise RuntimeError("benchmark log does not verify")

        mean_len = sum(map(len, leaf_datas)) / len(leaf_datas)
        figures.append(
            Figure(
                name="audit.verify.full",
                unit="entries/s",
                samples=rate(verify, n_verify, repeat=repeat),
                baseline_name="hashlib SHA-256 over the same leaf bytes (leaf hashes only)",
                baseline_samples=rate(raw_hash, n_verify, repeat=repeat),
                target=500_000,
                note=f"{n_verify} entries of {mean_len:.0f} bytes: fetch, recompute leaves, rebuild tree, "
                f"check heads and signatures",
            )
        )
        log.close()
        db.dispose()
    return figures
