"""The light cohort plan (no dates, ages or cohort table) gives the full plan's and the truth's results."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from healthspace.bench.suites.compute import thousand_codes
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
from healthspace.compute.spec import Event
from healthspace.compute.sql import SqlBuilder, light_plan
from healthspace.consent.filter import ConsentFilter
from tests.compute.conftest import consenting_ids, omop

OPEN = DisclosureRules(min_cell_size=1)
T2D = {"type": "event", "event": {"domain": "condition", "codes": ["E11"], "match": "prefix"}}
HTN = {"type": "event", "event": {"domain": "condition", "codes": ["I10"]}}
CKD_FLAG = {
    "var": "flag",
    "name": "ckd",
    "criterion": {"type": "event", "event": {"domain": "condition", "codes": ["N18"], "match": "prefix"}},
}
COUNT = {"type": "count", "id": "n"}
BY_SEX = {"type": "stratified_count", "id": "s", "by": [{"var": "sex"}]}
SEX_BY_CKD = {"type": "stratified_count", "id": "x", "by": [{"var": "sex"}, CKD_FLAG]}


LIGHT_COHORTS: dict[str, dict[str, Any]] = {
    "everyone": {},
    "t2d": {"inclusion": [T2D]},
    "t2d-not-htn-women": {"inclusion": [T2D, {"type": "sex", "sex": "female"}], "exclusion": [HTN]},
    "first-metformin-index": {
        "index": {"kind": "first_event", "event": {"domain": "drug", "codes": ["A10BA02"]}},
        "inclusion": [HTN],
    },
    "hba1c-over-8": {
        "inclusion": [
            {"type": "event", "event": {"domain": "measurement", "codes": ["4548-4"], "value_min": 8}}
        ]
    },
    "icd10-vocabulary": {
        "inclusion": [
            {"type": "event", "event": {"domain": "condition", "codes": ["I10"], "vocabulary": "ICD10"}}
        ]
    },
    "thousand-codes": {
        "inclusion": [{"type": "event", "event": {"domain": "condition", "codes": thousand_codes()}}]
    },
}


def spec_of(cohort: dict[str, Any], analyses: list[dict[str, Any]]) -> Any:
    return parse_spec({"version": 1, "cohort": cohort, "analyses": analyses})


@pytest.mark.parametrize(
    ("cohort", "analyses", "light"),
    [
        ({"inclusion": [T2D]}, [COUNT], True),
        ({"inclusion": [T2D], "exclusion": [HTN]}, [COUNT, BY_SEX, SEX_BY_CKD], True),
        ({"inclusion": [T2D, {"type": "age", "min_years": 40}]}, [COUNT], False),
        ({"inclusion": [{**T2D, "window": {"from_days": -365, "to_days": 0}}]}, [COUNT], False),
        (
            {"inclusion": [T2D]},
            [{"type": "stratified_count", "id": "a", "by": [{"var": "age_group", "breaks": [0, 50, 130]}]}],
            False,
        ),
        (
            {"inclusion": [T2D]},
            [
                {
                    "type": "stratified_count",
                    "id": "f",
                    "by": [{**CKD_FLAG, "criterion": {**CKD_FLAG["criterion"], "window": {"to_days": 0}}}],
                }
            ],  # type: ignore[dict-item]
            False,
        ),
        (
            {"inclusion": [T2D]},
            [COUNT, {"type": "incidence_rate", "id": "d", "outcome": {"domain": "death"}}],
            False,
        ),
    ],
)
def test_light_plan_is_chosen_only_when_no_date_or_age_is_needed(
    cohort: dict[str, Any], analyses: list[dict[str, Any]], light: bool
) -> None:
    assert light_plan(spec_of(cohort, analyses)) is light


def test_the_light_builder_refuses_what_needs_dates() -> None:
    b = SqlBuilder("duckdb")
    with pytest.raises(ValueError, match="light plan"):
        b.use_light(spec_of({"inclusion": [T2D, {"type": "age", "min_years": 40}]}, [COUNT]))
    b.use_light(spec_of({"inclusion": [T2D]}, [COUNT]))
    with pytest.raises(ValueError, match="full cohort"):
        b.incidence(Event(domain="death"))


@pytest.mark.parametrize("name", sorted(LIGHT_COHORTS))
def test_light_and_full_plans_give_identical_results(
    name: str, gz_engine: DuckDBEngine, gz_consent: ConsentFilter
) -> None:
    spec = spec_of(LIGHT_COHORTS[name], [COUNT, BY_SEX, SEX_BY_CKD])
    assert light_plan(spec)
    results = []
    for plan in ("auto", "full"):
        # With a guard, so the person sets (cohort ids, strata memberships) are read through each plan too.
        guard = DifferencingGuard(MemoryCohortHistory(), 10)
        r = run_job(
            spec, gz_engine, gz_consent, OPEN, JobContext(plan, "c", "s", "gz"), guard=guard, plan=plan
        )
        results.append((r.analyses, guard.history.rows))  # type: ignore[attr-defined]
    (light, light_sets), (full, full_sets) = results
    assert light == full
    assert len(light_sets) == len(full_sets)
    assert all((a[2] == b[2]).all() for a, b in zip(light_sets, full_sets, strict=True))
    assert light["n"]["count"] > 0


def test_count_by_1000_codes_equals_ground_truth(
    gz_engine: DuckDBEngine, gz_consent: ConsentFilter, synth_dirs: dict[str, Path]
) -> None:
    codes = thousand_codes()
    spec = spec_of(
        {
            "inclusion": [{"type": "event", "event": {"domain": "condition", "codes": codes}}],
            "exclusion": [{"type": "event", "event": {"domain": "condition", "codes": ["E11.9"]}}],
        },
        [COUNT, BY_SEX],
    )
    r = run_job(spec, gz_engine, gz_consent, OPEN, JobContext("j", "c", "s", "gz")).analyses
    site = synth_dirs["gz"]
    cond, person, period = (
        omop(site, "condition_occurrence"),
        omop(site, "person"),
        omop(site, "observation_period"),
    )
    has = set(cond.loc[cond.condition_source_value.isin(codes), "person_id"])
    t2d = set(cond.loc[cond.condition_source_value == "E11.9", "person_id"])
    ids = (has - t2d) & set(consenting_ids(site)) & set(period.person_id)
    members = person[person.person_id.isin(ids)]
    assert r["n"]["count"] == len(members) > 100
    men = int((members.gender_concept_id == 8507).sum())
    women = int((members.gender_concept_id == 8532).sum())
    assert r["s"]["counts"] == [women, men, len(members) - men - women]


def _count_by_sex(engine: DuckDBEngine, consent: ConsentFilter, cohort: dict[str, Any]) -> Any:
    spec = spec_of(cohort, [COUNT, BY_SEX])
    return run_job(spec, engine, consent, OPEN, JobContext("j", "c", "s", "gz")).analyses


@pytest.fixture
def engines(synth_dirs: dict[str, Path]) -> Iterator[tuple[DuckDBEngine, DuckDBEngine]]:
    """A reusing engine and a plain one, each on its own connection over the same gz files."""
    cons = [duckdb.connect(), duckdb.connect()]
    for con in cons:
        attach_parquet(con, synth_dirs["gz"] / "omop")
    yield DuckDBEngine(cons[0], reuse_consent=True), DuckDBEngine(cons[1])
    for con in cons:
        con.close()


def _half(consent: ConsentFilter) -> ConsentFilter:
    """Every other consenting person: another consent set."""
    return ConsentFilter(consent.scenario_id, consent.at, frozenset(), consent.person_ids[::2])


def test_a_reusing_engine_follows_each_new_consent_set(
    engines: tuple[DuckDBEngine, DuckDBEngine], gz_consent: ConsentFilter
) -> None:
    # Prepare: a second consent set (every other consenting person) and a third holding the first's
    # ids in a new array.
    reusing, plain = engines
    half = _half(gz_consent)
    again = ConsentFilter(
        gz_consent.scenario_id, gz_consent.at, frozenset(), pa.array(gz_consent.person_ids.to_pylist())
    )
    # Execute / Assert: every cohort, each consent set in turn, equal to a fresh plain engine's result.
    for consent in (gz_consent, gz_consent, half, again):
        for name, cohort in sorted(LIGHT_COHORTS.items()):
            assert _count_by_sex(reusing, consent, cohort) == _count_by_sex(plain, consent, cohort), name
    assert _count_by_sex(reusing, half, LIGHT_COHORTS["t2d"]) != _count_by_sex(
        reusing, gz_consent, LIGHT_COHORTS["t2d"]
    )


def test_another_engine_on_the_same_connection_cannot_replace_a_reusing_engines_consent(
    synth_dirs: dict[str, Path], gz_consent: ConsentFilter
) -> None:
    con = duckdb.connect()
    attach_parquet(con, synth_dirs["gz"] / "omop")
    reusing = DuckDBEngine(con, reuse_consent=True)
    before = _count_by_sex(reusing, gz_consent, LIGHT_COHORTS["t2d"])
    nobody = ConsentFilter.of(gz_consent.scenario_id, gz_consent.at, frozenset(), [])
    other = DuckDBEngine(con)
    other.set_consent(nobody)  # registers its own `consenting` relation on the shared connection
    assert _count_by_sex(reusing, gz_consent, LIGHT_COHORTS["t2d"]) == before
    assert before["n"]["count"] > 0
    con.close()


def _ids(engine: DuckDBEngine, consent: ConsentFilter, cohort: dict[str, Any], *, sql: bool) -> Any:
    b = _light_builder(engine, consent, cohort)
    return engine.column(b.cohort_ids()) if sql else engine.cohort_ids(b)


def test_cohort_ids_on_sorted_arrays_are_the_sql_cohort(
    engines: tuple[DuckDBEngine, DuckDBEngine], gz_consent: ConsentFilter
) -> None:
    # The reusing engine computes a light cohort's ids by set operations on the eligible persons
    # (`cohort_ids`); they must be the SQL semi-joins' ids exactly, for every criterion kind (index
    # event, inclusions, exclusion, sex, measurement values, vocabulary, 1,000 codes), under each
    # consent set, and against an engine that never takes that path.
    reusing, plain = engines
    half = _half(gz_consent)
    men_not_t2d = {"inclusion": [{"type": "sex", "sex": "male"}], "exclusion": [T2D]}
    for consent in (gz_consent, half):
        for name, cohort in sorted({**LIGHT_COHORTS, "men-not-t2d": men_not_t2d}.items()):
            fast = _ids(reusing, consent, cohort, sql=False)
            assert fast.dtype == "int64", name
            assert list(fast) == sorted(set(fast)), name  # sorted, unique
            assert list(fast) == list(_ids(reusing, consent, cohort, sql=True)), name
            assert list(fast) == list(_ids(plain, consent, cohort, sql=True)), name
            assert list(plain.cohort_ids(_light_builder(plain, consent, cohort))) == list(fast), name
    assert (
        len(_ids(reusing, gz_consent, LIGHT_COHORTS["t2d"], sql=False))
        > len(_ids(reusing, half, LIGHT_COHORTS["t2d"], sql=False))
        > 0
    )


def _light_builder(engine: DuckDBEngine, consent: ConsentFilter, cohort: dict[str, Any]) -> SqlBuilder:
    b = SqlBuilder("duckdb")
    relation = engine.set_consent(consent)
    b.use_light(spec_of(cohort, [COUNT]), relation, eligible=engine.light_base(relation))
    return b


def test_only_a_builder_reading_the_kept_eligible_persons_gets_set_terms(
    engines: tuple[DuckDBEngine, DuckDBEngine], gz_consent: ConsentFilter
) -> None:
    reusing = engines[0]
    b = _light_builder(reusing, gz_consent, LIGHT_COHORTS["t2d-not-htn-women"])
    terms = b.light_terms(reusing.light_base(reusing.set_consent(gz_consent)) or "")
    assert terms is not None
    assert [(t.keep, t.ids is not None, t.sex) for t in terms] == [
        (True, True, None),
        (True, False, "female"),
        (False, True, None),
    ]
    assert b.light_terms("some_other_relation") is None
    inlined = SqlBuilder("duckdb")
    inlined.use_light(spec_of(LIGHT_COHORTS["t2d"], [COUNT]), "consenting")
    assert inlined.light_terms("consenting") is None  # inlined eligible query: not a kept relation
