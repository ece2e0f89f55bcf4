"""Compute job cost: cohort counts through the whole job pipeline vs the raw engine query on the same data.

The population is a synthetic hospital (`healthspace.synth`) replicated with shifted person ids up to
200,000 patients (about 10 M OMOP rows) in full mode; quick mode uses 2,000 patients unreplicated.
Baselines are hand-written DuckDB counts on the same Parquet files in the same run. Jobs run through
`run_job` with the differencing guard (in memory), as the data plane runs them; the engine time of a job
is the time spent inside the engine's calls, so "job - engine" is what the compute layer adds (target
≤ 5 ms: spec parsing, SQL compilation, consent registration, guard, disclosure control). The full plan
(cohort table with dates and ages) is measured in the same run to show what the light plan saves.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import orjson

from healthspace.bench.harness import Figure, seconds
from healthspace.compute import (
    DifferencingGuard,
    DisclosureRules,
    DuckDBEngine,
    JobContext,
    MemoryCohortHistory,
    attach_parquet,
    parse_spec,
    run_job,
)
from healthspace.compute.engine import OMOP_TABLES
from healthspace.compute.sql import Query, SqlBuilder
from healthspace.consent.filter import ConsentFilter
from healthspace.synth.generate import generate

__all__ = ["run", "thousand_codes"]


def thousand_codes() -> list[str]:
    """1,000 exact ICD-10 codes: six cardiometabolic codes present in the synth data, 994 absent ones.

    The synthetic hospitals use 15 condition codes, so a realistic 1,000-code list (a code-set from a
    phenotype library, say) is mostly codes the site never recorded: what matters is the cost of the list.
    """
    present = ["E11.9", "I10", "I25.1", "N18.3", "N18.4", "N18.5"]
    absent = [f"{chapter}{n:02d}.{d}" for chapter in "ABCDFGH" for n in range(15) for d in range(10)]
    return present + absent[: 1000 - len(present)]


_CODES = thousand_codes()
_RAW = "SELECT count(DISTINCT person_id) FROM condition_occurrence WHERE condition_source_value LIKE 'E11%'"
_RAW_1000 = (
    "SELECT count(DISTINCT person_id) FROM condition_occurrence WHERE condition_source_value IN ("  # noqa: S608
    + ", ".join(f"$c{i}" for i in range(len(_CODES)))
    + ")"
)
_RAW_1000_PARAMS = {f"c{i}": c for i, c in enumerate(_CODES)}


def consenting_ids(con: duckdb.DuckDBPyConnection, omop: Path) -> list[int]:
    """Person ids with an unwithdrawn permit for the T2D scenario in a synth OMOP export (the
    consent filter the benchmarks' jobs run with)."""
    return [
        r[0]
        for r in con.execute(
            "SELECT person_id FROM read_parquet($p) WHERE scenario_id = 'diabetes-outcomes-research'"
            " AND decision = 'permit' AND withdrawn_at IS NULL ORDER BY 1",
            {"p": str(omop / "consent.parquet")},
        ).fetchall()
    ]


def _spec(event: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "version": 1,
            "cohort": {"inclusion": [{"type": "event", "event": event}]},
            "analyses": [{"type": "count", "id": "n"}],
        }
    )


_SPEC = _spec({"domain": "condition", "codes": ["E11"], "match": "prefix"})
_SPEC_1000 = _spec({"domain": "condition", "codes": _CODES})


class TimedEngine(DuckDBEngine):
    """A DuckDB engine that sums the seconds spent in its queries (not in the consent registration):
    what "the engine" means in the compute and federated suites' "everything but the engine".

    It keeps the consent relation and the eligible persons across jobs, as the data plane's engine does
    (`reuse_consent`); they are built during each figure's warm-up run.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        super().__init__(con, reuse_consent=True)
        self.seconds = 0.0

    def _time(self, fn: Callable[[Query], Any], query: Query) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(query)
        finally:
            self.seconds += time.perf_counter() - t0

    def materialise(self, query: Query) -> None:
        self._time(super().materialise, query)

    def rows(self, query: Query) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = self._time(super().rows, query)
        return out

    def column(self, query: Query) -> np.ndarray:
        out: np.ndarray = self._time(super().column, query)
        return out

    def columns(self, query: Query) -> list[np.ndarray]:
        out: list[np.ndarray] = self._time(super().columns, query)
        return out

    def cohort_ids(self, b: SqlBuilder) -> np.ndarray:
        t0 = time.perf_counter()  # whole: the parent reads its ids without the timed `column`
        try:
            return super().cohort_ids(b)
        finally:
            self.seconds += time.perf_counter() - t0


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
    repeat = 5 if quick else 15
    with tempfile.TemporaryDirectory() as tmp:
        omop = _population(Path(tmp), quick)
        con = duckdb.connect()
        attach_parquet(con, omop)
        ids = consenting_ids(con, omop)
        counts = [con.execute(f"SELECT count(*) FROM {t}").fetchone() for t in OMOP_TABLES]  # noqa: S608
        rows = sum(int(c[0]) for c in counts if c is not None)
        consent = ConsentFilter.of("diabetes-outcomes-research", datetime.now(UTC), frozenset(), ids)
        engine = TimedEngine(con)
        rules = DisclosureRules()
        ctx = JobContext("bench", "c", "s", "gz")

        def job(body: bytes, plan: Literal["auto", "full"] = "auto") -> Callable[[], object]:
            def go() -> object:
                # A fresh guard history each time, so the job always runs to the end (no refusal).
                guard = DifferencingGuard(MemoryCohortHistory(), rules.difference_floor)
                return run_job(parse_spec(body), engine, consent, rules, ctx, guard=guard, plan=plan)

            return go

        def split(fn: Callable[[], object]) -> tuple[list[float], list[float]]:
            """Whole seconds and engine seconds of each of `repeat` runs (after one warm-up)."""
            fn()
            whole, eng = [], []
            for _ in range(repeat):
                e0, t0 = engine.seconds, time.perf_counter()
                fn()
                whole.append(time.perf_counter() - t0)
                eng.append(engine.seconds - e0)
            return whole, eng

        raw = seconds(lambda: con.execute(_RAW).fetchall(), repeat=repeat)
        light, light_eng = split(job(_SPEC))
        full, _ = split(job(_SPEC, "full"))
        raw_k = seconds(lambda: con.execute(_RAW_1000, _RAW_1000_PARAMS).fetchall(), repeat=repeat)
        many, many_eng = split(job(_SPEC_1000))

        def python_only() -> None:
            spec = parse_spec(_SPEC_1000)
            b = SqlBuilder("duckdb")
            b.use_light(spec)
            b.cohort_ids()

        t0 = time.perf_counter()
        for _ in range(50):
            python_only()
        pure = (time.perf_counter() - t0) / 50
        con.close()
    note = f"{rows:,} OMOP rows, {len(ids):,} consenting persons; job = run_job with the differencing guard"
    over = [w - e for w, e in zip(light, light_eng, strict=True)]
    over_k = [w - e for w, e in zip(many, many_eng, strict=True)]
    return [
        Figure(
            "count job: whole pipeline (light plan)", "s", light, "lower", "raw DuckDB count", raw, note=note
        ),
        Figure("count job: full plan (cohort table)", "s", full, "lower", "raw DuckDB count", raw, note=note),
        Figure(
            "count job: all but the engine",
            "s",
            over,
            "lower",
            "engine time in the job",
            light_eng,
            target=0.005,
            note=note + "; parse, compile, consent registration, guard, disclosure",
        ),
        Figure(
            "count by 1,000 codes: job",
            "s",
            many,
            "lower",
            "raw DuckDB count, same 1,000 codes",
            raw_k,
            note=note + "; inclusion on one event listing 1,000 exact codes (6 in the data)",
        ),
        Figure(
            "count by 1,000 codes: all but the engine",
            "s",
            over_k,
            "lower",
            "engine time in the job",
            many_eng,
            target=0.005,
            note=note,
        ),
        Figure(
            "spec parse + SQL compile, 1,000 codes (Python)",
            "s",
            [pure],
            "lower",
            "raw DuckDB count, same 1,000 codes",
            raw_k,
            target=0.005,
        ),
    ]
