"""Compiles query specs to parameterised SQL for DuckDB or PostgreSQL (names whitelisted, values bound)."""

# This module assembles SQL text by design: only names from DOMAINS and fixed fragments enter the text;
# every value from a spec goes through SqlBuilder.bind. Hence S608 is off for the file.
# ruff: noqa: S608

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from healthspace.compute.spec import (
    AgeCriterion,
    AgeGroup,
    AgeVar,
    CountAnalysis,
    CountVar,
    Criterion,
    Event,
    EventCriterion,
    Flag,
    HasVar,
    Index,
    MaleVar,
    MeasurementHistogram,
    QuerySpec,
    SexCriterion,
    SexStratifier,
    StratifiedCount,
    Stratifier,
    ValueVar,
    Variable,
    Window,
)

__all__ = [
    "COHORT_TABLE",
    "DOMAINS",
    "Dialect",
    "Domain",
    "LightTerm",
    "Query",
    "SqlBuilder",
    "eligible_persons",
    "levels",
    "light_plan",
]

Dialect = Literal["duckdb", "postgresql"]

# The job's cohort is materialised once per job in this temporary table, then every analysis reads it.
COHORT_TABLE = "hs_cohort"
SEX_LEVELS = ("female", "male", "other")
_SEX = "CASE p.gender_concept_id WHEN 8507 THEN 'male' WHEN 8532 THEN 'female' ELSE 'other' END"


def eligible_persons(consent_table: str) -> str:
    """SELECT person_id, sex of the consenting persons with a person row and an observation period.

    The persons any light-plan cohort is drawn from (the full plan's person ⋈ consent ⋈ observation
    join, without dates or ages). It depends on the consent relation and the store only, not on the
    spec, so an engine whose store does not change may materialise it once per consent cohort
    (`DuckDBEngine(reuse_consent=True)`). Fixed text: the only name in it is `consent_table`.
    """
    if not consent_table.isidentifier():
        raise ValueError(f"relation name {consent_table!r} is not an identifier")
    return (
        f"SELECT p.person_id, {_SEX} AS sex FROM person p JOIN {consent_table} c ON c.person_id = p.person_id"
        " WHERE p.person_id IN (SELECT o.person_id FROM observation_period o)"
    )


@dataclass(frozen=True, slots=True)
class Domain:
    table: str
    code: str | None
    date: str
    order: str


# The only table and column names that ever reach SQL text.
DOMAINS: dict[str, Domain] = {
    "condition": Domain(
        "condition_occurrence", "condition_source_value", "condition_start_date", "condition_occurrence_id"
    ),
    "drug": Domain("drug_exposure", "drug_source_value", "drug_exposure_start_date", "drug_exposure_id"),
    "procedure": Domain(
        "procedure_occurrence", "procedure_source_value", "procedure_date", "procedure_occurrence_id"
    ),
    "measurement": Domain("measurement", "measurement_source_value", "measurement_date", "measurement_id"),
    "death": Domain("death", None, "death_date", "person_id"),
}


@dataclass(frozen=True, slots=True)
class Query:
    """SQL text with named placeholders (`$p0` for DuckDB, `%(p0)s` for psycopg) and their bound values."""

    sql: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LightTerm:
    """One criterion of a light cohort as a set operation: persons in `ids` (the DISTINCT person ids
    of an event criterion), or of `sex`, stay when `keep`, else they leave."""

    keep: bool
    ids: Query | None
    sex: str | None = None


@dataclass
class SqlBuilder:
    """Collects bound values while SQL text is assembled from whitelisted fragments.

    No value from a spec is ever written into the text: `bind` returns a placeholder and keeps the value.
    """

    dialect: Dialect
    params: dict[str, Any] = field(default_factory=dict)
    _n: int = 0
    # Set by `use_light`: the cohort is then a subquery re-evaluated by each analysis, not a table.
    _light: QuerySpec | None = None
    _eligible: str = ""

    def bind(self, value: Any) -> str:
        name = f"p{self._n}"
        self._n += 1
        self.params[name] = value
        return f"${name}" if self.dialect == "duckdb" else f"%({name})s"

    def int_(self, value: int) -> str:
        return f"CAST({self.bind(int(value))} AS INTEGER)"

    def float_(self, value: float) -> str:
        return f"CAST({self.bind(float(value))} AS DOUBLE PRECISION)"

    def done(self, sql: str) -> Query:
        q = Query(sql, dict(self.params))
        self.params = {}
        return q

    # --- events and criteria ---------------------------------------------------------------------

    def event_filter(self, event: Event, alias: str) -> str:
        d = DOMAINS[event.domain]
        parts: list[str] = []
        if d.code is not None:
            col = f"{alias}.{d.code}"
            if event.match == "exact":
                parts.append(f"{col} IN ({', '.join(self.bind(c) for c in event.codes)})")
            else:
                parts.append("(" + " OR ".join(f"{col} LIKE {self.bind(c + '%')}" for c in event.codes) + ")")
        if event.vocabulary is not None:
            parts.append(f"{alias}.hs_source_vocabulary = {self.bind(event.vocabulary)}")
        if event.domain == "measurement":
            if event.value_min is not None:
                parts.append(f"{alias}.value_as_number >= {self.float_(event.value_min)}")
            if event.value_max is not None:
                parts.append(f"{alias}.value_as_number <= {self.float_(event.value_max)}")
        return " AND ".join(parts) if parts else "TRUE"

    def window(self, window: Window, date_col: str, person: str) -> str:
        parts = []
        if window.from_days is not None:
            parts.append(f"{date_col} >= {person}.index_date + {self.int_(window.from_days)}")
        if window.to_days is not None:
            parts.append(f"{date_col} <= {person}.index_date + {self.int_(window.to_days)}")
        return " AND ".join(parts) if parts else "TRUE"

    def criterion(self, c: Criterion, person: str = "b") -> str:
        """A boolean expression over the person row `person` (columns person_id, index_date, sex, age)."""
        if isinstance(c, EventCriterion):
            d = DOMAINS[c.event.domain]
            return (
                f"EXISTS (SELECT 1 FROM {d.table} e WHERE e.person_id = {person}.person_id"
                f" AND {self.event_filter(c.event, 'e')} AND {self.window(c.window, 'e.' + d.date, person)})"
            )
        if isinstance(c, AgeCriterion):
            parts = []
            if c.min_years is not None:
                parts.append(f"{person}.age >= {self.float_(c.min_years)}")
            if c.max_years is not None:
                parts.append(f"{person}.age < {self.float_(c.max_years)}")
            return "(" + " AND ".join(parts) + ")"
        if isinstance(c, SexCriterion):
            return f"{person}.sex = {self.bind(c.sex)}"
        raise TypeError(f"unknown criterion {type(c).__name__}")  # the spec's union makes this unreachable

    # --- the cohort --------------------------------------------------------------------------------

    def _index_join(self, index: Index) -> tuple[str, str]:
        if index.kind == "observation_start" or index.event is None:
            return "", "op.obs_start"
        d = DOMAINS[index.event.domain]
        join = (
            f" JOIN (SELECT e.person_id, MIN(e.{d.date}) AS first_date FROM {d.table} e"
            f" WHERE {self.event_filter(index.event, 'e')} GROUP BY e.person_id) ix"
            " ON ix.person_id = p.person_id"
        )
        return join, "ix.first_date"

    def cohort(self, spec: QuerySpec, consent_table: str = "consenting") -> Query:
        """SELECT person_id, index_date, end_date, sex, age of the consenting persons in the spec's cohort.

        `end_date` is the end of observation (follow-up); age is in years at the index date.
        """
        join, index_expr = self._index_join(spec.cohort.index)
        birth = "make_date(p.year_of_birth, COALESCE(p.month_of_birth, 7), COALESCE(p.day_of_birth, 1))"
        inner = (
            f"SELECT p.person_id, {index_expr} AS index_date, op.obs_end AS end_date, {_SEX} AS sex,"
            f" CAST({index_expr} - {birth} AS DOUBLE PRECISION) / 365.25 AS age"
            f" FROM person p JOIN {consent_table} c ON c.person_id = p.person_id"
            " JOIN (SELECT person_id, MIN(observation_period_start_date) AS obs_start,"
            " MAX(observation_period_end_date) AS obs_end FROM observation_period GROUP BY person_id) op"
            f" ON op.person_id = p.person_id{join}"
        )
        where = [self.criterion(c) for c in spec.cohort.inclusion]
        where += [f"NOT {self.criterion(c)}" for c in spec.cohort.exclusion]
        sql = f"SELECT b.person_id, b.index_date, b.end_date, b.sex, b.age FROM ({inner}) b"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self.done(sql)

    # --- the light plan: no dates, no ages, no temporary table -----------------------------------------

    def use_light(
        self, spec: QuerySpec, consent_table: str = "consenting", *, eligible: str | None = None
    ) -> None:
        """Read the cohort as one subquery (person_id, sex) instead of the materialised table.

        Only for specs where `light_plan(spec)` holds: the subquery has no index date, end date or
        age, so anything needing them would be wrong, and the methods that read them refuse.
        `eligible` names a relation holding `eligible_persons(consent_table)` (a table the engine
        keeps); without it that query is inlined.
        """
        if not light_plan(spec):
            raise ValueError("this spec needs dates or ages: it cannot use the light plan")
        if eligible is not None and not eligible.isidentifier():
            raise ValueError(f"relation name {eligible!r} is not an identifier")
        self._light = spec
        self._eligible = eligible or f"({eligible_persons(consent_table)})"

    def _source(self) -> str:
        """The cohort relation the analyses read, aliased `b` (fresh bound values on every call)."""
        if self._light is None:
            return f"{COHORT_TABLE} b"
        return f"({self._light_cohort(self._light)}) b"

    def _table(self) -> str:
        if self._light is not None:
            raise ValueError("the light plan has no dates or ages; this analysis needs the full cohort")
        return COHORT_TABLE

    def _semi(self, event: Event) -> str:
        """The person ids with at least one such event, for `IN`/`NOT IN` (ids never NULL here).

        DISTINCT first: the semi-join then hashes one row per person instead of one per event (a
        1,000-code list matches many events per person), which DuckDB does not do by itself.
        """
        d = DOMAINS[event.domain]
        return (
            f"SELECT DISTINCT e.person_id FROM {d.table} e"
            f" WHERE e.person_id IS NOT NULL AND {self.event_filter(event, 'e')}"
        )

    def light_terms(self, eligible: str) -> list[LightTerm] | None:
        """The light cohort as set operations on the persons of `eligible` (a relation holding
        `eligible_persons`), or None when this builder does not read its cohort from `eligible`.

        The same persons as `cohort_ids()`: each event criterion (the index event, inclusions) keeps
        the eligible persons among its DISTINCT person ids, each exclusion removes them, and a sex
        criterion keeps one sex. An engine may compute this on sorted id arrays instead of joining in
        SQL (`DuckDBEngine.cohort_ids`)."""
        if self._light is None or self._eligible != eligible:
            return None
        cohort = self._light.cohort
        terms: list[LightTerm] = []
        if cohort.index.event is not None:
            terms.append(LightTerm(True, self.done(self._semi(cohort.index.event))))
        for keep, criteria in ((True, cohort.inclusion), (False, cohort.exclusion)):
            for c in criteria:
                if isinstance(c, EventCriterion):
                    terms.append(LightTerm(keep, self.done(self._semi(c.event))))
                elif isinstance(c, SexCriterion):
                    terms.append(LightTerm(keep, None, c.sex))
                else:
                    raise TypeError(f"{type(c).__name__} is not part of the light plan")
        return terms

    def _light_criterion(self, c: Criterion) -> str:
        if isinstance(c, EventCriterion):  # light_plan guarantees an unbounded window
            return f"b.person_id IN ({self._semi(c.event)})"
        if isinstance(c, SexCriterion):
            return f"b.sex = {self.bind(c.sex)}"
        raise TypeError(f"{type(c).__name__} is not part of the light plan")

    def _light_cohort(self, spec: QuerySpec) -> str:
        # The same persons as `cohort`: a person row, consent, at least one observation period (the
        # full plan's inner join with the period aggregate; `eligible_persons`) and, with a
        # first_event index, one such event (its inner join); then the criteria as semi-joins, which
        # DuckDB and PostgreSQL run as hash joins over each event table once.
        crit = []
        if spec.cohort.index.event is not None:
            crit.append(f"b.person_id IN ({self._semi(spec.cohort.index.event)})")
        crit += [self._light_criterion(c) for c in spec.cohort.inclusion]
        crit += [f"NOT ({self._light_criterion(c)})" for c in spec.cohort.exclusion]
        sql = f"SELECT b.person_id, b.sex FROM {self._eligible} b"
        return sql + (" WHERE " + " AND ".join(crit) if crit else "")

    # --- analyses over the cohort (the materialised table, or the light subquery) --------------------

    def stratum(self, s: Stratifier) -> str:
        if isinstance(s, SexStratifier):
            return "b.sex"
        if isinstance(s, AgeGroup):
            self._table()  # ages exist only in the materialised cohort
            labels = s.labels()
            arms = " ".join(
                f"WHEN b.age >= {self.float_(lo)} AND b.age < {self.float_(hi)} THEN {self.bind(label)}"
                for lo, hi, label in zip(s.breaks, s.breaks[1:], labels, strict=False)
            )
            return f"CASE {arms} ELSE {self.bind('other')} END"
        if isinstance(s, Flag):
            crit = (
                self._light_criterion(s.criterion) if self._light is not None else self.criterion(s.criterion)
            )
            return f"CASE WHEN {crit} THEN 'yes' ELSE 'no' END"
        raise TypeError(f"unknown stratifier {type(s).__name__}")

    def cohort_ids(self) -> Query:
        return self.done(f"SELECT b.person_id FROM {self._source()} ORDER BY 1")

    def count(self) -> Query:
        return self.done(f"SELECT COUNT(*) FROM {self._source()}")

    def stratified(self, by: list[Stratifier]) -> Query:
        keys = [self.stratum(s) for s in by]
        cols = ", ".join(f"{k} AS k{i}" for i, k in enumerate(keys))
        groups = ", ".join(f"k{i}" for i in range(len(keys)))
        return self.done(
            f"SELECT {groups}, COUNT(*) FROM (SELECT {cols} FROM {self._source()}) t GROUP BY {groups}"
        )

    def membership(self, by: list[Stratifier]) -> Query:
        """person_id and stratum keys of every cohort member (for the differencing guard)."""
        keys = [self.stratum(s) for s in by]
        cols = "".join(f", {k}" for k in keys)
        return self.done(f"SELECT b.person_id{cols} FROM {self._source()} ORDER BY b.person_id")

    def _first_value(self, code: str, window: Window) -> str:
        """A relation (person_id, v): each cohort member's first value of `code` within `window`."""
        win = self.window(window, "m.measurement_date", "b")
        return (
            "(SELECT x.person_id, x.v FROM (SELECT m.person_id, m.value_as_number AS v,"
            " ROW_NUMBER() OVER (PARTITION BY m.person_id"
            " ORDER BY m.measurement_date, m.measurement_id) AS rn"
            f" FROM measurement m JOIN {self._table()} b ON b.person_id = m.person_id"
            f" WHERE m.measurement_source_value = {self.bind(code)} AND m.value_as_number IS NOT NULL"
            f" AND {win}) x WHERE x.rn = 1)"
        )

    def measurement_values(self, code: str, window: Window) -> Query:
        return self.done(f"SELECT fv.person_id, fv.v FROM {self._first_value(code, window)} fv")

    def measurement_summary(self, code: str, window: Window, quantiles: list[float]) -> Query:
        rel = self._first_value(code, window)
        qs = "".join(f", percentile_cont({self.float_(q)}) WITHIN GROUP (ORDER BY fv.v)" for q in quantiles)
        return self.done(f"SELECT COUNT(*), AVG(fv.v), VAR_SAMP(fv.v){qs} FROM {rel} fv")

    def follow_up(self, outcome: Event) -> Query:
        """Per cohort member without the outcome on or before the index date: (days at risk, event 0/1).

        Time runs from the index date to the first outcome after it, or to the end of observation.
        """
        d = DOMAINS[outcome.domain]
        flt_prev = self.event_filter(outcome, "e")
        prevalent = (
            f"EXISTS (SELECT 1 FROM {d.table} e WHERE e.person_id = b.person_id AND {flt_prev}"
            f" AND e.{d.date} <= b.index_date)"
        )
        flt_next = self.event_filter(outcome, "e")
        first = (
            f"(SELECT e.person_id, MIN(e.{d.date}) AS first_date FROM {d.table} e"
            f" JOIN {self._table()} b2 ON b2.person_id = e.person_id"
            f" WHERE {flt_next} AND e.{d.date} > b2.index_date GROUP BY e.person_id) f"
        )
        hit = "f.first_date IS NOT NULL AND f.first_date <= b.end_date"
        return self.done(
            f"SELECT CASE WHEN {hit} THEN f.first_date - b.index_date"
            " ELSE b.end_date - b.index_date END AS t,"
            f" CASE WHEN {hit} THEN 1 ELSE 0 END AS ev"
            f" FROM {self._table()} b LEFT JOIN {first} ON f.person_id = b.person_id WHERE NOT {prevalent}"
        )

    def incidence(self, outcome: Event) -> Query:
        inner = self.follow_up(outcome)
        self.params = dict(inner.params)
        return self.done(f"SELECT COUNT(*), SUM(fu.ev), SUM(fu.t) FROM ({inner.sql}) fu")

    def life_table(self, outcome: Event, interval_days: int, horizon_days: int) -> Query:
        """Rows (bin, events, censored) below the horizon; later follow-up stays at risk throughout."""
        inner = self.follow_up(outcome)
        self.params = dict(inner.params)
        hz = self.int_(horizon_days)
        width = self.float_(interval_days)
        hz2 = self.int_(horizon_days)
        return self.done(
            f"SELECT CAST(FLOOR(fu.t / {width}) AS INTEGER) AS bin, SUM(fu.ev), COUNT(*) - SUM(fu.ev)"
            f" FROM ({inner.sql}) fu WHERE fu.t < {hz} OR (fu.t = {hz2} AND fu.ev = 1) GROUP BY 1 ORDER BY 1"
        )

    # --- GLM design ----------------------------------------------------------------------------------

    def design(self, outcome: Variable, covariates: list[Variable]) -> Query:
        """One row per complete case: outcome then covariates (no intercept column)."""
        joins: list[str] = []
        exprs = [self._variable(v, joins) for v in [outcome, *covariates]]
        cols = ", ".join(f"{e} AS v{i}" for i, e in enumerate(exprs))
        sql = f"SELECT * FROM (SELECT {cols} FROM {self._table()} b{''.join(joins)}) d"
        sql += " WHERE " + " AND ".join(f"v{i} IS NOT NULL" for i in range(len(exprs)))
        return self.done(sql + " ORDER BY " + ", ".join(f"v{i}" for i in range(len(exprs))))

    def _variable(self, v: Variable, joins: list[str]) -> str:
        if isinstance(v, AgeVar):
            return f"(b.age - {self.float_(v.center)}) / {self.float_(v.scale)}"
        if isinstance(v, MaleVar):
            return "CASE WHEN b.sex = 'male' THEN 1.0 WHEN b.sex = 'female' THEN 0.0 ELSE NULL END"
        if isinstance(v, HasVar):
            return f"CASE WHEN {self.criterion(v.criterion)} THEN 1.0 ELSE 0.0 END"
        if isinstance(v, ValueVar):
            alias = f"fv{len(joins)}"
            joins.append(
                f" LEFT JOIN {self._first_value(v.code, v.window)} {alias} ON {alias}.person_id = b.person_id"
            )
            return f"{alias}.v - {self.float_(v.center)}"
        if isinstance(v, CountVar):
            d = DOMAINS[v.event.domain]
            return (
                f"CAST((SELECT COUNT(*) FROM {d.table} e WHERE e.person_id = b.person_id"
                f" AND {self.event_filter(v.event, 'e')} AND {self.window(v.window, 'e.' + d.date, 'b')})"
                " AS DOUBLE PRECISION)"
            )
        raise TypeError(f"unknown variable {type(v).__name__}")

    # --- measurement histograms ------------------------------------------------------------------------

    def _histogram_keys(self, a: MeasurementHistogram) -> tuple[list[str], str]:
        """Key expressions (value band, then each stratifier) and the relation they read: every cohort
        member with a first value of `a.code` in the window, once (so each person is in one cell)."""
        labels = a.labels()
        arms = " ".join(
            f"WHEN fv.v >= {self.float_(lo)} AND fv.v < {self.float_(hi)} THEN {self.bind(label)}"
            for lo, hi, label in zip(a.bands, a.bands[1:], labels, strict=False)
        )
        keys = [f"CASE {arms} ELSE {self.bind('other')} END"]
        rel = f"{self._table()} b JOIN {self._first_value(a.code, a.window)} fv ON fv.person_id = b.person_id"
        keys += [self.stratum(s) for s in a.by]
        return keys, rel

    def histogram(self, a: MeasurementHistogram) -> Query:
        """Rows (band label, stratum labels..., persons) for the non-empty cells of the histogram."""
        keys, rel = self._histogram_keys(a)
        cols = ", ".join(f"{k} AS k{i}" for i, k in enumerate(keys))
        groups = ", ".join(f"k{i}" for i in range(len(keys)))
        return self.done(f"SELECT {groups}, COUNT(*) FROM (SELECT {cols} FROM {rel}) t GROUP BY {groups}")

    def histogram_membership(self, a: MeasurementHistogram) -> Query:
        """person_id, band and stratum labels of every person counted (for the differencing guard)."""
        keys, rel = self._histogram_keys(a)
        cols = "".join(f", {k}" for k in keys)
        return self.done(f"SELECT b.person_id{cols} FROM {rel} ORDER BY b.person_id")


def _light_criterion_ok(c: Criterion) -> bool:
    if isinstance(c, SexCriterion):
        return True
    return isinstance(c, EventCriterion) and c.window.from_days is None and c.window.to_days is None


def light_plan(spec: QuerySpec) -> bool:
    """Whether the spec can run without index dates, ages or a cohort table (`SqlBuilder.use_light`).

    True when every criterion is a sex or an event criterion without a window, and every analysis is a
    count or a count stratified by sex and/or flags of such criteria: nothing then depends on when
    follow-up starts or ends, only on who is in the cohort.
    """
    c = spec.cohort
    if not all(_light_criterion_ok(x) for x in (*c.inclusion, *c.exclusion)):
        return False
    for a in spec.analyses:
        if isinstance(a, StratifiedCount):
            for s in a.by:
                if not (
                    isinstance(s, SexStratifier) or (isinstance(s, Flag) and _light_criterion_ok(s.criterion))
                ):
                    return False
        elif not isinstance(a, CountAnalysis):
            return False
    return True


def levels(s: Stratifier) -> list[str]:
    """Every level a stratifier can take, so empty cells are reported as zeros rather than left out."""
    if isinstance(s, SexStratifier):
        return list(SEX_LEVELS)
    if isinstance(s, AgeGroup):
        return s.labels()
    return ["no", "yes"]
