"""Compute job cost: a single-condition cohort count through the whole job pipeline vs the raw engine query.

The population is a synthetic hospital (`healthspace.synth`) replicated with shifted person ids up to
200,000 patients (about 10 M OMOP rows) in full mode; quick mode uses 2,000 patients unreplicated.
The baseline is the hand-written DuckDB count on the same Parquet files in the same run; the job
figure adds spec parsing, SQL compilation, the consent join, cohort materialisation and disclosure
control; their difference is what the compute layer adds per job (target ≤ 5 ms).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import orjson

from healthspace.bench.harness import Figure, seconds
from healthspace.compute import DisclosureRules, DuckDBEngine, JobContext, attach_parquet, parse_spec, run_job
from healthspace.compute.engine import OMOP_TABLES
from healthspace.compute.sql import SqlBuilder
from healthspace.consent.filter import ConsentFilter
from healthspace.synth.generate import generate

__all__ = ["run"]

_RAW = "SELECT count(DISTINCT person_id) FROM condition_occurrence WHERE condition_source_value LIKE 'E11%'"
_SPEC = orjson.dumps(
    {
        "version": 1,
        "cohort": {
            "inclusion": [
                {"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}
            ]
        },
        "analyses": [{"type": "count", "id": "n"}],
    }
)


def _population(root: Path, quick: bool) -> Path:
    base = 2_000 if quick else 20_000
    copies = 1 if quick else 10
    src = generate("gz", base, 1, root / "src", progress=False).out / "omop"
    if copies == 1:
        return src
    out = root / "omop"
    out.mkdir()
    con = duckdb.connect()
    for t in (*OMOP_TABLES, "consent"):
        path = src / f"{t}.parquet"
        parts = " UNION ALL ".join(
            f"SELECT * REPLACE (person_id + {k * base} AS person_id) FROM read_parquet('{path}')"  # noqa: S608
            for k in range(copies)
        )
        con.execute(f"COPY ({parts}) TO '{out / (t + '.parquet')}' (FORMAT parquet)")
    con.close()
    return out


def run(quick: bool) -> list[Figure]:
    repeat = 3 if quick else 7
    with tempfile.TemporaryDirectory() as tmp:
        omop = _population(Path(tmp), quick)
        con = duckdb.connect()
        attach_parquet(con, omop)
        ids = [
            r[0]
            for r in con.execute(
                "SELECT person_id FROM read_parquet($p) WHERE scenario_id = 'diabetes-outcomes-research'"
                " AND decision = 'permit' AND withdrawn_at IS NULL ORDER BY 1",
                {"p": str(omop / "consent.parquet")},
            ).fetchall()
        ]
        counts = [con.execute(f"SELECT count(*) FROM {t}").fetchone() for t in OMOP_TABLES]  # noqa: S608
        rows = sum(int(c[0]) for c in counts if c is not None)
        consent = ConsentFilter.of("diabetes-outcomes-research", datetime.now(UTC), frozenset(), ids)
        engine = DuckDBEngine(con)
        rules = DisclosureRules()
        ctx = JobContext("bench", "c", "s", "gz")

        raw = seconds(lambda: con.execute(_RAW).fetchall(), repeat=repeat)
        job = seconds(lambda: run_job(parse_spec(_SPEC), engine, consent, rules, ctx), repeat=repeat)

        def python_only() -> None:
            spec = parse_spec(_SPEC)
            SqlBuilder("duckdb").cohort(spec)

        t0 = time.perf_counter()
        for _ in range(200):
            python_only()
        pure = (time.perf_counter() - t0) / 200
        con.close()
    raw_med = statistics.median(raw)
    note = f"{rows:,} OMOP rows, {len(ids):,} consenting persons"
    return [
        Figure("count job: whole pipeline", "s", job, "lower", "raw DuckDB count", raw, note=note),
        Figure(
            "count job: added over the raw engine query",
            "s",
            [max(0.0, s - raw_med) for s in job],
            "lower",
            "raw DuckDB count",
            raw,
            target=0.005,
            note=note + "; consent join + cohort materialisation + checks",
        ),
        Figure(
            "count job: spec parse + SQL compile (Python)",
            "s",
            [pure],
            "lower",
            "raw DuckDB count",
            raw,
            target=0.005,
        ),
    ]
