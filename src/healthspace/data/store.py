"""The encrypted, OMOP-style clinical store: a directory of encrypted Parquet segments and a signed manifest.

Layout of a store directory::

    manifest.json               dataset id, wrapped data key, committed segments, batches, HMAC over all
    segments/<batch>/<t>-N.parquet   Parquet with modular encryption (AES-GCM), footer encrypted too
    .lock                       one writer at a time (flock)

Every Parquet file gets its own data-encryption key, wrapped by the dataset's data key, which is itself
wrapped by a key-encryption key held in a `KeyStore`. The manifest is the commit point: a batch's segments
are written first and become visible only when the manifest that lists them replaces the old one
(`os.replace`), so a batch that dies half-way leaves the store exactly as it was.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pqe
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from healthspace.core.clock import utcnow
from healthspace.core.errors import ConflictError, ValidationError
from healthspace.data.errors import StoreBusyError, StoreCorruptError, StoreNotFoundError, WrongKeyError
from healthspace.data.keys import KeyStore, new_data_key
from healthspace.data.schema import CDM_TABLES, arrow_schema

__all__ = ["QUARANTINE_SCHEMA", "BatchWriter", "ClinicalStore", "Rewriter"]

FORMAT = "healthspace-clinical-store/1"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("quarantine_id", pa.string(), nullable=False),
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("resource_type", pa.string()),
        pa.field("resource_id", pa.string()),
        pa.field("rules", pa.list_(pa.string())),
        pa.field("reason", pa.string()),
        pa.field("raw", pa.binary()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


class _DataKeyKms(pqe.KmsClient):  # type: ignore[misc]
    """Wraps each Parquet file's keys with the dataset data key (AES-256-GCM, key id as AAD)."""

    def __init__(self, data_key: bytes) -> None:
        super().__init__()
        self._aead = AESGCM(data_key)

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, key_bytes, master_key_identifier.encode())
        return base64.b64encode(nonce + sealed).decode()

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        raw = base64.b64decode(wrapped_key)
        try:
            return self._aead.decrypt(raw[:12], raw[12:], master_key_identifier.encode())
        except InvalidTag:
            raise WrongKeyError("a segment was not encrypted under this dataset's key") from None


# pyarrow's caches of KMS clients and unwrapped key-encryption keys must not expire while a store is
# open: see `_Crypto.warm`.
_KEY_CACHE_LIFETIME = timedelta(days=3650)


class _Crypto:
    def __init__(self, dataset_id: str, data_key: bytes) -> None:
        self._factory = pqe.CryptoFactory(lambda _cfg: _DataKeyKms(data_key))
        # The instance id keeps pyarrow's key caches of two open datasets apart.
        self._kms = pqe.KmsConnectionConfig(kms_instance_id=f"healthspace:{dataset_id}")
        self._enc = pqe.EncryptionConfiguration(
            footer_key=f"dataset:{dataset_id}",
            uniform_encryption=True,
            plaintext_footer=False,
            double_wrapping=True,
            internal_key_material=True,
        )
        self._dec = pqe.DecryptionConfiguration(cache_lifetime=_KEY_CACHE_LIFETIME)
        decryption = pads.ParquetDecryptionConfig(self._factory, self._kms, self._dec)
        self.read_format = pads.ParquetFileFormat(
            default_fragment_scan_options=pads.ParquetFragmentScanOptions(decryption_config=decryption)
        )
        self._warmed: set[str] = set()

    def warm(self, paths: Iterable[Path]) -> None:
        """Open each file's footer now, on the calling thread, so its keys are in pyarrow's cache.

        Why: DuckDB scanning a pyarrow dataset asks pyarrow for a reader while holding the GIL, and
        pyarrow opens the files on its IO threads; a key not yet cached is unwrapped there by our
        Python KMS client, which needs the GIL: a deadlock (seen as a data-plane job that never
        returned, its connector frozen). With every file's key-encryption key cached, and the cache
        not expiring while the store is open, no scan calls into Python.
        """
        for p in paths:
            if str(p) in self._warmed:
                continue
            props = self._factory.file_decryption_properties(self._kms, self._dec)
            with pq.ParquetFile(p, decryption_properties=props):
                pass  # opening reads and decrypts the footer: the keys are now cached
            self._warmed.add(str(p))

    def write(self, table: pa.Table, path: Path) -> None:
        props = self._factory.file_encryption_properties(self._kms, self._enc)
        pq.write_table(table, path, encryption_properties=props, compression="zstd")

    def writer(self, path: Path, schema: pa.Schema) -> pq.ParquetWriter:
        """A streaming writer of one encrypted file (bounded memory for whole-table copies)."""
        props = self._factory.file_encryption_properties(self._kms, self._enc)
        return pq.ParquetWriter(path, schema, encryption_properties=props, compression="zstd")


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


@dataclass
class _Manifest:
    doc: dict[str, Any]

    @property
    def tables(self) -> dict[str, list[str]]:
        return self.doc["tables"]  # type: ignore[no-any-return]


class ClinicalStore:
    """One dataset's clinical data. Create with `create`, open with `open`; close when done.

    Contract: opening MUST fail with `KeyUnavailableError` when the key store lacks the dataset's KEK, with
    `WrongKeyError` when the KEK does not unwrap the data key, and with `StoreCorruptError` when the manifest
    was altered. Readers see only committed batches.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], data_key: bytes) -> None:
        self.path = path
        self._m = _Manifest(manifest)
        self._key = data_key
        self._mac_key = hmac.new(data_key, b"healthspace manifest mac", hashlib.sha256).digest()
        self._crypto = _Crypto(self.dataset_id, data_key)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._in_memory = False

    # --- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: Path, dataset_id: str, keystore: KeyStore, *, key_id: str | None = None
    ) -> ClinicalStore:
        """Create an empty store at `path` (must not hold one yet) with a fresh data key."""
        if not _ID.match(dataset_id):
            raise ValidationError(f"invalid dataset id {dataset_id!r}")
        path = Path(path)
        if (path / "manifest.json").exists():
            raise ConflictError(f"a clinical store already exists at {path.name}")
        path.mkdir(parents=True, exist_ok=True)
        key_id = key_id or f"hs-data-{dataset_id}"
        data_key = new_data_key()
        wrapped = keystore.wrap(key_id, data_key)
        doc: dict[str, Any] = {
            "format": FORMAT,
            "dataset_id": dataset_id,
            "key_id": key_id,
            "wrapped_key": base64.b64encode(wrapped).decode(),
            "created_at": utcnow().isoformat(),
            "tables": {t: [] for t in CDM_TABLES},
            "quarantine": [],
            "resolved": {},
            "batches": [],
            "revision": 0,
        }
        store = cls(path, doc, data_key)
        store._save(doc)
        return store

    @classmethod
    def open(cls, path: Path, keystore: KeyStore) -> ClinicalStore:
        """Open an existing store; see the class contract for the errors."""
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise StoreNotFoundError(f"no clinical store at {path.name}")
        try:
            doc = orjson.loads(mpath.read_bytes())
            if doc.get("format") != FORMAT:
                raise StoreCorruptError(f"unknown store format {doc.get('format')!r}")
            wrapped = base64.b64decode(doc["wrapped_key"])
            key_id = str(doc["key_id"])
            dataset_id = str(doc["dataset_id"])
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            raise StoreCorruptError(f"manifest unreadable: {type(exc).__name__}") from None
        data_key = keystore.unwrap(key_id, wrapped)
        store = cls(path, doc, data_key)
        if not hmac.compare_digest(str(doc.get("mac", "")), store._mac(doc)):
            raise StoreCorruptError(f"manifest of dataset {dataset_id!r} fails its integrity check")
        return store

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> ClinicalStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- properties --------------------------------------------------------------------------------

    @property
    def dataset_id(self) -> str:
        return str(self._m.doc["dataset_id"])

    @property
    def key_id(self) -> str:
        return str(self._m.doc["key_id"])

    @property
    def batches(self) -> list[dict[str, Any]]:
        """Committed batches, oldest first (id, content MAC, time, counts)."""
        return list(self._m.doc["batches"])

    @property
    def resolved(self) -> dict[str, dict[str, str]]:
        """Quarantine ids that were fixed and re-submitted, with the batch that accepted them."""
        return dict(self._m.doc["resolved"])

    def content_mac(self, digest: bytes) -> str:
        """Keyed fingerprint of a batch's content, so the manifest does not reveal plain hashes of data."""
        return hmac.new(self._mac_key, digest, hashlib.sha256).hexdigest()

    # --- reading -----------------------------------------------------------------------------------

    def dataset(self, table: str) -> pads.Dataset | pa.Table:
        """The committed rows of `table` (lazy, decrypted while scanned)."""
        if table == "quarantine":
            files, schema = self._m.doc["quarantine"], QUARANTINE_SCHEMA
        else:
            files, schema = self._m.tables[table], arrow_schema(table)
        if not files:
            return schema.empty_table()
        return pads.dataset(
            [str(self.path / f) for f in files], schema=schema, format=self._crypto.read_format
        )

    def connect(self, *, in_memory: bool = False) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection whose tables are the committed tables (and `quarantine`). Read-only use.

        By default each table is a view that decrypts the segments on every scan. With `in_memory`, the
        committed rows are decrypted once into DuckDB's own in-memory tables (what the data plane
        wants: every job then scans columnar memory, not encrypted Parquet); memory grows with the
        store, and a store that does not fit falls back to views. Either way nothing decrypted is
        ever spilled to disk. The first call decides; later calls return the same connection.
        """
        if self._con is None:
            con = duckdb.connect(":memory:")
            # Decrypted data must never be spilled to disk in clear.
            con.execute("SET temp_directory = ''")
            self._con = con
            self._in_memory = in_memory
            self._register(con)
        return self._con

    def _register(self, con: duckdb.DuckDBPyConnection) -> None:
        tables = [*CDM_TABLES, "quarantine"]
        self._crypto.warm(self.path / f for t in tables for f in self.segment_files(t))
        if self._in_memory:
            try:
                for t in tables:
                    con.register("hs_segments", self.dataset(t))
                    con.execute(f"CREATE OR REPLACE TABLE {t} AS SELECT * FROM hs_segments")  # noqa: S608
                    con.unregister("hs_segments")
                return
            except duckdb.OutOfMemoryException:
                self._in_memory = False  # too big for memory: scan the encrypted segments instead
                con.unregister("hs_segments")
                for t in tables:
                    con.execute(f"DROP TABLE IF EXISTS {t}")
        for t in tables:
            con.register(t, self.dataset(t))

    def row_counts(self) -> dict[str, int]:
        con = self.connect()
        return {t: int(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in CDM_TABLES}  # type: ignore[index]  # noqa: S608

    def scan_files(self) -> list[Path]:
        """Every committed file (for the at-rest check and for lifecycle operations)."""
        files = [f for fs in self._m.tables.values() for f in fs] + list(self._m.doc["quarantine"])
        return [self.path / f for f in files]

    # --- writing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the writer lock (and see the newest committed manifest) for the block."""
        lock = (self.path / ".lock").open("a+")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StoreBusyError("another process is writing to this store") from None
        try:
            self._reload_locked()
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            lock.close()

    @contextlib.contextmanager
    def batch(self, batch_id: str) -> Iterator[BatchWriter]:
        """Write one batch atomically: commit on normal exit of the block, discard on any exception."""
        with self.locked():
            writer = BatchWriter(self, batch_id)
            try:
                self._collect_garbage(keep=batch_id)
                yield writer
                if writer.record is None:
                    raise RuntimeError("batch ended without a record; call finish()")
                writer._commit()
            except BaseException:
                shutil.rmtree(writer.dir, ignore_errors=True)
                raise

    @contextlib.contextmanager
    def rewrite(self, op_id: str, record: dict[str, Any]) -> Iterator[Rewriter]:
        """Replace committed segments atomically (erasure): the new manifest lists the rewritten files in
        place of the old ones, and the old files are deleted only after that manifest is committed."""
        with self.locked():
            writer = Rewriter(self, op_id, record)
            try:
                self._collect_garbage(keep=op_id)
                yield writer
                writer._commit()
            except BaseException:
                shutil.rmtree(writer.dir, ignore_errors=True)
                raise

    def segment_files(self, table: str) -> list[str]:
        """Committed files of `table` (or `quarantine`), relative to the store directory."""
        if table == "quarantine":
            return list(self._m.doc["quarantine"])
        return list(self._m.tables[table])

    def read_file(self, rel: str, schema: pa.Schema) -> pa.Table:
        """One committed segment, decrypted into memory."""
        return pads.dataset([str(self.path / rel)], schema=schema, format=self._crypto.read_format).to_table()

    def export_compacted(self, dest: Path, extra: dict[str, Any]) -> None:
        """Write a compacted copy of the store (one encrypted file per table, same data key) to `dest`.

        `dest` must not exist; the copy appears there atomically (written beside it, then renamed). Its
        manifest is the live one with the new file lists and `extra` merged in, under the same MAC, so
        `ClinicalStore.open(dest)` reads it like any store.
        """
        dest = Path(dest)
        if dest.exists():
            raise ConflictError(f"{dest.name} already exists")
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        (tmp / "segments" / "compacted").mkdir(parents=True)
        try:
            doc = orjson.loads(orjson.dumps(self._m.doc))
            for table in [*CDM_TABLES, "quarantine"]:
                schema = QUARANTINE_SCHEMA if table == "quarantine" else arrow_schema(table)
                files: list[str] = []
                if self.segment_files(table):
                    rel = f"segments/compacted/{table}-00001.parquet"
                    ds = self.dataset(table)
                    with self._crypto.writer(tmp / rel, schema) as w:
                        for b in ds.to_batches():
                            w.write_batch(b)
                    _fsync_file(tmp / rel)
                    files = [rel]
                if table == "quarantine":
                    doc["quarantine"] = files
                else:
                    doc["tables"][table] = files
            doc.update(extra)
            doc["revision"] += 1
            doc["mac"] = self._mac(doc)
            _write_json_atomic(tmp / "manifest.json", doc)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _reload_locked(self) -> None:
        """Pick up batches another process committed since we opened (we hold the lock now)."""
        doc = orjson.loads((self.path / "manifest.json").read_bytes())
        if not hmac.compare_digest(str(doc.get("mac", "")), self._mac(doc)):
            raise StoreCorruptError("manifest fails its integrity check")
        if doc["revision"] != self._m.doc["revision"]:
            self._m = _Manifest(doc)
            if self._con is not None:
                self._register(self._con)

    def _mac(self, doc: dict[str, Any]) -> str:
        body = orjson.dumps({k: v for k, v in doc.items() if k != "mac"}, option=orjson.OPT_SORT_KEYS)
        return hmac.new(self._mac_key, body, hashlib.sha256).hexdigest()

    def _save(self, doc: dict[str, Any]) -> None:
        doc["mac"] = self._mac(doc)
        _write_json_atomic(self.path / "manifest.json", doc)
        self._m = _Manifest(doc)
        if self._con is not None:
            self._register(self._con)

    def _collect_garbage(self, keep: str) -> None:
        """Remove segments no committed manifest lists (a batch killed between write and commit).

        Runs under the writer lock, so no other batch is half-written at that moment.
        """
        seg = self.path / "segments"
        if not seg.is_dir():
            return
        live = set(self.scan_files_relative())
        for d in seg.iterdir():
            if not d.is_dir() or d.name == keep:
                continue
            for f in d.iterdir():
                if f"segments/{d.name}/{f.name}" not in live:
                    f.unlink()
            if not any(d.iterdir()):
                d.rmdir()

    def scan_files_relative(self) -> list[str]:
        return [f for fs in self._m.tables.values() for f in fs] + list(self._m.doc["quarantine"])


class BatchWriter:
    """Collects one batch's segments; `ClinicalStore.batch` commits or discards it."""

    def __init__(self, store: ClinicalStore, batch_id: str) -> None:
        if not _ID.match(batch_id):
            raise ValidationError(f"invalid batch id {batch_id!r}")
        self.store = store
        self.batch_id = batch_id
        self.dir = store.path / "segments" / batch_id
        self.dir.mkdir(parents=True, exist_ok=False)
        self.new: dict[str, list[str]] = {}
        self.record: dict[str, Any] | None = None
        self.resolved: dict[str, dict[str, str]] = {}
        self._replaced: set[str] = set()
        self._n = 0

    def write(self, table: str, rows: pa.Table) -> None:
        """Append `rows` (schema of `table`, or the quarantine schema) as one encrypted segment."""
        if rows.num_rows == 0:
            return
        self._n += 1
        rel = f"segments/{self.batch_id}/{table}-{self._n:05d}.parquet"
        self.store._crypto.write(rows, self.store.path / rel)
        self.new.setdefault(table, []).append(rel)

    def visible(self, table: str) -> pads.Dataset | pa.Table:
        """Committed rows of `table` plus what this batch wrote so far."""
        files = self.store._m.tables.get(table, []) + self.new.get(table, [])
        if not files:
            return arrow_schema(table).empty_table()
        return pads.dataset(
            [str(self.store.path / f) for f in files],
            schema=arrow_schema(table),
            format=self.store._crypto.read_format,
        )

    def replace(self, table: str, rows: pa.Table) -> None:
        """Make `rows` the whole content of a derived table (observation_period) from this batch on."""
        self.new[table] = []
        self.write(table, rows)
        self._replaced.add(table)

    def finish(self, record: dict[str, Any], resolved: dict[str, dict[str, str]] | None = None) -> None:
        self.record = record
        self.resolved = resolved or {}

    def _commit(self) -> None:
        doc = orjson.loads(orjson.dumps(self.store._m.doc))
        for table, files in self.new.items():
            if table == "quarantine":
                doc["quarantine"].extend(files)
            elif table in self._replaced:
                doc["tables"][table] = files
            else:
                doc["tables"][table].extend(files)
        doc["batches"].append(self.record)
        doc["resolved"].update(self.resolved)
        doc["revision"] += 1
        self.store._save(doc)
        # Segments of a replaced derived table are no longer listed anywhere: remove them now.
        self.store._collect_garbage(keep="")


class Rewriter:
    """Collects replacements of committed segments; `ClinicalStore.rewrite` commits or discards them."""

    def __init__(self, store: ClinicalStore, op_id: str, record: dict[str, Any]) -> None:
        if not _ID.match(op_id):
            raise ValidationError(f"invalid operation id {op_id!r}")
        self.store = store
        self.op_id = op_id
        self.record = record
        self.dir = store.path / "segments" / op_id
        self.dir.mkdir(parents=True, exist_ok=False)
        self._replacements: dict[str, str | None] = {}
        self.updates: dict[str, Any] = {}  # top-level manifest fields to set in the same commit
        self._n = 0

    def replace(self, table: str, old: str, rows: pa.Table) -> None:
        """Let `rows` stand where the committed file `old` of `table` stood (no rows: drop the file)."""
        if old not in self.store.segment_files(table):
            raise ValidationError(f"{old} is not a committed file of {table}")
        if rows.num_rows == 0:
            self._replacements[old] = None
            return
        self._n += 1
        rel = f"segments/{self.op_id}/{table}-{self._n:05d}.parquet"
        self.store._crypto.write(rows, self.store.path / rel)
        _fsync_file(self.store.path / rel)
        self._replacements[old] = rel

    def _swap(self, files: list[str]) -> list[str]:
        out = []
        for f in files:
            new = self._replacements.get(f, f)
            if new is not None:
                out.append(new)
        return out

    def files_after(self, table: str) -> list[str]:
        """The files `table` will have once this rewrite commits."""
        return self._swap(self.store.segment_files(table))

    def _commit(self) -> None:
        doc = orjson.loads(orjson.dumps(self.store._m.doc))
        doc["tables"] = {t: self._swap(fs) for t, fs in doc["tables"].items()}
        doc["quarantine"] = self._swap(doc["quarantine"])
        doc.update(self.updates)
        doc.setdefault("rewrites", []).append(self.record)
        doc["revision"] += 1
        self.store._save(doc)
        # The replaced files are listed nowhere now; delete them (and an empty op directory).
        self.store._collect_garbage(keep="")
