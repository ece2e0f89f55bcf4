"""Synthetic hospital generation speed: patients/s and seconds for a population, vs a plain Parquet write.

The baseline is measured in the same run: `pyarrow.parquet.write_table` of ready-made arrays with as
many rows as the generator wrote to Parquet. It does none of the sampling and none of the FHIR NDJSON,
so the ratio says how many "plain Parquet writes" a full generation costs on this machine.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from healthspace.bench.harness import Figure
from healthspace.synth.generate import generate

__all__ = ["run"]

FULL_PATIENTS = 200_000
QUICK_PATIENTS = 5_000
TARGET_SECONDS_FULL = 60.0  # the target: 200,000 patients, both outputs, under a minute
TARGET_RATE = FULL_PATIENTS / TARGET_SECONDS_FULL


def _plain_table(rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    codes = pa.array(["4548-4", "8480-6", "8462-4", "39156-5", "62238-1", "14682-9", "14771-0", "22748-8"])
    return pa.table(
        {
            "id": pa.array(np.arange(1, rows + 1, dtype=np.int64)),
            "person_id": pa.array(np.sort(rng.integers(1, rows // 50 + 2, rows))),
            "concept_id": pa.array(np.zeros(rows, dtype=np.int32)),
            "date": pa.array(rng.integers(19_300, 20_450, rows).astype(np.int32)).cast(pa.date32()),
            "value": pa.array(np.round(rng.normal(50, 20, rows), 1)),
            "source_value": codes.take(pa.array(rng.integers(0, len(codes), rows))),
        }
    )


def run(quick: bool) -> list[Figure]:
    patients = QUICK_PATIENTS if quick else FULL_PATIENTS
    repeat = 3 if quick else 1
    root = Path(tempfile.mkdtemp(prefix="hs-bench-synth-"))
    try:
        gen_seconds: list[float] = []
        rows = 0
        for i in range(repeat):
            summary = generate("gz", patients, i, root / f"gen{i}", progress=False)
            gen_seconds.append(summary.seconds)
            rows = summary.total_rows
            shutil.rmtree(root / f"gen{i}")
        table = _plain_table(rows)
        base_seconds: list[float] = []
        for i in range(repeat):
            t0 = time.perf_counter()
            pq.write_table(table, root / f"plain{i}.parquet", compression="zstd")
            base_seconds.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    note = (
        f"{patients:,} gz patients, {rows:,} OMOP rows plus the same number of FHIR resources; "
        "baseline writes the same row count as one 6-column Parquet table"
    )
    return [
        Figure(
            name=f"synth generate {patients:,} patients (FHIR NDJSON + OMOP Parquet)",
            unit="s",
            samples=gen_seconds,
            better="lower",
            baseline_name="pyarrow write_table of the same number of pre-made rows",
            baseline_samples=base_seconds,
            target=TARGET_SECONDS_FULL * patients / FULL_PATIENTS,
            note=note + "; target pro rata of 60 s for 200,000",
        ),
        Figure(
            name="synth generation rate",
            unit="patients/s",
            samples=[patients / s for s in gen_seconds],
            baseline_name="patients/s if generating cost only the plain Parquet write",
            baseline_samples=[patients / s for s in base_seconds],
            target=TARGET_RATE,
            note=note,
        ),
    ]
