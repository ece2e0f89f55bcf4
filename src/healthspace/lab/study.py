"""A study on the consumer side: fan a query spec out to providers' data planes and combine the answers."""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from healthspace.compute import GlmFit, SiteStats, fit_glm, parse_spec
from healthspace.core.clock import utcnow
from healthspace.core.errors import HealthspaceError, ValidationError
from healthspace.core.peer_http import PeerHttp
from healthspace.lab.sites import (
    DEFAULT_TOKENS,
    NO_ANSWER,
    Site,
    SiteHttp,
    TokenKeeper,
    TokenRefreshError,
    fetch_public_key,
    json_of,
    problem_of,
    timed_out,
    verify_envelope,
)

__all__ = [
    "GlmStudyResult",
    "SiteOutcome",
    "Study",
    "StudyResult",
    "combine",
    "fetch_released",
    "fit_federated_glm",
    "run_study",
]


@dataclass(frozen=True)
class Study:
    """A scenario, a version-1 query spec and the sites to run it at (checked with `parse_spec`)."""

    scenario: str
    spec: dict[str, Any]
    sites: Sequence[Site]

    def __post_init__(self) -> None:
        parse_spec(self.spec)
        if not self.sites:
            raise ValidationError("a study needs at least one site")
        ids = [s.id for s in self.sites]
        if len(set(ids)) != len(ids):
            raise ValidationError("each site may appear once in a study")


@dataclass
class SiteOutcome:
    """What happened at one site: status ok | held | refused | failed | timeout | unreachable |
    bad-signature. `held`: the provider holds the result for human output review (`review` says how far
    it got); it is neither a result nor a failure, and `fetch_released` collects it once released."""

    site: str
    status: str
    http_status: int | None = None
    detail: str = ""
    reasons: list[str] = field(default_factory=list)
    job_id: str | None = None
    agreement_id: str | None = None
    epsilon_spent: float = 0.0
    elapsed_ms: float = 0.0
    result: dict[str, Any] | None = None
    """The verified signed payload (provider, consumer, agreement, job, result)."""
    envelope: dict[str, Any] | None = None
    review: dict[str, Any] | None = None
    """At a provider that holds results for review: `{id, state, approvals, required, reason}`."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def held(self) -> bool:
        return self.status == "held"

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "status": self.status,
            "http_status": self.http_status,
            "detail": self.detail,
            "reasons": self.reasons,
            "job_id": self.job_id,
            "agreement_id": self.agreement_id,
            "epsilon_spent": self.epsilon_spent,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "result": self.result,
            "review": self.review,
        }


@dataclass
class StudyResult:
    scenario: str
    spec: dict[str, Any]
    started_at: datetime
    finished_at: datetime
    sites: list[SiteOutcome]
    combined: dict[str, Any]

    @property
    def complete(self) -> bool:
        return all(s.ok for s in self.sites)

    @property
    def provenance(self) -> dict[str, Any]:
        """Which agreements and jobs produced the combined figures, and the ε each site charged."""
        return {
            "scenario": self.scenario,
            "sites": [s.site for s in self.sites if s.ok],
            "held": [s.site for s in self.sites if s.held],
            "missing": [s.site for s in self.sites if not s.ok and not s.held],
            "agreements": {s.site: s.agreement_id for s in self.sites if s.ok},
            "jobs": {s.site: s.job_id for s in self.sites if s.ok},
            "budget_spent": {s.site: s.epsilon_spent for s in self.sites if s.ok},
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "spec": self.spec,
            "complete": self.complete,
            "combined": self.combined,
            "sites": [s.to_dict() for s in self.sites],
            "provenance": self.provenance,
        }


_problem = problem_of


def _accept(http: SiteHttp, site: Site, job: dict[str, Any], out: SiteOutcome, keys: dict[str, str]) -> None:
    """Fill `out` from a job answer: held for review, or its verified signed result."""
    out.job_id = job.get("id")
    out.review = job.get("review")
    if job.get("state") == "HELD":
        r = out.review or {}
        out.status = "held"
        out.detail = (
            f"held for output review at the provider ({r.get('approvals', 0)} of "
            f"{r.get('required', '?')} approvals)"
        )
        return
    if job.get("state") == "REFUSED":
        out.status, out.detail = "refused", str(job.get("reason") or "refused by the provider")
        return
    if job.get("state") != "SUCCEEDED":
        out.status, out.detail = "failed", f"the job is {job.get('state')}"
        return
    key = keys.get(site.id) or fetch_public_key(http, site)
    keys[site.id] = key
    payload = verify_envelope(job.get("signed") or {}, key)
    if payload.get("job_id") != out.job_id or (
        site.agreement_id and payload.get("agreement_id") != site.agreement_id
    ):
        out.status, out.detail = "bad-signature", "the signed result is for another job or agreement"
        return
    out.result = payload
    out.envelope = job.get("signed")
    out.agreement_id = str(payload.get("agreement_id"))
    out.epsilon_spent = float(payload["result"].get("epsilon_spent", 0.0))
    out.status, out.detail = "ok", ""


def _guarded(out: SiteOutcome, t0: float, step: Callable[[], None]) -> SiteOutcome:
    """Run `step`, turning every way a site can fail into the outcome's status (never raising)."""
    try:
        step()
    except TokenRefreshError as exc:
        out.status, out.http_status, out.detail = "refused", exc.http_status, exc.detail
        out.reasons = exc.reasons
    except NO_ANSWER as exc:
        if timed_out(exc):
            out.status, out.detail = "timeout", "no answer in time"
        else:
            out.status, out.detail = "unreachable", f"{type(exc).__name__}: {exc}"[:300]
    except HealthspaceError as exc:
        out.status, out.detail = "bad-signature", exc.detail
    except (ValueError, KeyError, TypeError) as exc:
        out.status, out.detail = "failed", f"malformed answer ({type(exc).__name__})"
    finally:
        out.elapsed_ms = (time.perf_counter() - t0) * 1000
    return out


def _call_site(
    http: SiteHttp,
    site: Site,
    scenario: str,
    spec: dict[str, Any],
    keys: dict[str, str],
    tokens: TokenKeeper = DEFAULT_TOKENS,
) -> SiteOutcome:
    t0 = time.perf_counter()
    out = SiteOutcome(site.id, "failed", agreement_id=site.agreement_id or None)

    def step() -> None:
        r = tokens.call(http, site, "POST", "/jobs", {"scenario": scenario, "spec": spec})
        out.http_status = r.status_code
        if r.status_code != 200:
            out.detail, out.reasons = _problem(r)
            out.status = "refused" if r.status_code in (401, 403) else "failed"
            return
        job = json_of(r)
        if job.get("kind") == "glm":
            out.job_id = job.get("id")
            out.result = job
            out.status = "ok"
            return
        _accept(http, site, job, out, keys)

    return _guarded(out, t0, step)


def run_study(
    study: Study,
    *,
    timeout_s: float = 30.0,
    connect_timeout_s: float = 5.0,
    http: SiteHttp | None = None,
    public_keys: dict[str, str] | None = None,
    tokens: TokenKeeper | None = None,
) -> StudyResult:
    """Send the study's spec to every site at once; each site has `timeout_s` (read) to answer.

    Never raises for a site's failure: each site's outcome says ok, held (for output review at the
    provider), refused (with the provider's reasons), failed, timeout, unreachable or bad-signature,
    and only verified results are combined. `public_keys` (site id → base64url key) pins keys and is
    filled with the keys fetched; `tokens` keeps the sites' data-plane tokens fresh (default: the
    process's `DEFAULT_TOKENS`).
    """
    keeper = tokens or DEFAULT_TOKENS
    keys = public_keys if public_keys is not None else {}
    for s in study.sites:
        if s.public_key is not None:
            keys.setdefault(s.id, s.public_key)
    client = http or _client(timeout_s, connect_timeout_s)
    started = utcnow()
    if len(study.sites) == 1:
        # Nothing to overlap: called here, without handing the call to a pool thread and back.
        outcomes = [_call_site(client, study.sites[0], study.scenario, study.spec, keys, keeper)]
    else:
        pool = _site_pool()
        futures = [
            pool.submit(_call_site, client, s, study.scenario, study.spec, keys, keeper) for s in study.sites
        ]
        wait(futures, return_when=FIRST_EXCEPTION)
        outcomes = [f.result() for f in futures]
    return StudyResult(study.scenario, study.spec, started, utcnow(), outcomes, combine(outcomes))


_SITE_THREADS = 32


@functools.cache
def _site_pool() -> ThreadPoolExecutor:
    # One pool per process, its threads kept: starting threads for every study cost about a
    # millisecond on a busy machine. Site calls never submit work of their own, so studies sharing
    # the pool only queue (beyond 32 calls in flight), they cannot deadlock.
    return ThreadPoolExecutor(max_workers=_SITE_THREADS, thread_name_prefix="lab-site")


# A job's answer is a few kB of aggregates; far more is not one, and is not read into memory.
_MAX_ANSWER_BYTES = 64 * 1024 * 1024


@functools.cache
def _client(timeout_s: float, connect_timeout_s: float) -> PeerHttp:
    """The lab's own client when none is given, one per timeout pair for the process (never closed):
    its pool keeps connections to the providers alive between studies, so a study does not pay a TCP
    connect per site, and a call costs a fraction of httpx's CPU (ADR 0008: ≈ 0.4 ms less per job on
    loopback with `http.client`, ≈ 0.15 ms less again with httptools). Thread-safe; TCP_NODELAY; TLS
    with httpx's trust store."""
    return PeerHttp(
        timeout_s, _SITE_THREADS, connect_timeout_s=connect_timeout_s, max_answer_bytes=_MAX_ANSWER_BYTES
    )


def fetch_released(
    study: Study,
    result: StudyResult,
    *,
    timeout_s: float = 30.0,
    http: SiteHttp | None = None,
    public_keys: dict[str, str] | None = None,
    tokens: TokenKeeper | None = None,
) -> StudyResult:
    """Ask again at each site whose result was held for review; a released one is verified and
    combined, a rejected one becomes `refused` with the reviewers' reason, one still held stays held.
    Other outcomes are kept as they were; the combined figures are recomputed."""
    keys = public_keys if public_keys is not None else {}
    for s in study.sites:
        if s.public_key is not None:
            keys.setdefault(s.id, s.public_key)
    keeper = tokens or DEFAULT_TOKENS
    by_id = {s.id: s for s in study.sites}
    client = http or _client(timeout_s, 5.0)
    outcomes: list[SiteOutcome] = []
    for o in result.sites:
        site = by_id.get(o.site)
        if not o.held or site is None or not o.job_id:
            outcomes.append(o)
            continue
        out = SiteOutcome(o.site, "failed", agreement_id=o.agreement_id, job_id=o.job_id)

        def step(out: SiteOutcome = out, site: Site = site) -> None:
            r = keeper.call(client, site, "GET", f"/jobs/{out.job_id}")
            out.http_status = r.status_code
            if r.status_code != 200:
                out.detail, out.reasons = _problem(r)
                out.status = "refused" if r.status_code in (401, 403) else "failed"
                return
            _accept(client, site, json_of(r), out, keys)

        outcomes.append(_guarded(out, time.perf_counter(), step))
    return StudyResult(result.scenario, result.spec, result.started_at, utcnow(), outcomes, combine(outcomes))


# --- combining -------------------------------------------------------------------------------------


def _add(values: list[Any]) -> tuple[Any, bool]:
    """Sum of published values; False when some site hid its value (the sum is then a lower bound)."""
    shown = [v for v in values if v is not None]
    return (sum(shown) if shown else None), len(shown) == len(values)


def _add_lists(rows: list[list[Any]]) -> tuple[list[Any], bool]:
    out, exact = [], True
    for col in zip(*rows, strict=True):
        if col and isinstance(col[0], list):
            v, e = _add_lists(list(col))
        else:
            v, e = _add(list(col))
        out.append(v)
        exact = exact and e
    return out, exact


def _pooled_summary(parts: list[dict[str, Any]]) -> dict[str, Any]:
    usable = [p for p in parts if p.get("n") and p.get("mean") is not None]
    n = sum(int(p["n"]) for p in usable)
    if n == 0:
        return {"type": "measurement_summary", "n": None, "mean": None, "variance": None, "exact": False}
    mean = sum(p["n"] * p["mean"] for p in usable) / n
    within = sum((p["n"] - 1) * (p["variance"] or 0.0) for p in usable)
    between = sum(p["n"] * (p["mean"] - mean) ** 2 for p in usable)
    return {
        "type": "measurement_summary",
        "n": n,
        "mean": mean,
        "variance": (within + between) / (n - 1) if n > 1 else None,
        "exact": len(usable) == len(parts),
        "quantiles": _pooled_quantiles(usable),
    }


def _pooled_quantiles(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Pooled quantiles from per-site quantiles: approximate, with a bracket that always holds.

    Exact pooling needs the values; a site publishes only a few quantiles. What is certain: at each
    level q the pooled q-quantile lies between the smallest and the largest site q-quantile (if every
    site has at least a share q of its values at or below x, so has the pool), up to the linear
    interpolation between neighbouring values that `percentile_cont` does. The estimate inverts the
    n-weighted mixture of the sites' CDFs (`_site_cdf`: piecewise linear through the published
    points, extended linearly at the ends) and is kept inside that bracket. See docs/lab.md.
    """
    with_q = [p for p in parts if p.get("values") and p.get("quantiles")]
    if not with_q:
        return None
    levels = [float(q) for q in with_q[0]["quantiles"]]
    if any([float(q) for q in p["quantiles"]] != levels for p in with_q) or len(with_q) != len(parts):
        return {"levels": levels, "note": "sites published different quantile levels: see each site"}
    values = np.asarray([[float(v) for v in p["values"]] for p in with_q])  # site x level
    weights = np.asarray([float(p["n"]) for p in with_q])
    lower, upper = values.min(axis=0), values.max(axis=0)
    # The answer lies inside [min lower, max upper]; a fine grid there, plus every published value.
    grid = np.unique(np.concatenate([values.ravel(), np.linspace(lower.min(), upper.max(), 512)]))
    mixed = np.zeros_like(grid)
    for row, w in zip(values, weights, strict=True):
        mixed += w * _site_cdf(grid, row, levels)
    mixed /= weights.sum()
    estimates: list[float] = []
    for j, q in enumerate(levels):
        # The mixture CDF is non-decreasing: the first grid point where it reaches q, interpolated.
        k = int(np.searchsorted(mixed, q, side="left"))
        if k <= 0:
            est = float(grid[0])
        elif k >= len(grid):
            est = float(grid[-1])
        else:
            x0, x1, f0, f1 = grid[k - 1], grid[k], mixed[k - 1], mixed[k]
            est = float(x1 if f1 == f0 else x0 + (q - f0) * (x1 - x0) / (f1 - f0))
        estimates.append(float(min(max(est, lower[j]), upper[j])))
    return {
        "levels": levels,
        "estimate": estimates,
        "lower": lower.tolist(),
        "upper": upper.tolist(),
        "exact": len(with_q) == 1,
        "method": "estimate: inverse of the n-weighted mixture of per-site piecewise-linear CDFs; "
        "lower/upper: smallest and largest site quantile (always brackets the pooled quantile)",
    }


def _site_cdf(x: np.ndarray, values: np.ndarray, levels: list[float]) -> np.ndarray:
    """A site's CDF taken as piecewise linear through its (quantile value, level) points, extended
    beyond the outermost ones with the slope of the nearest segment, within [0, 1]."""
    lv = np.asarray(levels, dtype=np.float64)
    v = np.maximum.accumulate(np.asarray(values, dtype=np.float64))  # quantiles never decrease
    out = np.interp(x, v, lv)
    if len(v) >= 2:
        if v[1] > v[0]:
            slope = (lv[1] - lv[0]) / (v[1] - v[0])
            out = np.where(x < v[0], lv[0] + (x - v[0]) * slope, out)
        if v[-1] > v[-2]:
            slope = (lv[-1] - lv[-2]) / (v[-1] - v[-2])
            out = np.where(x > v[-1], lv[-1] + (x - v[-1]) * slope, out)
    clipped: np.ndarray = np.clip(out, 0.0, 1.0)
    return clipped


def _km_rows(part: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """A site's published life-table rows, and whether it hid a tail (a suppressed interval)."""
    rows: list[dict[str, Any]] = []
    for r in part.get("intervals") or []:
        if r.get("at_risk") is None or r.get("events") is None or r.get("censored") is None:
            return rows, True
        rows.append(r)
    return rows, False


def _combined_km(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Kaplan-Meier (life table) over sites from summed at-risk, event and censored counts.

    Sites may have merged bins differently (a site merges bins until every count is 0 or ≥ k), so
    the combined table uses the boundaries every site has; within a common interval a site's events
    and censorings are summed, and its at-risk count is the one at the interval's start. The product
    S = Π (1 - d/n) over the summed counts is then exactly the same life-table estimator on the
    pooled data with those intervals. It stops where the first site stopped publishing.
    """
    tables = [_km_rows(p) for p in parts]
    if not tables or any(not rows for rows, _ in tables):
        return {"type": "kaplan_meier", "intervals": [], "exact": False, "note": "a site published no table"}
    end = min(int(rows[-1]["to_day"]) for rows, _ in tables)
    common = set.intersection(
        *({int(r["from_day"]) for r in rows} | {int(rows[-1]["to_day"])} for rows, _ in tables)
    )
    bounds = sorted(b for b in common if b <= end)
    out: list[dict[str, Any]] = []
    surv = 1.0
    for lo, hi in itertools.pairwise(bounds):
        at_risk = events = censored = 0
        for rows, _ in tables:
            inside = [r for r in rows if lo <= int(r["from_day"]) < hi]
            at_risk += int(inside[0]["at_risk"])
            events += sum(int(r["events"]) for r in inside)
            censored += sum(int(r["censored"]) for r in inside)
        surv *= 1.0 - events / at_risk if at_risk else 1.0
        out.append(
            {
                "from_day": lo,
                "to_day": hi,
                "at_risk": at_risk,
                "events": events,
                "censored": censored,
                "survival": surv,
            }
        )
    shared = all(len(rows) == len(out) for rows, _ in tables)
    hidden = any(tail for _, tail in tables) or any(int(rows[-1]["to_day"]) > end for rows, _ in tables)
    return {
        "type": "kaplan_meier",
        "persons": sum(int(p.get("persons") or 0) for p in parts),
        "intervals": out,
        "exact": True,
        "intervals_shared": shared,
        "truncated": hidden,
        "note": "life table on the intervals every site shares"
        + ("" if shared else " (some sites' intervals were merged into coarser ones)")
        + ("; ends where the first site stopped publishing" if hidden else ""),
    }


def _summed_histogram(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Histograms with the same bands and strata add cell by cell (each person is at one site); a cell
    some site suppressed makes the sum a lower bound (`exact` False)."""
    layout = [(p.get("code"), p.get("bands"), p.get("dims"), p.get("levels")) for p in parts]
    if any(x != layout[0] for x in layout):
        return {"type": "measurement_histogram", "note": "the sites' bands or strata differ; not combined"}
    out: dict[str, Any] = {
        "type": "measurement_histogram",
        "code": parts[0]["code"],
        "bands": parts[0]["bands"],
        "dims": parts[0]["dims"],
        "levels": parts[0]["levels"],
    }
    exact = True
    for key in ("counts", "band_totals", "stratum_totals"):
        if key in parts[0]:
            out[key], e = _add_lists([p[key] for p in parts])
            exact = exact and e
    out["total"], e = _add([p.get("total") for p in parts])
    out["exact"] = exact and e
    return out


def _combine_one(parts: list[dict[str, Any]]) -> dict[str, Any]:
    kind = parts[0].get("type")
    if kind == "measurement_histogram":
        return _summed_histogram(parts)
    if kind == "count":
        value, exact = _add([p.get("count") for p in parts])
        return {"type": "count", "count": value, "exact": exact}
    if kind == "stratified_count":
        counts, exact = _add_lists([p["counts"] for p in parts])
        total, e2 = _add([p.get("total") for p in parts])
        return {
            "type": "stratified_count",
            "dims": parts[0]["dims"],
            "levels": parts[0]["levels"],
            "counts": counts,
            "total": total,
            "exact": exact and e2,
        }
    if kind == "measurement_summary":
        return _pooled_summary(parts)
    if kind == "kaplan_meier":
        return _combined_km(parts)
    if kind == "incidence_rate":
        events, exact = _add([p.get("events") for p in parts])
        py = sum(float(p.get("person_years") or 0.0) for p in parts)
        persons, e2 = _add([p.get("persons") for p in parts])
        return {
            "type": "incidence_rate",
            "persons": persons,
            "events": events,
            "person_years": round(py, 1),
            "rate_per_1000_py": None if events is None or py == 0 else 1000.0 * events / py,
            "exact": exact and e2,
        }
    return {"type": kind, "note": "not combined across sites; see each site's result"}


def combine(outcomes: Sequence[SiteOutcome]) -> dict[str, Any]:
    """Combine the verified results per analysis: sums of counts and cells, pooled moments, rates,
    Kaplan-Meier life tables from summed counts, and approximate pooled quantiles with their bounds.

    `exact` is False where some site suppressed a figure (the combined value then counts only the
    sites that published it). Only sites with status ok contribute.
    """
    ok = [o.result["result"] for o in outcomes if o.ok and o.result is not None and "result" in o.result]
    if not ok:
        return {}
    ids = list(ok[0]["analyses"])
    return {aid: _combine_one([r["analyses"][aid] for r in ok if aid in r["analyses"]]) for aid in ids}


# --- federated GLM -----------------------------------------------------------------------------------


@dataclass
class GlmStudyResult:
    fit: GlmFit | None
    sites: list[SiteOutcome]
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "fit": self.fit.to_dict() if self.fit is not None else None,
            "detail": self.detail,
            "sites": [s.to_dict() for s in self.sites],
        }


class _HttpGlmSite:
    """A `fit_glm` site callable: one signed, verified IRLS step per call at a remote provider."""

    def __init__(
        self,
        http: SiteHttp,
        site: Site,
        job_id: str,
        analysis: str,
        key: str,
        tokens: TokenKeeper = DEFAULT_TOKENS,
    ) -> None:
        self.http, self.site, self.job_id, self.analysis, self.key = http, site, job_id, analysis, key
        self.tokens = tokens

    def __call__(self, beta: np.ndarray) -> SiteStats:
        r = self.tokens.call(
            self.http,
            self.site,
            "POST",
            f"/glm/{self.job_id}",
            {"analysis": self.analysis, "beta": [float(b) for b in beta]},
        )
        if r.status_code != 200:
            detail, _ = _problem(r)
            raise ValidationError(f"site {self.site.id}: HTTP {r.status_code}: {detail}")
        payload = verify_envelope(json_of(r), self.key)
        if payload.get("job_id") != self.job_id or payload.get("beta") != [float(b) for b in beta]:
            raise ValidationError(f"site {self.site.id}: the signed statistics are for another step")
        return SiteStats.from_dict(payload["stats"])


def fit_federated_glm(
    study: Study,
    analysis: str,
    *,
    timeout_s: float = 30.0,
    http: SiteHttp | None = None,
    public_keys: dict[str, str] | None = None,
    tokens: TokenKeeper | None = None,
) -> GlmStudyResult:
    """Open a GLM session at every site, fit by federated IRLS over HTTP, then close the sessions.

    Every site must take part (a fit over fewer sites would silently be a different model): when one
    refuses or fails, the open sessions are cancelled and no fit is returned. Tokens are refreshed
    as they near expiry (`tokens`, default `DEFAULT_TOKENS`), so a long fit outlives them.
    """
    keys = public_keys if public_keys is not None else {}
    keeper = tokens or DEFAULT_TOKENS
    client = http or _client(timeout_s, 5.0)
    opened = run_study(study, http=client, public_keys=keys, tokens=keeper).sites
    if not all(o.ok for o in opened):
        for o in opened:
            if o.ok and o.job_id:
                site = next(s for s in study.sites if s.id == o.site)
                # Best effort: an uncancelled session still ends at the provider's iteration cap.
                with contextlib.suppress(*NO_ANSWER, TokenRefreshError):
                    keeper.call(client, site, "POST", f"/jobs/{o.job_id}/cancel")
        bad = ", ".join(f"{o.site}: {o.status}" for o in opened if not o.ok)
        return GlmStudyResult(None, opened, f"not every site opened the GLM ({bad})")
    callables = []
    info: dict[str, Any] = {}
    for o, site in zip(opened, study.sites, strict=True):
        job = o.result or {}
        info = (job.get("glm") or {}).get(analysis) or {}
        if not info:
            raise ValidationError(f"site {site.id} has no GLM analysis {analysis!r}")
        key = keys.get(site.id) or fetch_public_key(client, site)
        keys[site.id] = key
        callables.append(_HttpGlmSite(client, site, str(o.job_id), analysis, key, keeper))
    fit = fit_glm(callables, info["family"], int(info["n_params"]), names=list(info["names"]))
    for o, site in zip(opened, study.sites, strict=True):
        r = keeper.call(client, site, "POST", f"/glm/{o.job_id}/finish")
        o.http_status = r.status_code
        if r.status_code == 200:
            o.result = verify_envelope(json_of(r).get("signed") or {}, keys[site.id])
        else:
            o.status, o.detail = "failed", _problem(r)[0]
    return GlmStudyResult(fit, opened)
