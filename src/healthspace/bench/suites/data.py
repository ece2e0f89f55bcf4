"""Benchmark of the clinical data path: validated FHIR NDJSON ingestion and DQD-style quality checks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import orjson

from healthspace.bench.harness import Figure, rate, seconds
from healthspace.data.ingest import ingest_ndjson
from healthspace.data.keys import LocalKeyStore
from healthspace.data.quality import run_quality
from healthspace.data.schema import CDM_TABLES
from healthspace.data.store import ClinicalStore
from healthspace.synth.generate import generate

__all__ = ["run"]

INGEST_TARGET = 50_000.0  # resources/s
QUALITY_TARGET = 10.0  # seconds for 10 M rows


def run(quick: bool) -> list[Figure]:
    # The scale (200,000 patients, ~10 M rows) takes minutes: opt in with the variable.
    patients = 300 if quick else int(os.environ.get("HEALTHSPACE_BENCH_DATA_PATIENTS", "40000"))
    repeat = 1 if quick or patients > 100_000 else 3
    with tempfile.TemporaryDirectory(prefix="hs-bench-data-") as tmp:
        base = Path(tmp)
        generate("gz", patients, 1, base / "site", progress=False)
        files = sorted((base / "site" / "fhir").glob("*.ndjson"))
        n = sum(p.read_bytes().count(b"\n") for p in files)
        keys = LocalKeyStore(base / "keys")
        stores: list[ClinicalStore] = []

        def parse_only() -> None:
            loads = orjson.loads
            for p in files:
                for line in p.read_bytes().splitlines():
                    if line:
                        loads(line)

        def ingest() -> None:
            store = ClinicalStore.create(base / f"store-{len(stores)}", f"bench-{len(stores)}", keys)
            stores.append(store)
            report = ingest_ndjson(store, files)
            if report.read != n or report.rejected:
                raise RuntimeError(f"bench ingest read {report.read} of {n}, rejected {report.rejected}")

        ingest_rates = rate(ingest, ops=n, repeat=repeat, warmup=0)
        parse_rates = rate(parse_only, ops=n, repeat=repeat, warmup=1)

        store = stores[-1]
        rows = sum(store.row_counts().values())
        con = store.connect()
        scan_sql = [
            f"SELECT {', '.join(f'count({c.name})' for c in spec.columns)} FROM {t}"  # noqa: S608
            for t, spec in CDM_TABLES.items()
        ]

        def full_scan() -> None:
            for q in scan_sql:
                con.execute(q).fetchall()

        quality_s = seconds(lambda: run_quality(store), repeat=repeat, warmup=1)
        scan_s = seconds(full_scan, repeat=repeat, warmup=1)
        for s in stores:
            s.close()

    return [
        Figure(
            name="fhir_ndjson_ingest_validated",
            unit="resources/s",
            samples=ingest_rates,
            better="higher",
            baseline_name="orjson parse of the same lines",
            baseline_samples=parse_rates,
            target=INGEST_TARGET,
            note=f"{n:,} FHIR R4 resources ({patients:,} patients): validated, mapped, encrypted",
        ),
        Figure(
            name="dqd_quality_checks",
            unit="s",
            samples=quality_s,
            better="lower",
            baseline_name="DuckDB full scan: count() of every column of every table",
            baseline_samples=scan_s,
            target=QUALITY_TARGET,
            note=f"{rows:,} rows in the store; the target is for 10 M rows",
        ),
    ]
