"""Runs one job on a provider: authorise the spec, restrict to consent, query, apply disclosure control."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import orjson

from healthspace.compute.budget import BudgetKey, BudgetLedger
from healthspace.compute.disclosure import (
    DisclosureError,
    DisclosureRules,
    Grid,
    dp_counts,
    primary_suppression,
    round_to,
    secondary_suppression,
)
from healthspace.compute.engine import ClinicalEngine
from healthspace.compute.guard import DifferencingGuard
from healthspace.compute.spec import (
    AgeGroup,
    CountAnalysis,
    Flag,
    GlmAnalysis,
    IncidenceAnalysis,
    KaplanMeierAnalysis,
    MeasurementHistogram,
    MeasurementSummary,
    QuerySpec,
    SexStratifier,
    StratifiedCount,
    Stratifier,
)
from healthspace.compute.sql import SqlBuilder, levels, light_plan
from healthspace.consent.filter import ConsentFilter
from healthspace.core.errors import ConfigurationError, ForbiddenError, ValidationError

__all__ = [
    "DP_ANALYSES",
    "JobContext",
    "JobResult",
    "authorise",
    "canonical_json",
    "job_parameters",
    "run_job",
]

# Analyses with a differentially private release (sensitivity 1 counts of disjoint groups).
DP_ANALYSES = frozenset({"count", "stratified_count", "measurement_histogram"})


def canonical_json(obj: Any) -> bytes:
    """The signable form: orjson, sorted keys, no NaN or infinity (refused rather than silently nulled)."""
    _finite(obj)
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _finite(obj: Any) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError("a result holds a non-finite number")
    if isinstance(obj, dict):
        for v in obj.values():
            _finite(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _finite(v)


@dataclass(frozen=True, slots=True)
class JobContext:
    """Who runs the job on what: keys the budget ledger and the differencing history."""

    job_id: str
    consumer_id: str
    scenario_id: str
    dataset_id: str


@dataclass(frozen=True)
class JobResult:
    job_id: str
    dataset_id: str
    analyses: dict[str, dict[str, Any]]
    disclosure: dict[str, Any]
    epsilon_spent: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "job_id": self.job_id,
            "dataset_id": self.dataset_id,
            "analyses": self.analyses,
            "disclosure": self.disclosure,
            "epsilon_spent": self.epsilon_spent,
        }

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())


def _output_type(spec: QuerySpec) -> str:
    return "model" if any(isinstance(a, GlmAnalysis) for a in spec.analyses) else "aggregate"


def job_parameters(spec: QuerySpec, rules: DisclosureRules) -> dict[str, Any]:
    """The job's values for the policy evaluator's `Request`: output_type, epsilon, cell_size."""
    return {
        "output_type": _output_type(spec),
        "epsilon": spec.privacy.epsilon if spec.privacy is not None else None,
        "cell_size": rules.min_cell_size,
    }


def authorise(spec: QuerySpec, rules: DisclosureRules) -> None:
    """Refuse, before anything runs, a spec asking for what the agreement does not allow."""
    out = _output_type(spec)
    if out not in rules.output_types:
        raise ForbiddenError(
            f"the agreement allows output types {sorted(rules.output_types)}; this spec produces {out!r}",
            pointer="/analyses",
        )
    for i, a in enumerate(spec.analyses):
        if rules.analyses is not None and a.type not in rules.analyses:
            raise ForbiddenError(
                f"analysis {a.id!r} of type {a.type!r} is not allowed by the agreement "
                f"(allowed: {', '.join(sorted(rules.analyses))})",
                pointer=f"/analyses/{i}/type",
            )
    if rules.epsilon_total is not None:
        if spec.privacy is None:
            raise ForbiddenError(
                f"the agreement sets a privacy budget (ε ≤ {rules.epsilon_total:g}): the spec must ask for "
                "differential privacy ('privacy': {'epsilon': ...})",
                pointer="/privacy",
            )
        if spec.privacy.epsilon > rules.epsilon_total:
            raise ForbiddenError(
                f"privacy.epsilon {spec.privacy.epsilon:g} exceeds the agreement's whole budget "
                f"{rules.epsilon_total:g}",
                pointer="/privacy/epsilon",
            )
    if spec.privacy is not None:
        for i, a in enumerate(spec.analyses):
            if a.type not in DP_ANALYSES:
                raise ForbiddenError(
                    f"analysis {a.id!r} ({a.type}) has no differentially private release; "
                    f"under a privacy budget only {', '.join(sorted(DP_ANALYSES))} may run",
                    pointer=f"/analyses/{i}/type",
                )


def _stratifier_name(s: Stratifier) -> str:
    if isinstance(s, SexStratifier):
        return "sex"
    if isinstance(s, AgeGroup):
        return "age_group"
    if isinstance(s, Flag):
        return s.name
    raise TypeError(type(s).__name__)


def _nest(values: list[Any], lv: list[list[str]]) -> list[Any]:
    """Values in the order of `itertools.product(*lv)` as nested lists, one level per stratifier."""
    if len(lv) <= 1:
        return values
    width = len(lv[1])
    return [values[i * width : (i + 1) * width] for i in range(len(lv[0]))]


@dataclass
class _Job:
    spec: QuerySpec
    engine: ClinicalEngine
    rules: DisclosureRules
    b: SqlBuilder
    eps_each: float | None
    suppressed: int = 0
    sets: list[np.ndarray] = field(default_factory=list)

    def publish(self, n: int) -> int | None:
        if 0 < n < self.rules.min_cell_size:
            self.suppressed += 1
            return None
        return round_to(n, self.rules.rounding_base)

    def noisy(self, counts: list[int]) -> list[int]:
        if self.eps_each is None or self.spec.privacy is None:
            return counts
        p = self.spec.privacy
        return [max(0, v) for v in dp_counts(counts, self.eps_each, p.mechanism, p.delta)]

    # --- person sets behind the figures (for the differencing guard) ------------------------------

    def strata_sets(self, a: StratifiedCount, cohort: np.ndarray) -> list[np.ndarray]:
        cols = self.engine.columns(self.b.membership(a.by))
        ids = np.asarray(cols[0], dtype=np.int64)
        out: list[np.ndarray] = []
        keys = [np.asarray(c).astype(str) for c in cols[1:]]
        for k in keys:  # row or column margins
            out += [ids[k == lv] for lv in np.unique(k)]
        if len(keys) == 2:
            combo = np.char.add(np.char.add(keys[0], "\x1f"), keys[1])
            out += [ids[combo == lv] for lv in np.unique(combo)]
        return out

    # --- analyses ------------------------------------------------------------------------------------

    def count(self, a: CountAnalysis, n: int) -> dict[str, Any]:
        value = self.noisy([n])[0]
        return {"type": "count", "count": self.publish(value)}

    def stratified(self, a: StratifiedCount) -> dict[str, Any]:
        """Counts by one stratifier (a column of levels) or a cross-tab of two, with margins; noise
        and suppression as for a histogram's table (`_table_release`)."""
        lv = [levels(s) for s in a.by]
        rows = self.engine.rows(self.b.stratified(a.by))
        shape = (len(lv[0]), len(lv[1]) if len(lv) == 2 else 1)
        cells = [[0] * shape[1] for _ in range(shape[0])]
        for r in rows:
            i = lv[0].index(str(r[0]))
            j = lv[1].index(str(r[1])) if len(lv) == 2 else 0
            cells[i][j] = int(r[-1])
        table, row_totals, col_totals, total = self._table_release(cells)
        out: dict[str, Any] = {
            "type": "stratified_count",
            "dims": [_stratifier_name(s) for s in a.by],
            "levels": lv,
        }
        if len(lv) == 1:
            return out | {"counts": [row[0] for row in table], "total": total}
        return out | {"counts": table, "row_totals": row_totals, "col_totals": col_totals, "total": total}

    def measurement(self, a: MeasurementSummary) -> dict[str, Any]:
        row = self.engine.rows(self.b.measurement_summary(a.code, a.window, a.quantiles))[0]
        n = int(row[0])
        out: dict[str, Any] = {"type": "measurement_summary", "code": a.code, "quantiles": list(a.quantiles)}
        if n < self.rules.min_cell_size:
            self.suppressed += 1
            return out | {"n": None if n else 0, "mean": None, "variance": None, "values": None}
        return out | {
            "n": round_to(n, self.rules.rounding_base),
            "mean": float(row[1]),
            "variance": float(row[2]) if row[2] is not None else None,
            "values": [float(v) for v in row[3:]],
        }

    def histogram_sets(self, a: MeasurementHistogram) -> list[np.ndarray]:
        """The persons behind every published figure of a histogram: total, bands, strata and cells."""
        cols = self.engine.columns(self.b.histogram_membership(a))
        if not cols:
            return []
        ids = np.asarray(cols[0], dtype=np.int64)
        keys = [np.asarray(c).astype(str) for c in cols[1:]]
        strata = keys[1:]
        out = [ids]
        out += [ids[keys[0] == lv] for lv in np.unique(keys[0])]
        if strata:
            combo = strata[0]
            for k in strata[1:]:
                combo = np.char.add(np.char.add(combo, "\x1f"), k)
            cell = np.char.add(np.char.add(keys[0], "\x1e"), combo)
            out += [ids[combo == lv] for lv in np.unique(combo)]
            out += [ids[cell == lv] for lv in np.unique(cell)]
        return out

    def histogram(self, a: MeasurementHistogram) -> dict[str, Any]:
        """Counts by value band (rows) x stratum (columns, every level combination), with margins;
        every cell of the full grid, empty ones included, is released (`_table_release`)."""
        bands = a.labels()
        lv = [levels(s) for s in a.by]
        combos = list(itertools.product(*lv))  # [()] without stratifiers: a one-way table
        where = {c: j for j, c in enumerate(combos)}
        cells = [[0] * len(combos) for _ in bands]
        for r in self.engine.rows(self.b.histogram(a)):
            cells[bands.index(str(r[0]))][where[tuple(str(x) for x in r[1:-1])]] = int(r[-1])
        out: dict[str, Any] = {
            "type": "measurement_histogram",
            "code": a.code,
            "bands": bands,
            "dims": [_stratifier_name(s) for s in a.by],
            "levels": lv,
        }
        # rows: one per band; then the band totals, the stratum totals and the grand total
        table, band_totals, stratum_totals, total = self._table_release(cells)
        if not a.by:
            return out | {"counts": [row[0] for row in table], "total": total}
        return out | {
            "counts": [_nest(row, lv) for row in table],
            "band_totals": band_totals,
            "stratum_totals": _nest(stratum_totals, lv),
            "total": total,
        }

    def _table_release(
        self, cells: list[list[int]]
    ) -> tuple[list[list[int | None]], list[int | None], list[int | None], int | None]:
        """Published cells, row totals, column totals and total of a table of disjoint counts (a
        histogram's bands x strata, a stratified count's levels; one column: a one-way table).

        Under DP every cell gets noise (a person is in one cell: sensitivity 1) and each margin is
        the sum of its unclamped noisy cells, clamped at 0 once: clamping each cell first would add
        the positive part of every empty cell's noise and bias the margins upwards. Both are
        post-processing; cells and margins below k are then hidden (the noise protects the rest).
        Without DP, primary and secondary suppression: no hidden cell follows from the margins."""
        rows, cols = len(cells), len(cells[0])
        p = self.spec.privacy
        if self.eps_each is not None and p is not None:
            raw = dp_counts([v for row in cells for v in row], self.eps_each, p.mechanism, p.delta)
            noisy = [raw[i * cols : (i + 1) * cols] for i in range(rows)]
            return (
                [[self.publish(max(0, v)) for v in row] for row in noisy],
                [self.publish(max(0, sum(row))) for row in noisy],
                [self.publish(max(0, sum(noisy[i][j] for i in range(rows)))) for j in range(cols)],
                self.publish(max(0, sum(raw))),
            )
        # A one-way table is one Grid row (the bands), its only margin the total.
        grid = Grid(cells if cols > 1 else [[row[0] for row in cells]])
        primary_suppression(grid, self.rules.min_cell_size)
        secondary_suppression(grid)
        self.suppressed += len(grid.hidden)
        base = self.rules.rounding_base

        def pub(r: int, c: int) -> int | None:
            return None if (r, c) in grid.hidden else round_to(grid.value(r, c), base)

        gr, gc = grid.shape
        if cols == 1:
            return [[pub(0, c)] for c in range(gc)], [], [], pub(0, gc)
        return (
            [[pub(r, c) for c in range(gc)] for r in range(gr)],
            [pub(r, gc) for r in range(gr)],
            [pub(gr, c) for c in range(gc)],
            pub(gr, gc),
        )

    def incidence(self, a: IncidenceAnalysis) -> dict[str, Any]:
        persons, events, days = self.engine.rows(self.b.incidence(a.outcome))[0]
        persons, events, days = int(persons), int(events or 0), float(days or 0)
        py = days / 365.25
        shown = self.publish(events)
        return {
            "type": "incidence_rate",
            "persons": self.publish(persons),
            "events": shown,
            "person_years": round(py, 1),
            "rate_per_1000_py": None if shown is None or py == 0 else 1000.0 * events / py,
        }

    def kaplan_meier(self, a: KaplanMeierAnalysis) -> dict[str, Any]:
        rows = self.engine.rows(self.b.life_table(a.outcome, a.interval_days, a.horizon_days))
        persons = int(self.engine.rows(self.b.incidence(a.outcome))[0][0])
        nbins = math.ceil(a.horizon_days / a.interval_days)
        d = [0] * nbins
        c = [0] * nbins
        for b, ev, cens in rows:
            j = min(int(b), nbins - 1)
            d[j] += int(ev)
            c[j] += int(cens)
        k = self.rules.min_cell_size
        # Merge adjacent bins until every published count is 0 or at least k, so no single event or
        # censoring time can be read off the table.
        spans: list[list[int]] = []
        cur = [0, 0, 0, 0]  # first bin, last bin, events, censored
        for j in range(nbins):
            if cur[1] < cur[0]:
                cur = [j, j, 0, 0]
            cur[1], cur[2], cur[3] = j, cur[2] + d[j], cur[3] + c[j]
            if all(v == 0 or v >= k for v in cur[2:]):
                spans.append(cur)
                cur = [j + 1, j, 0, 0]
        if cur[1] >= cur[0]:
            if spans:
                prev = spans[-1]
                spans[-1] = [prev[0], cur[1], prev[2] + cur[2], prev[3] + cur[3]]
            else:
                spans.append(cur)
        if persons < k:
            raise DisclosureError(f"kaplan_meier {a.id!r}: {persons} persons at risk, below {k}")
        at_risk, surv = persons, 1.0
        table: list[dict[str, Any]] = []
        for first, last, ev, cens in spans:
            if any(0 < v < k for v in (ev, cens)):
                self.suppressed += 1
                table.append(
                    {
                        "from_day": first * a.interval_days,
                        "to_day": (last + 1) * a.interval_days,
                        "at_risk": None,
                        "events": None,
                        "censored": None,
                        "survival": None,
                    }
                )
                break  # nothing after a hidden interval may be published (it would reveal it)
            surv *= 1.0 - ev / at_risk if at_risk else 1.0
            table.append(
                {
                    "from_day": first * a.interval_days,
                    "to_day": min((last + 1) * a.interval_days, a.horizon_days),
                    "at_risk": at_risk,
                    "events": ev,
                    "censored": cens,
                    "survival": surv,
                }
            )
            at_risk -= ev + cens
        return {"type": "kaplan_meier", "persons": persons, "intervals": table}


def run_job(
    spec: QuerySpec,
    engine: ClinicalEngine,
    consent: ConsentFilter,
    rules: DisclosureRules,
    ctx: JobContext,
    *,
    ledger: BudgetLedger | None = None,
    guard: DifferencingGuard | None = None,
    now: datetime | None = None,
    plan: Literal["auto", "full"] = "auto",
) -> JobResult:
    """Run `spec` on the consenting persons of `engine`'s store and return the disclosure-checked result.

    Order: authorise (refuses before any query) → consent relation → cohort → minimum cohort size →
    differencing guard → budget charge (when the agreement sets one) → analyses → disclosure control.
    GLMs are not run here: use `GlmSite` with `fit_glm`.

    `plan="auto"` reads a spec that needs no dates or ages (`light_plan`: counts, counts by sex or
    flags, criteria without windows) as one subquery per analysis instead of materialising the cohort
    table; `"full"` always materialises (tests and benchmarks compare the two).
    """
    authorise(spec, rules)
    glms = [a.id for a in spec.analyses if isinstance(a, GlmAnalysis)]
    if glms:
        raise ValidationError(f"GLM analyses ({', '.join(glms)}) run through GlmSite/fit_glm, not run_job")
    if rules.epsilon_total is not None and ledger is None:
        raise ConfigurationError("the agreement sets a privacy budget but no budget ledger is configured")
    b = SqlBuilder(engine.dialect)
    relation = engine.set_consent(consent)
    if plan == "auto" and light_plan(spec):
        b.use_light(spec, relation, eligible=engine.light_base(relation))
    else:
        engine.materialise(b.cohort(spec, relation))
    if guard is not None:
        cohort_ids = engine.cohort_ids(b)
        n = len(cohort_ids)
    else:
        cohort_ids = np.zeros(0, dtype=np.int64)
        n = int(engine.rows(b.count())[0][0])
    if n < rules.cohort_floor:
        raise DisclosureError(
            f"the cohort has fewer than {rules.cohort_floor} persons; nothing is released", rule="min-cohort"
        )
    dp_n = sum(1 for a in spec.analyses if a.type in DP_ANALYSES)
    eps_each = spec.privacy.epsilon / dp_n if spec.privacy is not None and dp_n else None
    job = _Job(spec, engine, rules, b, eps_each)
    if guard is not None:
        sets = [cohort_ids]
        for a in spec.analyses:
            if isinstance(a, StratifiedCount):
                sets += job.strata_sets(a, cohort_ids)
            elif isinstance(a, MeasurementSummary):
                sets.append(np.sort(engine.column(b.measurement_values(a.code, a.window))))
            elif isinstance(a, MeasurementHistogram):
                sets += job.histogram_sets(a)
        guard.check(ctx.dataset_id, sets, now)
    spent = 0.0
    if rules.epsilon_total is not None and ledger is not None and spec.privacy is not None:
        ledger.spend(
            BudgetKey(ctx.consumer_id, ctx.scenario_id, ctx.dataset_id),
            spec.privacy.epsilon,
            rules.epsilon_total,
            ctx.job_id,
            now,
        )
        spent = spec.privacy.epsilon
    analyses: dict[str, dict[str, Any]] = {}
    for a in spec.analyses:
        if isinstance(a, CountAnalysis):
            analyses[a.id] = job.count(a, n)
        elif isinstance(a, StratifiedCount):
            analyses[a.id] = job.stratified(a)
        elif isinstance(a, MeasurementSummary):
            analyses[a.id] = job.measurement(a)
        elif isinstance(a, IncidenceAnalysis):
            analyses[a.id] = job.incidence(a)
        elif isinstance(a, KaplanMeierAnalysis):
            analyses[a.id] = job.kaplan_meier(a)
        elif isinstance(a, MeasurementHistogram):
            analyses[a.id] = job.histogram(a)
    if guard is not None:
        guard.record(ctx.dataset_id, ctx.consumer_id, sets, now)
    disclosure: dict[str, Any] = {
        "min_cell_size": rules.min_cell_size,
        "rounding_base": rules.rounding_base,
        "suppressed": job.suppressed,
        "dp": None
        if spec.privacy is None
        else {
            "mechanism": spec.privacy.mechanism,
            "epsilon": spec.privacy.epsilon,
            "delta": spec.privacy.delta if spec.privacy.mechanism == "gaussian" else 0.0,
        },
    }
    return JobResult(ctx.job_id, ctx.dataset_id, analyses, disclosure, spent)
