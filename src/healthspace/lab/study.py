"""A study on the consumer side: fan a query spec out to providers' data planes and combine the answers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import numpy as np

from healthspace.compute import GlmFit, SiteStats, fit_glm, parse_spec
from healthspace.core.clock import utcnow
from healthspace.core.errors import HealthspaceError, ValidationError
from healthspace.lab.sites import Site, fetch_public_key, verify_envelope

__all__ = [
    "GlmStudyResult",
    "SiteOutcome",
    "Study",
    "StudyResult",
    "combine",
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
    """What happened at one site: status ok | refused | failed | timeout | unreachable | bad-signature."""

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

    @property
    def ok(self) -> bool:
        return self.status == "ok"

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
            "missing": [s.site for s in self.sites if not s.ok],
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


def _problem(r: httpx.Response) -> tuple[str, list[str]]:
    try:
        doc = r.json()
    except ValueError:
        return r.text[:300], []
    if not isinstance(doc, dict):
        return str(doc)[:300], []
    reasons = doc.get("reasons")
    return str(doc.get("detail", ""))[:1000], [str(x) for x in reasons] if isinstance(reasons, list) else []


def _call_site(
    http: httpx.Client, site: Site, scenario: str, spec: dict[str, Any], keys: dict[str, str]
) -> SiteOutcome:
    t0 = time.perf_counter()
    out = SiteOutcome(site.id, "failed", agreement_id=site.agreement_id or None)
    try:
        r = http.post(
            f"{site.endpoint}/jobs",
            json={"scenario": scenario, "spec": spec},
            headers={"Authorization": f"Bearer {site.token}"},
        )
        out.http_status = r.status_code
        if r.status_code != 200:
            out.detail, out.reasons = _problem(r)
            out.status = "refused" if r.status_code in (401, 403) else "failed"
            return out
        job = r.json()
        out.job_id = job.get("id")
        if job.get("kind") == "glm":
            out.result = job
            out.status = "ok"
            return out
        key = keys.get(site.id) or fetch_public_key(http, site)
        keys[site.id] = key
        payload = verify_envelope(job.get("signed") or {}, key)
        if payload.get("job_id") != out.job_id or (
            site.agreement_id and payload.get("agreement_id") != site.agreement_id
        ):
            out.status, out.detail = "bad-signature", "the signed result is for another job or agreement"
            return out
        out.result = payload
        out.envelope = job.get("signed")
        out.agreement_id = str(payload.get("agreement_id"))
        out.epsilon_spent = float(payload["result"].get("epsilon_spent", 0.0))
        out.status = "ok"
    except httpx.TimeoutException as exc:
        out.status, out.detail = "timeout", f"no answer in time ({type(exc).__name__})"
    except httpx.HTTPError as exc:
        out.status, out.detail = "unreachable", f"{type(exc).__name__}: {exc}"[:300]
    except HealthspaceError as exc:
        out.status, out.detail = "bad-signature", exc.detail
    except (ValueError, KeyError, TypeError) as exc:
        out.status, out.detail = "failed", f"malformed answer ({type(exc).__name__})"
    finally:
        out.elapsed_ms = (time.perf_counter() - t0) * 1000
    return out


def run_study(
    study: Study,
    *,
    timeout_s: float = 30.0,
    connect_timeout_s: float = 5.0,
    http: httpx.Client | None = None,
    public_keys: dict[str, str] | None = None,
) -> StudyResult:
    """Send the study's spec to every site at once; each site has `timeout_s` (read) to answer.

    Never raises for a site's failure: each site's outcome says ok, refused (with the provider's
    reasons), failed, timeout, unreachable or bad-signature, and only verified results are combined.
    `public_keys` (site id → base64url key) pins keys and is filled with the keys fetched.
    """
    keys = public_keys if public_keys is not None else {}
    for s in study.sites:
        if s.public_key is not None:
            keys.setdefault(s.id, s.public_key)
    own = http is None
    client = http or httpx.Client(timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))
    started = utcnow()
    try:
        with ThreadPoolExecutor(max_workers=min(16, len(study.sites))) as pool:
            futures = [
                pool.submit(_call_site, client, s, study.scenario, study.spec, keys) for s in study.sites
            ]
            wait(futures, return_when=FIRST_EXCEPTION)
            outcomes = [f.result() for f in futures]
    finally:
        if own:
            client.close()
    return StudyResult(study.scenario, study.spec, started, utcnow(), outcomes, combine(outcomes))


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
        "note": "quantiles are not poolable from summaries; see each site",
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
    """Combine the verified results per analysis: sums of counts and cells, pooled moments, rates.

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

    def __init__(self, http: httpx.Client, site: Site, job_id: str, analysis: str, key: str) -> None:
        self.http, self.site, self.job_id, self.analysis, self.key = http, site, job_id, analysis, key

    def __call__(self, beta: np.ndarray) -> SiteStats:
        r = self.http.post(
            f"{self.site.endpoint}/glm/{self.job_id}",
            json={"analysis": self.analysis, "beta": [float(b) for b in beta]},
            headers={"Authorization": f"Bearer {self.site.token}"},
        )
        if r.status_code != 200:
            detail, _ = _problem(r)
            raise ValidationError(f"site {self.site.id}: HTTP {r.status_code}: {detail}")
        payload = verify_envelope(r.json(), self.key)
        if payload.get("job_id") != self.job_id or payload.get("beta") != [float(b) for b in beta]:
            raise ValidationError(f"site {self.site.id}: the signed statistics are for another step")
        return SiteStats.from_dict(payload["stats"])


def fit_federated_glm(
    study: Study,
    analysis: str,
    *,
    timeout_s: float = 30.0,
    http: httpx.Client | None = None,
    public_keys: dict[str, str] | None = None,
) -> GlmStudyResult:
    """Open a GLM session at every site, fit by federated IRLS over HTTP, then close the sessions.

    Every site must take part (a fit over fewer sites would silently be a different model): when one
    refuses or fails, the open sessions are cancelled and no fit is returned.
    """
    keys = public_keys if public_keys is not None else {}
    own = http is None
    client = http or httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0))
    try:
        opened = run_study(study, http=client, public_keys=keys).sites
        if not all(o.ok for o in opened):
            for o in opened:
                if o.ok and o.job_id:
                    site = next(s for s in study.sites if s.id == o.site)
                    client.post(
                        f"{site.endpoint}/jobs/{o.job_id}/cancel",
                        headers={"Authorization": f"Bearer {site.token}"},
                    )
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
            callables.append(_HttpGlmSite(client, site, str(o.job_id), analysis, key))
        fit = fit_glm(callables, info["family"], int(info["n_params"]), names=list(info["names"]))
        for o, site in zip(opened, study.sites, strict=True):
            r = client.post(
                f"{site.endpoint}/glm/{o.job_id}/finish", headers={"Authorization": f"Bearer {site.token}"}
            )
            o.http_status = r.status_code
            if r.status_code == 200:
                o.result = verify_envelope(r.json().get("signed") or {}, keys[site.id])
            else:
                o.status, o.detail = "failed", _problem(r)[0]
        return GlmStudyResult(fit, opened)
    finally:
        if own:
            client.close()
