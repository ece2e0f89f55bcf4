"""Generate a synthetic hospital: FHIR R4 Bulk NDJSON, OMOP-style Parquet and a manifest, chunk by chunk."""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import healthspace
from healthspace.core.errors import ConflictError, ValidationError
from healthspace.synth import model
from healthspace.synth.fhir import FHIR_TYPES, fhir_lines, ndjson_buffers
from healthspace.synth.omop import OMOP_SCHEMAS, OMOP_TABLES, omop_tables
from healthspace.synth.simulate import TABLES, simulate_chunk
from healthspace.synth.sites import get_site

__all__ = ["CHUNK_PATIENTS", "GENERATOR_VERSION", "SynthSummary", "generate"]

# Version of the generating model: bump it whenever the same seed would give different data.
GENERATOR_VERSION = "synth-1"
# Patients per chunk. Part of the output's definition: chunk k is drawn from (seed, site, k).
CHUNK_PATIENTS = 20_000
MAX_PATIENTS = 50_000_000


@dataclass(frozen=True)
class SynthSummary:
    """What `generate` wrote: row counts per OMOP table and per FHIR type, the files, and the time taken."""

    site: str
    patients: int
    seed: int
    out: Path
    omop_rows: Mapping[str, int]
    fhir_resources: Mapping[str, int]
    files: Mapping[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_rows(self) -> int:
        """Rows over all OMOP tables (consent included)."""
        return sum(self.omop_rows.values())

    @property
    def manifest(self) -> Path:
        return self.out / "manifest.json"


def _chunk_rng(seed: int, site: str, index: int) -> np.random.Generator:
    # crc32, not hash(): the site must map to the same entropy in every process.
    ss = np.random.SeedSequence(entropy=[seed, zlib.crc32(site.encode())], spawn_key=(index,))
    return np.random.Generator(np.random.PCG64(ss))


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValidationError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConflictError(f"output directory {out} is not empty; use --force to overwrite")
    try:
        (out / "fhir").mkdir(parents=True, exist_ok=True)
        (out / "omop").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValidationError(f"cannot create output directory {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ValidationError(f"output directory {out} is not writable")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class _Writers:
    """Open Parquet writers and NDJSON files; everything is appended in chunk order from one thread."""

    def __init__(self, out: Path) -> None:
        self.parquet = {
            t: pq.ParquetWriter(out / "omop" / f"{t}.parquet", OMOP_SCHEMAS[t], compression="zstd")
            for t in OMOP_TABLES
        }
        self.ndjson: dict[str, IO[bytes]] = {r: (out / "fhir" / f"{r}.ndjson").open("wb") for r in FHIR_TYPES}
        self.ndjson_sha = {r: hashlib.sha256() for r in FHIR_TYPES}

    def write(self, omop: dict[str, pa.Table], fhir: dict[str, pa.Table]) -> None:
        for r, lines in fhir.items():
            f, h = self.ndjson[r], self.ndjson_sha[r]
            for buf in ndjson_buffers(lines):
                f.write(buf)
                h.update(buf)
        for t, table in omop.items():
            if table.num_rows:
                self.parquet[t].write_table(table)

    def close(self) -> None:
        for w in self.parquet.values():
            w.close()
        for f in self.ndjson.values():
            f.close()


def _progress(enabled: bool, console: Console | None) -> Progress:
    con = console or Console(stderr=True)
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("patients, {task.fields[rows]:,} rows"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=con,
        disable=not (enabled and con.is_terminal),
        transient=False,
    )


def generate(
    site: str,
    patients: int,
    seed: int,
    out: Path,
    *,
    progress: bool = True,
    overwrite: bool = False,
    console: Console | None = None,
) -> SynthSummary:
    """Write a synthetic population of `patients` patients of `site` under `out`, reproducibly from `seed`.

    Layout: `out/fhir/<Type>.ndjson`, `out/omop/<table>.parquet`, `out/manifest.json`. The same arguments
    give byte-identical files. Raises ValidationError for an unknown site, a patient count below 1, a
    negative seed or an unusable directory, and ConflictError if `out` is not empty and not `overwrite`.
    A progress bar is drawn only when `progress` is set and the console is a terminal.
    """
    profile = get_site(site)
    if isinstance(patients, bool) or not isinstance(patients, int) or not 1 <= patients <= MAX_PATIENTS:
        raise ValidationError(f"patients must be an integer from 1 to {MAX_PATIENTS:,}, got {patients!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValidationError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    _prepare_out(out, overwrite)
    scales = model.condition_scales(profile)
    started = time.perf_counter()

    omop_rows = dict.fromkeys(OMOP_TABLES, 0)
    fhir_rows = dict.fromkeys(FHIR_TYPES, 0)
    next_id = dict.fromkeys(TABLES, 1)
    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")  # ours is drawn by rich
    build_fhir = fhir_lines(con, profile)
    writers = _Writers(out)
    pending: Future[None] | None = None
    n_chunks = (patients + CHUNK_PATIENTS - 1) // CHUNK_PATIENTS
    try:
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth-writer") as pool,
            _progress(progress, console) as bar,
        ):
            task = bar.add_task(f"synth {profile.code}", total=patients, rows=0)
            for k in range(n_chunks):
                size = min(CHUNK_PATIENTS, patients - k * CHUNK_PATIENTS)
                chunk = simulate_chunk(profile, scales, size, next_id, _chunk_rng(seed, profile.code, k))
                for t in TABLES:
                    next_id[t] += chunk.rows(t)
                omop = omop_tables(chunk, profile.code)
                fhir = build_fhir(chunk)
                for t, table in omop.items():
                    omop_rows[t] += table.num_rows
                for r, lines in fhir.items():
                    fhir_rows[r] += lines.num_rows
                # One chunk is written while the next is simulated; at most two are held in memory.
                if pending is not None:
                    pending.result()
                pending = pool.submit(writers.write, omop, fhir)
                bar.update(task, advance=size, rows=sum(omop_rows.values()))
                del chunk
            if pending is not None:
                pending.result()
    finally:
        writers.close()
        con.close()

    files: dict[str, Path] = {}
    file_entries: dict[str, dict[str, Any]] = {}
    for r in FHIR_TYPES:
        rel = f"fhir/{r}.ndjson"
        files[rel] = out / rel
        file_entries[rel] = {"rows": fhir_rows[r], "sha256": writers.ndjson_sha[r].hexdigest()}
    for t in OMOP_TABLES:
        rel = f"omop/{t}.parquet"
        files[rel] = out / rel
        file_entries[rel] = {"rows": omop_rows[t], "sha256": _sha256_file(out / rel)}
    manifest = {
        "generator": "healthspace.synth",
        "generator_version": GENERATOR_VERSION,
        "healthspace_version": healthspace.__version__,
        "site": profile.code,
        "seed": seed,
        "patients": patients,
        "chunk_patients": CHUNK_PATIENTS,
        "as_of": model.AS_OF.isoformat(),
        "fhir_version": "4.0.1",
        "omop_cdm_version": "5.4",
        "files": file_entries,
        "site_parameters": profile.to_json(),
        "model": model.model_json(profile),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    files["manifest.json"] = out / "manifest.json"
    return SynthSummary(
        site=profile.code,
        patients=patients,
        seed=seed,
        out=out,
        omop_rows=MappingProxyType(omop_rows),
        fhir_resources=MappingProxyType(fhir_rows),
        files=MappingProxyType(files),
        seconds=time.perf_counter() - started,
    )
