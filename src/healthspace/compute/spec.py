"""Query specs, version 1: the JSON a study sends to a provider (a cohort and the analyses over it)."""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

import orjson
import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from healthspace.core.errors import ValidationError

__all__ = [
    "AgeCriterion",
    "AgeGroup",
    "Analysis",
    "CountAnalysis",
    "Criterion",
    "Event",
    "EventCriterion",
    "Flag",
    "GlmAnalysis",
    "IncidenceAnalysis",
    "Index",
    "KaplanMeierAnalysis",
    "MeasurementHistogram",
    "MeasurementSummary",
    "Privacy",
    "QuerySpec",
    "SexCriterion",
    "StratifiedCount",
    "Stratifier",
    "Variable",
    "Window",
    "parse_spec",
]

# A source code as the clinical store keeps it (ICD-10 "E11.9", LOINC "4548-4", ATC "A10BA02", SNOMED ids).
# No SQL wildcard can appear, so a prefix match binds `code || '%'` safely.
Code = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,31}$")]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")]
Days = Annotated[int, Field(ge=-36_500, le=36_500)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Model):
    """Days relative to the index date, both ends inclusive; a missing end is unbounded."""

    from_days: Days | None = None
    to_days: Days | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.from_days is not None and self.to_days is not None and self.from_days > self.to_days:
            raise ValueError("from_days must not be after to_days")
        return self


class Event(_Model):
    """Records of one clinical domain, selected by source code (exact or prefix); `death` takes no codes."""

    domain: Literal["condition", "drug", "procedure", "measurement", "death"]
    codes: list[Code] = Field(default_factory=list, max_length=1000)
    match: Literal["exact", "prefix"] = "exact"
    vocabulary: Annotated[str, Field(pattern=r"^[A-Za-z0-9\-]{1,32}$")] | None = None
    value_min: float | None = None
    value_max: float | None = None

    @model_validator(mode="after")
    def _coherent(self) -> Event:
        if self.domain == "death":
            if self.codes or self.vocabulary is not None:
                raise ValueError("a death event takes no codes or vocabulary")
        elif not self.codes:
            raise ValueError(f"a {self.domain} event needs at least one code")
        if (self.value_min is not None or self.value_max is not None) and self.domain != "measurement":
            raise ValueError("value_min/value_max apply to measurement events only")
        if self.value_min is not None and self.value_max is not None and self.value_min > self.value_max:
            raise ValueError("value_min must not exceed value_max")
        return self


class EventCriterion(_Model):
    """The person has (inclusion) or lacks (exclusion) at least one such event within the window."""

    type: Literal["event"] = "event"
    event: Event
    window: Window = Window()


class AgeCriterion(_Model):
    """Age at the index date in years, min inclusive, max exclusive."""

    type: Literal["age"] = "age"
    min_years: Annotated[float, Field(ge=0, le=130)] | None = None
    max_years: Annotated[float, Field(ge=0, le=130)] | None = None

    @model_validator(mode="after")
    def _bounded(self) -> AgeCriterion:
        if self.min_years is None and self.max_years is None:
            raise ValueError("an age criterion needs min_years or max_years")
        if self.min_years is not None and self.max_years is not None and self.min_years >= self.max_years:
            raise ValueError("min_years must be below max_years")
        return self


class SexCriterion(_Model):
    type: Literal["sex"] = "sex"
    sex: Literal["female", "male"]


Criterion = Annotated[EventCriterion | AgeCriterion | SexCriterion, Field(discriminator="type")]


class Index(_Model):
    """The index date: the start of observation (default), or the first event of a kind."""

    kind: Literal["observation_start", "first_event"] = "observation_start"
    event: Event | None = None

    @model_validator(mode="after")
    def _needs_event(self) -> Index:
        if (self.kind == "first_event") != (self.event is not None):
            raise ValueError("kind 'first_event' needs an event; 'observation_start' takes none")
        if self.event is not None and self.event.domain == "death":
            raise ValueError("death cannot be an index event")
        return self


class Cohort(_Model):
    index: Index = Index()
    inclusion: list[Criterion] = Field(default_factory=list, max_length=50)
    exclusion: list[Criterion] = Field(default_factory=list, max_length=50)


# --- stratifiers and model variables -------------------------------------------------------------


class SexStratifier(_Model):
    var: Literal["sex"] = "sex"


class AgeGroup(_Model):
    """Age at index in bands [b0, b1), [b1, b2), ...; persons outside every band fall in 'other'."""

    var: Literal["age_group"] = "age_group"
    breaks: list[Annotated[float, Field(ge=0, le=130)]] = Field(min_length=2, max_length=20)

    @field_validator("breaks")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(hi <= lo for lo, hi in itertools.pairwise(v)):
            raise ValueError("breaks must be strictly increasing")
        return v

    def labels(self) -> list[str]:
        return [f"{_num(a)}-{_num(b)}" for a, b in zip(self.breaks, self.breaks[1:], strict=False)] + [
            "other"
        ]


class Flag(_Model):
    """'yes' when the person meets `criterion`, else 'no'."""

    var: Literal["flag"] = "flag"
    name: Name
    criterion: Criterion


Stratifier = Annotated[SexStratifier | AgeGroup | Flag, Field(discriminator="var")]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


class AgeVar(_Model):
    """(age at index - center) / scale."""

    kind: Literal["age"] = "age"
    center: float = 0.0
    scale: Annotated[float, Field(gt=0)] = 1.0


class MaleVar(_Model):
    kind: Literal["male"] = "male"


class HasVar(_Model):
    """1 when the person meets the criterion, else 0."""

    kind: Literal["has"] = "has"
    criterion: Criterion


class ValueVar(_Model):
    """The first value of a measurement within the window, minus `center`; persons without one are dropped."""

    kind: Literal["value"] = "value"
    code: Code
    window: Window = Window()
    center: float = 0.0


class CountVar(_Model):
    """Number of events within the window (a Poisson outcome)."""

    kind: Literal["count"] = "count"
    event: Event
    window: Window = Window()


Variable = Annotated[AgeVar | MaleVar | HasVar | ValueVar | CountVar, Field(discriminator="kind")]


# --- analyses ----------------------------------------------------------------------------------------


class CountAnalysis(_Model):
    type: Literal["count"] = "count"
    id: Name


class StratifiedCount(_Model):
    """Counts by one stratifier, or a cross-tab of two, with margins."""

    type: Literal["stratified_count"] = "stratified_count"
    id: Name
    by: list[Stratifier] = Field(min_length=1, max_length=2)


Quantile = Annotated[float, Field(gt=0, lt=1)]


class MeasurementSummary(_Model):
    """n, mean, variance and quantiles of each person's first value of `code` within the window."""

    type: Literal["measurement_summary"] = "measurement_summary"
    id: Name
    code: Code
    window: Window = Window()
    quantiles: list[Quantile] = Field(default_factory=list, max_length=9)


# A band edge of a measurement histogram: finite, in the units the store records (HbA1c in %, eGFR in
# mL/min/1.73 m2, ...); the bound only keeps absurd numbers out of the SQL parameters.
BandEdge = Annotated[float, Field(ge=-1e9, le=1e9, allow_inf_nan=False)]


class MeasurementHistogram(_Model):
    """Persons by band of their first value of `code` within the window, optionally crossed with one or two
    stratifiers (e.g. sex and age group).

    Bands are [b0, b1), [b1, b2), ...; a value outside every band falls in 'other'; persons without a
    value are not counted. Each person is in at most one cell, so the cells are counts of disjoint
    groups (sensitivity 1) and the table has a differentially private release like `stratified_count`.
    """

    type: Literal["measurement_histogram"] = "measurement_histogram"
    id: Name
    code: Code
    window: Window = Window()
    bands: list[BandEdge] = Field(min_length=2, max_length=30)
    by: list[Stratifier] = Field(default_factory=list, max_length=2)

    @field_validator("bands")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(hi <= lo for lo, hi in itertools.pairwise(v)):
            raise ValueError("bands must be strictly increasing")
        return v

    def labels(self) -> list[str]:
        """One label per band, '[lo]-[hi]', then 'other' (values below the first or from the last edge)."""
        return [f"{_num(a)}-{_num(b)}" for a, b in itertools.pairwise(self.bands)] + ["other"]


class IncidenceAnalysis(_Model):
    """First `outcome` event after the index date per person-time at risk (to the event or end of follow-up).

    Persons with the outcome on or before the index date are excluded (prevalent cases)."""

    type: Literal["incidence_rate"] = "incidence_rate"
    id: Name
    outcome: Event


class KaplanMeierAnalysis(_Model):
    """Survival free of `outcome` after the index date, as a life table in bins of `interval_days`."""

    type: Literal["kaplan_meier"] = "kaplan_meier"
    id: Name
    outcome: Event
    interval_days: Annotated[int, Field(ge=7, le=3_650)] = 90
    horizon_days: Annotated[int, Field(ge=7, le=36_500)] = 1_095


class GlmAnalysis(_Model):
    """A GLM fitted across sites by `healthspace.compute.glm.fit_glm`; an intercept is always included."""

    type: Literal["glm"] = "glm"
    id: Name
    family: Literal["binomial", "gaussian", "poisson"]
    outcome: Variable
    covariates: list[Variable] = Field(min_length=1, max_length=30)


Analysis = Annotated[
    CountAnalysis
    | StratifiedCount
    | MeasurementSummary
    | MeasurementHistogram
    | IncidenceAnalysis
    | KaplanMeierAnalysis
    | GlmAnalysis,
    Field(discriminator="type"),
]


class Privacy(_Model):
    """Differential privacy for this job: `epsilon` is the job's whole budget, split over its releases."""

    epsilon: Annotated[float, Field(gt=0, le=10)]
    mechanism: Literal["laplace", "gaussian"] = "laplace"
    delta: Annotated[float, Field(gt=0, lt=1e-3)] = 1e-7


class QuerySpec(_Model):
    version: Literal[1]
    cohort: Cohort = Cohort()
    analyses: list[Analysis] = Field(min_length=1, max_length=20)
    privacy: Privacy | None = None

    @model_validator(mode="after")
    def _unique_ids(self) -> QuerySpec:
        ids = [a.id for a in self.analyses]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"analysis ids must be unique; repeated: {', '.join(dupes)}")
        return self


def _loc(loc: tuple[int | str, ...]) -> str:
    return "/" + "/".join(str(p) for p in loc)


def parse_spec(doc: bytes | str | dict[str, Any]) -> QuerySpec:
    """Validate a spec (JSON text or an already-decoded object); `ValidationError` lists every problem.

    Each problem is `{"pointer": JSON pointer, "message": ...}` in the error's `problems`.
    """
    try:
        raw: Any = orjson.loads(doc) if isinstance(doc, bytes | str) else doc
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"query spec is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValidationError("query spec must be a JSON object")
    if raw.get("version") != 1:
        raise ValidationError(
            f"unsupported query spec version {raw.get('version')!r}; this provider reads version 1",
            problems=[{"pointer": "/version", "message": "must be 1"}],
        )
    try:
        return QuerySpec.model_validate(raw)
    except pydantic.ValidationError as exc:
        problems = [
            {"pointer": _loc(tuple(e["loc"])), "message": str(e["msg"])}
            for e in exc.errors(include_url=False)
        ]
        summary = "; ".join(f"{p['pointer']}: {p['message']}" for p in problems[:5])
        raise ValidationError(f"invalid query spec: {summary}", problems=problems) from None
