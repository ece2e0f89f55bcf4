"""Query specs: what parses, and what is refused with a precise error before anything runs."""

from __future__ import annotations

from typing import Any

import pytest

from healthspace.compute import DisclosureRules, authorise, parse_spec
from healthspace.compute.sql import SqlBuilder
from healthspace.core.errors import ForbiddenError, ValidationError

COUNT = {"type": "count", "id": "n"}


def spec(**over: Any) -> dict[str, Any]:
    return {"version": 1, "analyses": [COUNT], **over}


def pointers(exc: ValidationError) -> list[str]:
    return [p["pointer"] for p in exc.extra["problems"]]


def test_minimal_spec_parses() -> None:
    assert parse_spec(spec()).analyses[0].id == "n"


def test_json_text_is_accepted() -> None:
    assert parse_spec(b'{"version": 1, "analyses": [{"type": "count", "id": "n"}]}').version == 1


def test_unknown_version_is_refused() -> None:
    with pytest.raises(ValidationError, match="unsupported query spec version 2"):
        parse_spec({"version": 2, "analyses": [COUNT]})


def test_not_json_is_refused() -> None:
    with pytest.raises(ValidationError, match="not JSON"):
        parse_spec(b"{version")


def test_unknown_member_is_refused_with_its_pointer() -> None:
    with pytest.raises(ValidationError) as e:
        parse_spec(spec(colour="red"))
    assert "/colour" in pointers(e.value)


def test_code_with_sql_wildcard_is_refused() -> None:
    crit = {"type": "event", "event": {"domain": "condition", "codes": ["E11%'; DROP TABLE person;--"]}}
    with pytest.raises(ValidationError) as e:
        parse_spec(spec(cohort={"inclusion": [crit]}))
    assert any(p.startswith("/cohort/inclusion/0/event/event/codes/0") for p in pointers(e.value))


def test_reversed_window_is_refused() -> None:
    crit = {
        "type": "event",
        "event": {"domain": "drug", "codes": ["A10BA02"]},
        "window": {"from_days": 10, "to_days": -10},
    }
    with pytest.raises(ValidationError, match="from_days must not be after to_days"):
        parse_spec(spec(cohort={"inclusion": [crit]}))


def test_duplicate_analysis_ids_are_refused() -> None:
    with pytest.raises(ValidationError, match="repeated: n"):
        parse_spec(spec(analyses=[COUNT, COUNT]))


def test_death_event_with_codes_is_refused() -> None:
    crit = {"type": "event", "event": {"domain": "death", "codes": ["X"]}}
    with pytest.raises(ValidationError, match="death event takes no codes"):
        parse_spec(spec(cohort={"exclusion": [crit]}))


def test_non_increasing_age_breaks_are_refused() -> None:
    a = {"type": "stratified_count", "id": "s", "by": [{"var": "age_group", "breaks": [40, 40, 60]}]}
    with pytest.raises(ValidationError, match="strictly increasing"):
        parse_spec(spec(analyses=[a]))


def test_values_are_bound_never_pasted_into_sql() -> None:
    crit = {"type": "event", "event": {"domain": "condition", "codes": ["Q99.7"], "match": "prefix"}}
    s = parse_spec(spec(cohort={"inclusion": [crit, {"type": "age", "min_years": 41.5}]}))
    q = SqlBuilder("duckdb").cohort(s)
    assert "Q99" not in q.sql
    assert "41.5" not in q.sql
    assert "Q99.7%" in q.params.values()
    assert 41.5 in q.params.values()


def test_analysis_outside_the_agreement_is_refused() -> None:
    s = parse_spec(spec(analyses=[{"type": "incidence_rate", "id": "i", "outcome": {"domain": "death"}}]))
    with pytest.raises(ForbiddenError, match="'incidence_rate' is not allowed") as e:
        authorise(s, DisclosureRules(analyses=frozenset({"count"})))
    assert e.value.extra["pointer"] == "/analyses/0/type"


def test_model_output_needs_the_agreement_to_allow_models() -> None:
    glm = {
        "type": "glm",
        "id": "m",
        "family": "binomial",
        "outcome": {"kind": "male"},
        "covariates": [{"kind": "age"}],
    }
    with pytest.raises(ForbiddenError, match="produces 'model'"):
        authorise(parse_spec(spec(analyses=[glm])), DisclosureRules())


def test_privacy_budget_requires_a_dp_spec() -> None:
    with pytest.raises(ForbiddenError, match="must ask for differential privacy"):
        authorise(parse_spec(spec()), DisclosureRules(epsilon_total=3.0))


def test_analysis_without_dp_release_is_refused_under_a_budget() -> None:
    s = parse_spec(
        spec(analyses=[{"type": "measurement_summary", "id": "h", "code": "4548-4"}], privacy={"epsilon": 1})
    )
    with pytest.raises(ForbiddenError, match="has no differentially private release"):
        authorise(s, DisclosureRules(epsilon_total=3.0))


def test_job_epsilon_above_the_whole_budget_is_refused() -> None:
    with pytest.raises(ForbiddenError, match="exceeds the agreement's whole budget"):
        authorise(parse_spec(spec(privacy={"epsilon": 5})), DisclosureRules(epsilon_total=3.0))
