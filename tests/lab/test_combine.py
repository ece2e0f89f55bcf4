"""Combining Kaplan-Meier tables and quantiles across sites, against truth computed on pooled data."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from healthspace.compute import DuckDBEngine, parse_spec
from healthspace.compute.sql import SqlBuilder
from healthspace.connector.dataplane import data_classes_of
from healthspace.data.keys import LocalKeyStore
from healthspace.data.store import ClinicalStore
from healthspace.lab import Site, SiteOutcome, Study, combine, run_study
from tests.dataplane.provider import SCENARIO, Provider

WIDTH, HORIZON = 365, 1825


def removed_bin(t: float, ev: int, width: int = WIDTH, horizon: int = HORIZON) -> int | None:
    """The bin in which a person leaves the risk set, or None if they are still at risk at the horizon."""
    if t < horizon or (t == horizon and ev == 1):
        return min(int(t // width), horizon // width - (0 if horizon % width else 1))
    return None


def pooled_life_table(
    people: list[tuple[float, int]], bounds: list[int]
) -> list[tuple[int, int, int, float]]:
    """Product-limit over the pooled persons with events grouped into [bounds[i], bounds[i+1]):
    n = persons not removed before the interval, d = events in it; S *= 1 - d/n. Returns (n, d, c, S)."""
    out, surv = [], 1.0
    for lo, hi in itertools.pairwise(bounds):
        n = d = c = 0
        for t, ev in people:
            b = removed_bin(t, ev)
            start = None if b is None else b * WIDTH
            if start is None or start >= lo:
                n += 1
            if start is not None and lo <= start < hi:
                d += ev
                c += 1 - ev
        surv *= 1 - d / n
        out.append((n, d, c, surv))
    return out


def site_table(
    people: list[tuple[float, int]], merge: set[int] = frozenset(), hide_from: int | None = None
) -> dict[str, Any]:  # type: ignore[assignment]
    """A site's published life table in the data plane's shape; bins in `merge` join the one before,
    and from bin `hide_from` on the table is suppressed (one hidden row, then nothing)."""
    nbins = HORIZON // WIDTH
    d, c = [0] * nbins, [0] * nbins
    for t, ev in people:
        b = removed_bin(t, ev)
        if b is not None:
            d[b] += ev
            c[b] += 1 - ev
    spans: list[list[int]] = []
    for j in range(nbins):
        if j in merge and spans:
            spans[-1][1], spans[-1][2], spans[-1][3] = j, spans[-1][2] + d[j], spans[-1][3] + c[j]
        else:
            spans.append([j, j, d[j], c[j]])
    rows, at_risk, surv = [], len(people), 1.0
    for first, last, ev, cens in spans:
        if hide_from is not None and first >= hide_from:
            rows.append(
                {
                    "from_day": first * WIDTH,
                    "to_day": (last + 1) * WIDTH,
                    "at_risk": None,
                    "events": None,
                    "censored": None,
                    "survival": None,
                }
            )
            break
        surv *= 1 - ev / at_risk
        rows.append(
            {
                "from_day": first * WIDTH,
                "to_day": (last + 1) * WIDTH,
                "at_risk": at_risk,
                "events": ev,
                "censored": cens,
                "survival": surv,
            }
        )
        at_risk -= ev + cens
    return {"type": "kaplan_meier", "persons": len(people), "intervals": rows}


def outcome(site: str, analyses: dict[str, Any]) -> SiteOutcome:
    return SiteOutcome(site, "ok", result={"result": {"analyses": analyses}})


def random_people(rng: np.random.Generator, n: int, scale: float) -> list[tuple[float, int]]:
    event = rng.exponential(scale, n).round()
    censor = rng.uniform(100, 2500, n).round()
    return [(float(min(e, c)), int(e <= c)) for e, c in zip(event, censor, strict=True)]


def check(combined: dict[str, Any], pooled: list[tuple[float, int]]) -> None:
    rows = combined["intervals"]
    bounds = [rows[0]["from_day"], *[r["to_day"] for r in rows]]
    truth = pooled_life_table(pooled, bounds)
    got = [(r["at_risk"], r["events"], r["censored"], r["survival"]) for r in rows]
    assert [g[:3] for g in got] == [t[:3] for t in truth]
    np.testing.assert_allclose([g[3] for g in got], [t[3] for t in truth], rtol=0, atol=1e-12)


def test_km_over_sites_sharing_intervals_is_the_pooled_life_table() -> None:
    rng = np.random.default_rng(7)
    people = [random_people(rng, n, s) for n, s in ((400, 1500), (700, 2500), (300, 900))]
    combined = combine([outcome(f"s{i}", {"km": site_table(p)}) for i, p in enumerate(people)])["km"]
    assert (combined["exact"], combined["intervals_shared"], combined["truncated"]) == (True, True, False)
    assert [r["from_day"] for r in combined["intervals"]] == [0, 365, 730, 1095, 1460]
    check(combined, [x for p in people for x in p])


def test_km_with_merged_bins_uses_the_common_coarser_intervals() -> None:
    rng = np.random.default_rng(8)
    people = [random_people(rng, n, s) for n, s in ((400, 1500), (700, 2500), (300, 900))]
    tables = [site_table(people[0]), site_table(people[1], merge={2}), site_table(people[2], merge={4})]
    combined = combine([outcome(f"s{i}", {"km": t}) for i, t in enumerate(tables)])["km"]
    assert [r["from_day"] for r in combined["intervals"]] == [0, 365, 1095]
    assert combined["intervals_shared"] is False
    check(combined, [x for p in people for x in p])


def test_km_stops_where_a_site_hid_its_tail() -> None:
    rng = np.random.default_rng(9)
    people = [random_people(rng, n, s) for n, s in ((400, 1500), (700, 2500))]
    tables = [site_table(people[0]), site_table(people[1], hide_from=3)]
    combined = combine([outcome(f"s{i}", {"km": t}) for i, t in enumerate(tables)])["km"]
    assert [r["to_day"] for r in combined["intervals"]][-1] == 1095
    assert combined["truncated"] is True
    check(combined, [x for p in people for x in p])


def test_pooled_quantiles_lie_within_their_bounds_and_say_approximate() -> None:
    rng = np.random.default_rng(10)
    levels = [0.1, 0.25, 0.5, 0.75, 0.9]
    samples = [rng.normal(mu, sd, n) for mu, sd, n in ((6.5, 1.0, 500), (7.2, 1.4, 900), (5.9, 0.8, 300))]
    parts = [
        {
            "type": "measurement_summary",
            "n": len(x),
            "mean": float(x.mean()),
            "variance": float(x.var(ddof=1)),
            "quantiles": levels,
            "values": [float(v) for v in np.quantile(x, levels)],
        }
        for x in samples
    ]
    got = combine([outcome(f"s{i}", {"m": p}) for i, p in enumerate(parts)])["m"]
    pooled = np.concatenate(samples)
    truth = np.quantile(pooled, levels)
    q = got["quantiles"]
    assert q["exact"] is False
    assert np.all(np.asarray(q["lower"]) <= truth + 1e-9)
    assert np.all(truth <= np.asarray(q["upper"]) + 1e-9)
    assert np.all(np.asarray(q["lower"]) <= np.asarray(q["estimate"]))
    assert np.all(np.asarray(q["estimate"]) <= np.asarray(q["upper"]))
    # the estimate is much closer than the bracket is wide (an approximation, not a guarantee)
    assert np.max(np.abs(np.asarray(q["estimate"]) - truth)) < 0.1
    assert got["mean"] == pytest.approx(pooled.mean(), rel=1e-12)
    assert got["variance"] == pytest.approx(pooled.var(ddof=1), rel=1e-9)


# --- end to end over three data planes ------------------------------------------------------------

KM_SPEC: dict[str, Any] = {
    "version": 1,
    "analyses": [
        {
            "type": "kaplan_meier",
            "id": "km",
            "outcome": {"domain": "condition", "codes": ["E11"], "match": "prefix"},
            "interval_days": WIDTH,
            "horizon_days": HORIZON,
        }
    ],
}


def follow_up(p: Provider) -> list[tuple[float, int]]:
    """The site's per-person (days at risk, event) on its consenting cohort, read from its store."""
    spec = parse_spec(KM_SPEC)
    consent = p.consent.cohort(SCENARIO, data_classes_of(spec), actor="test", at=p.clock.now())
    with ClinicalStore.open(p.store_path, LocalKeyStore(p.keys_dir)) as store:
        engine = DuckDBEngine(store.connect())
        b = SqlBuilder(engine.dialect)
        engine.set_consent(consent)
        engine.materialise(b.cohort(spec))
        rows = engine.rows(SqlBuilder(engine.dialect).follow_up(spec.analyses[0].outcome))  # type: ignore[union-attr]
    return [(float(t), int(ev)) for t, ev in rows]


def test_km_over_three_http_sites_is_the_pooled_life_table(providers: dict[str, Provider]) -> None:
    sites = []
    for p in providers.values():
        if "agr-km" not in p.agreements:
            p.add_agreement("agr-km")
        sites.append(Site(p.id, f"{p.url}/dataplane", p.token("agr-km"), "agr-km"))
    result = run_study(Study(SCENARIO, KM_SPEC, sites))
    assert result.complete, [(s.site, s.status, s.detail) for s in result.sites]
    combined = result.combined["km"]
    # Sites merge sparse bins differently (here one site publishes a single 5-year span), so the
    # common intervals may be few; the pure tests above cover several shared and merged intervals.
    assert combined["intervals"], combined
    assert combined["persons"] == sum(len(follow_up(p)) for p in providers.values())
    check(combined, [x for p in providers.values() for x in follow_up(p)])
