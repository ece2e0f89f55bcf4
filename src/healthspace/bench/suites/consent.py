"""Consent filter cost: the set-based join in DuckDB and the one-query cohort from the registry.

Baselines run in the same process on the same data: the same DuckDB query without the consent join,
and a plain scan of the scenario's rows in the registry table, so the ratios say what consent adds.
"""

from __future__ import annotations

import random
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
from sqlalchemy import text

from healthspace.bench.harness import Figure, seconds
from healthspace.consent.filter import ConsentFilter
from healthspace.consent.models import ConsentRecord, DecisionKind, Source
from healthspace.consent.store import SqlConsentStore
from healthspace.core.db import Database

__all__ = ["run"]

_S = "diabetes-outcomes-research"
_T0 = datetime(2024, 1, 1, tzinfo=UTC)
_AT = datetime(2026, 1, 1, tzinfo=UTC)
_QUERY = "SELECT measurement_concept_id, count(*), avg(value_as_number) FROM measurement {join} GROUP BY 1"


def _records(n: int, rng: random.Random) -> list[ConsentRecord]:
    """One decision per patient (70% permit, 5% of them withdrawn later, 20% class-limited)."""
    out = []
    for p in range(1, n + 1):
        decided = _T0 + timedelta(minutes=rng.randint(0, 500_000))
        permit = rng.random() < 0.7
        classes = frozenset({"laboratory", "demographics"}) if permit and rng.random() < 0.2 else None
        out.append(
            ConsentRecord(
                person_id=p,
                scenario_id=_S,
                decision=DecisionKind.PERMIT if permit else DecisionKind.DENY,
                decided_at=decided,
                valid_from=decided,
                data_classes=classes,
                decision_id=uuid.uuid4().hex,
                recorded_at=_T0,
                source=Source.IMPORT,
                actor="bench",
            )
        )
        if permit and rng.random() < 0.05:
            w = decided + timedelta(days=30)
            out.append(
                ConsentRecord(
                    person_id=p,
                    scenario_id=_S,
                    decision=DecisionKind.DENY,
                    decided_at=w,
                    valid_from=w,
                    decision_id=uuid.uuid4().hex,
                    recorded_at=_T0,
                    source=Source.IMPORT,
                    actor="bench",
                )
            )
    return out


def run(quick: bool) -> list[Figure]:
    patients = 5_000 if quick else 200_000
    per_patient = 25
    repeat = 3 if quick else 7
    rng = random.Random(7)  # noqa: S311 (synthetic data, not secrets)
    store = SqlConsentStore()
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{(Path(tmp) / 'consent.db').as_posix()}", branches=["consent"])
        try:
            records = _records(patients, rng)
            with db.session() as s:
                for i in range(0, len(records), 20_000):
                    store.append(s, records[i : i + 20_000])

            def cohort() -> list[int]:
                with db.session() as s:
                    return store.cohort(s, _S, _AT, ["laboratory"])

            def scan() -> int:
                with db.session() as s:
                    rows = s.execute(
                        text("SELECT person_id FROM consent_decisions WHERE scenario_id = :s"), {"s": _S}
                    ).all()
                    return len(rows)

            cohort_s = seconds(cohort, repeat=repeat)
            scan_s = seconds(scan, repeat=repeat)
            ids = cohort()
        finally:
            db.dispose()

    con = duckdb.connect()
    con.execute("SET threads TO 2")
    con.execute(
        f"""CREATE TABLE measurement AS SELECT
              (i // {per_patient}) + 1 AS person_id,
              3000000 + (i % 40) AS measurement_concept_id,
              (hash(i) % 1000) / 10.0 AS value_as_number
            FROM range({patients * per_patient}) t(i)"""  # noqa: S608 (integers we computed)
    )
    f = ConsentFilter.of(_S, _AT, frozenset({"laboratory"}), ids)

    def plain() -> object:
        return con.sql(_QUERY.format(join="")).fetchall()

    def filtered() -> object:
        f.register(con)  # applying the filter includes handing the cohort to DuckDB
        return con.sql(_QUERY.format(join="JOIN consenting USING (person_id)")).fetchall()

    plain_s = seconds(plain, repeat=repeat, warmup=2)
    filtered_s = seconds(filtered, repeat=repeat, warmup=2)
    ms = [x * 1000 for x in filtered_s]
    base_ms = [x * 1000 for x in plain_s]
    added = sorted(a - b for a, b in zip(sorted(ms), sorted(base_ms), strict=True))
    size = f"{patients:,} patients, {patients * per_patient:,} measurement rows, {len(ids):,} consenting"
    return [
        Figure(
            name="consent filter: DuckDB aggregate with the consent join",
            unit="ms",
            samples=ms,
            better="lower",
            baseline_name="the same query without the join",
            baseline_samples=base_ms,
            note=size,
        ),
        Figure(
            name="consent filter: time added to the DuckDB query",
            unit="ms",
            samples=added,
            better="lower",
            baseline_name="the same query without the join",
            baseline_samples=base_ms,
            target=20.0,
            note=f"{size}; issue target: at most 20 ms added at 200,000 patients",
        ),
        Figure(
            name="consent cohort: one SQL query over the registry (SQLite)",
            unit="ms",
            samples=[x * 1000 for x in cohort_s],
            better="lower",
            baseline_name="plain scan of the scenario's person ids",
            baseline_samples=[x * 1000 for x in scan_s],
            note=f"{len(records):,} decisions",
        ),
    ]
