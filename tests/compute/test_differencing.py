"""Differencing attacks (DataSHIELD-style subset difference) and the defences that defeat them."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from healthspace.compute import (
    DifferencingGuard,
    DisclosureError,
    DisclosureRules,
    DuckDBEngine,
    JobContext,
    MemoryCohortHistory,
    SqlCohortHistory,
    dp_counts,
    parse_spec,
    run_job,
)
from healthspace.compute.guard import decode_ids, digest_ids, encode_ids
from healthspace.compute.tables import CohortHistoryRow
from healthspace.consent.filter import ConsentFilter
from healthspace.core.db import Database

T2D = {"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}
RULES = DisclosureRules(min_cell_size=10)


def target_age(engine: DuckDBEngine) -> float:
    """The age of one cohort member, found by an attacker who knows when their target was born."""
    return float(engine.con.execute("SELECT age FROM hs_cohort ORDER BY person_id LIMIT 1").fetchone()[0])  # type: ignore[index]


def specs(age: float, analysis: dict[str, Any]) -> tuple[Any, Any]:
    whole = parse_spec({"version": 1, "cohort": {"inclusion": [T2D]}, "analyses": [analysis]})
    # Everyone but the target: exclude a tiny age band around them.
    minus = parse_spec(
        {
            "version": 1,
            "cohort": {
                "inclusion": [T2D],
                "exclusion": [{"type": "age", "min_years": age - 1e-6, "max_years": age + 1e-6}],
            },
            "analyses": [analysis],
        }
    )
    return whole, minus


def attack(
    engine: DuckDBEngine, consent: ConsentFilter, analysis: dict[str, Any], guard: DifferencingGuard | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    probe = parse_spec(
        {"version": 1, "cohort": {"inclusion": [T2D]}, "analyses": [{"type": "count", "id": "n"}]}
    )
    # The full plan leaves the cohort table (with ages) behind: the test reads the attacker's knowledge there.
    run_job(probe, engine, consent, RULES, JobContext("probe", "m", "s", "gz"), plan="full")
    whole, minus = specs(target_age(engine), analysis)
    a = run_job(whole, engine, consent, RULES, JobContext("a", "mallory", "s", "gz"), guard=guard)
    b = run_job(minus, engine, consent, RULES, JobContext("b", "mallory", "s", "gz"), guard=guard)
    return a.analyses["x"], b.analyses["x"]


def test_without_a_guard_the_subset_count_attack_singles_out_the_target(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter
) -> None:
    a, b = attack(gz_engine, gz_consent, {"type": "count", "id": "x"}, None)
    assert a["count"] - b["count"] == 1  # the attack works when nothing defends against it


def test_without_a_guard_the_subset_mean_attack_reveals_a_value(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter
) -> None:
    hb = {
        "type": "measurement_summary",
        "id": "x",
        "code": "4548-4",
        "window": {"from_days": 0, "to_days": 0},
    }
    a, b = attack(gz_engine, gz_consent, hb, None)
    value = a["n"] * a["mean"] - b["n"] * b["mean"]
    assert 3.0 < value < 15.0
    assert a["n"] - b["n"] == 1


def test_guard_refuses_the_subset_count_attack(gz_engine: DuckDBEngine, gz_consent: ConsentFilter) -> None:
    guard = DifferencingGuard(MemoryCohortHistory(), 10)
    with pytest.raises(DisclosureError, match="differs from a recently released one by 1 person"):
        attack(gz_engine, gz_consent, {"type": "count", "id": "x"}, guard)


def test_guard_refuses_the_subset_mean_attack(gz_engine: DuckDBEngine, gz_consent: ConsentFilter) -> None:
    hb = {
        "type": "measurement_summary",
        "id": "x",
        "code": "4548-4",
        "window": {"from_days": 0, "to_days": 0},
    }
    with pytest.raises(DisclosureError, match="minimum difference"):
        attack(gz_engine, gz_consent, hb, DifferencingGuard(MemoryCohortHistory(), 10))


def test_guard_refuses_differencing_against_a_table_cell(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter
) -> None:
    """A table by sex, then a count of the men but one: the cohorts differ by hundreds, the cell by one."""
    guard = DifferencingGuard(MemoryCohortHistory(), 10)
    tab = parse_spec(
        {
            "version": 1,
            "cohort": {"inclusion": [T2D]},
            "analyses": [{"type": "stratified_count", "id": "x", "by": [{"var": "sex"}]}],
        }
    )
    run_job(tab, gz_engine, gz_consent, RULES, JobContext("a", "m", "s", "gz"), guard=guard)
    # The attacker knows the target's age; the test reads it from a full-plan cohort table (no guard).
    run_job(tab, gz_engine, gz_consent, RULES, JobContext("probe", "m", "s", "gz"), plan="full")
    age = float(
        gz_engine.con.execute(
            "SELECT age FROM hs_cohort WHERE sex = 'male' ORDER BY person_id LIMIT 1"
        ).fetchone()[0]
    )  # type: ignore[index]
    men_but_one = parse_spec(
        {
            "version": 1,
            "cohort": {
                "inclusion": [T2D, {"type": "sex", "sex": "male"}],
                "exclusion": [{"type": "age", "min_years": age - 1e-6, "max_years": age + 1e-6}],
            },
            "analyses": [{"type": "count", "id": "x"}],
        }
    )
    with pytest.raises(DisclosureError, match="by 1 person"):
        run_job(men_but_one, gz_engine, gz_consent, RULES, JobContext("b", "m", "s", "gz"), guard=guard)


def test_guard_allows_repeating_the_same_query(gz_engine: DuckDBEngine, gz_consent: ConsentFilter) -> None:
    guard = DifferencingGuard(MemoryCohortHistory(), 10)
    spec = parse_spec(
        {"version": 1, "cohort": {"inclusion": [T2D]}, "analyses": [{"type": "count", "id": "n"}]}
    )
    first = run_job(spec, gz_engine, gz_consent, RULES, JobContext("a", "m", "s", "gz"), guard=guard)
    assert (
        run_job(spec, gz_engine, gz_consent, RULES, JobContext("b", "m", "s", "gz"), guard=guard).analyses
        == first.analyses
    )


def test_minimum_cohort_size_refuses_tiny_cohorts(gz_engine: DuckDBEngine, gz_consent: ConsentFilter) -> None:
    spec = parse_spec(
        {
            "version": 1,
            "cohort": {"inclusion": [T2D, {"type": "age", "min_years": 93.5}]},
            "analyses": [{"type": "count", "id": "n"}],
        }
    )
    with pytest.raises(DisclosureError, match="fewer than 10 persons"):
        run_job(spec, gz_engine, gz_consent, RULES, JobContext("a", "m", "s", "gz"))


def test_dp_noise_defeats_the_subset_count_attack() -> None:
    """With ε = 0.1 per query the attacker's guess of 'target present' is barely better than a coin."""
    n = 500
    rng = np.random.default_rng(0)
    present = rng.integers(0, 2, size=1500)
    a = np.array(dp_counts([n] * len(present), 0.1))
    b = np.array(dp_counts([n - int(p) for p in present], 0.1))
    guess = (a - b) >= 1
    accuracy = float(np.mean(guess == present.astype(bool)))
    # Pure ε = 0.2 in total bounds any test's accuracy by e^0.2 / (1 + e^0.2) ≈ 0.55.
    assert accuracy < 0.58


def test_ids_survive_encoding() -> None:
    ids = np.array([3, 17, 18, 2**62], dtype=np.int64)
    assert np.array_equal(decode_ids(encode_ids(ids)), ids)


@pytest.mark.parametrize("hashed", [False, True])
def test_dense_and_hashed_id_sets_survive_encoding_deterministically(hashed: bool) -> None:
    rng = np.random.default_rng(7)
    ids = np.unique(
        rng.integers(1, 2**62, 5_000) if hashed else rng.choice(200_000, 5_000, replace=False) + 1
    ).astype(np.int64)
    blob = encode_ids(ids)
    assert np.array_equal(decode_ids(blob), ids)
    assert encode_ids(ids.copy()) == blob  # the history matches repeated releases by these bytes
    # Dense ids are compressed; hashed ones are stored (compression would save little).
    assert (len(blob) < ids.nbytes // 2) is not hashed


def test_sql_history_remembers_across_guards(make_db: Callable[..., Database]) -> None:
    db = make_db("compute")
    ids = np.arange(100, dtype=np.int64)
    DifferencingGuard(SqlCohortHistory(db), 10).record("gz", "m", [ids])
    fresh = DifferencingGuard(SqlCohortHistory(db), 10)  # e.g. after a restart
    with pytest.raises(DisclosureError):
        fresh.check("gz", [ids[1:]])
    fresh.check("gz", [ids])  # identical: nothing new is revealed
    fresh.check("other-dataset", [ids[1:]])


def test_guard_allows_repeating_a_table_whose_cells_are_close_to_each_other(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter
) -> None:
    """A cross-tab releases a cell and its margin a few persons apart (a sparse age band); asking for the
    same table again reveals nothing new and must not be taken for differencing (found re-running the
    demo study)."""
    guard = DifferencingGuard(MemoryCohortHistory(), 10)
    by = [{"var": "sex"}, {"var": "age_group", "breaks": [40, 90, 120]}]
    spec = parse_spec(
        {
            "version": 1,
            "cohort": {"inclusion": [T2D]},
            "analyses": [{"type": "stratified_count", "id": "t", "by": by}],
        }
    )
    first = run_job(spec, gz_engine, gz_consent, RULES, JobContext("a", "m", "s", "gz"), guard=guard)
    released = [set(ids.tolist()) for _, _, ids in guard.history.rows]  # type: ignore[attr-defined]
    assert any(a < b and len(b - a) < 10 for a in released for b in released), "no nested close groups"
    again = run_job(spec, gz_engine, gz_consent, RULES, JobContext("b", "m", "s", "gz"), guard=guard)
    assert again.analyses == first.analyses


def test_sql_history_keeps_one_row_per_repeated_release_with_the_latest_time(
    make_db: Callable[..., Database],
) -> None:
    db = make_db("compute")
    history = SqlCohortHistory(db)
    guard = DifferencingGuard(history, 10, window=timedelta(days=365))
    ids = np.arange(100, dtype=np.int64)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for day in (0, 100, 200):
        guard.record("gz", "m", [ids], t0 + timedelta(days=day))
    guard.record("gz", "other-consumer", [ids], t0)
    guard.record("gz", "m", [ids[:50]], t0)
    with db.session() as s:
        rows = s.execute(select(CohortHistoryRow.consumer_id, CohortHistoryRow.size)).all()
    assert sorted(rows) == [("m", 50), ("m", 100), ("other-consumer", 100)]
    # The window runs from the latest release: 400 days after the first, the set still protects.
    later = t0 + timedelta(days=400)
    near = history.near("gz", ids[1:], digest_ids(ids[1:]), 10, later - timedelta(days=365))
    assert not near.repeated
    assert len(near.others) == 1
    with pytest.raises(DisclosureError):
        guard.check("gz", [ids[1:]], later)


def test_memory_history_keeps_one_entry_per_repeated_release() -> None:
    history = MemoryCohortHistory()
    ids = np.arange(100, dtype=np.int64)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    history.record("gz", "m", [ids], t0)
    history.record("gz", "m", [ids.copy()], t0 + timedelta(days=1))
    assert [(ds, at) for ds, at, _ in history.rows] == [("gz", t0 + timedelta(days=1))]


def test_digest_is_of_the_set_whatever_the_array_layout() -> None:
    ids = np.array([3, 17, 18, 2**40], dtype=np.int64)
    same = np.array([0, 3, 17, 18, 2**40], dtype=np.int64)[1:]  # a view at an offset
    assert digest_ids(same) == digest_ids(ids)
    assert digest_ids(ids.astype(np.int32, casting="unsafe")[:3]) == digest_ids(ids[:3])
    assert digest_ids(ids[:3]) != digest_ids(ids)
    assert digest_ids(np.array([3, 17, 19, 2**40], dtype=np.int64)) != digest_ids(ids)


def test_sql_history_tells_a_repeated_set_by_digest_and_reads_ids_only_to_compare(
    make_db: Callable[..., Database],
) -> None:
    db = make_db("compute")
    history = SqlCohortHistory(db)
    ids = np.arange(100, dtype=np.int64)
    DifferencingGuard(history, 10).record("gz", "m", [ids])
    # Spoil the stored ids: a repeat must be told from the digest alone, a near set still needs them.
    with db.session() as s:
        s.execute(CohortHistoryRow.__table__.update().values(ids=b"not zlib"))  # type: ignore[attr-defined]
    since = datetime(2000, 1, 1, tzinfo=UTC)
    assert history.near("gz", ids.copy(), digest_ids(ids), 10, since).repeated
    DifferencingGuard(history, 10).check("gz", [ids.copy()])
    with pytest.raises(zlib.error):
        DifferencingGuard(history, 10).check("gz", [ids[1:]])  # fails closed, never "no history"


def test_sets_stored_before_digests_are_still_compared_after_the_migration(
    make_db: Callable[..., Database],
) -> None:
    from alembic import command

    from healthspace.core.db import alembic_config, migrate

    db = make_db()  # no migrations yet
    command.upgrade(alembic_config(db.engine), "compute_0001")
    ids = np.arange(100, dtype=np.int64)
    t = CohortHistoryRow.__table__
    with db.engine.begin() as c:
        c.exec_driver_sql(
            f"INSERT INTO {t.name} (dataset_id, consumer_id, size, ids, recorded_at) "  # type: ignore[attr-defined]
            "VALUES ('gz', 'm', 100, ?, '2026-01-01 00:00:00.000000')"
            if db.dialect == "sqlite"
            else f"INSERT INTO {t.name} (dataset_id, consumer_id, size, ids, recorded_at) "  # type: ignore[attr-defined]
            "VALUES ('gz', 'm', 100, %s, '2026-01-01 00:00:00+00')",
            (encode_ids(ids),),
        )
    migrate(db.engine, ["compute"])
    guard = DifferencingGuard(SqlCohortHistory(db), 10)
    at = datetime(2026, 2, 1, tzinfo=UTC)
    with pytest.raises(DisclosureError):
        guard.check("gz", [ids[1:]], at)
    guard.check("gz", [ids.copy()], at)  # identical to the old row: told by comparing the ids
    guard.record("gz", "m", [ids], at)
    with db.session() as s:
        digests = s.scalars(select(CohortHistoryRow.digest).order_by(CohortHistoryRow.seq)).all()
    assert digests == [None, digest_ids(ids)]
