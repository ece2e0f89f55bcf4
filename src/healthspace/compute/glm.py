"""Exact federated GLMs: sites return per-iteration sufficient statistics, a coordinator runs Newton/IRLS."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from healthspace.compute.disclosure import DisclosureError, DisclosureRules
from healthspace.compute.engine import ClinicalEngine
from healthspace.compute.job import authorise
from healthspace.compute.spec import GlmAnalysis, QuerySpec
from healthspace.compute.sql import SqlBuilder
from healthspace.consent.filter import ConsentFilter
from healthspace.core.errors import ValidationError

__all__ = ["Family", "GlmFit", "GlmSite", "Site", "SiteStats", "fit_glm", "site_stats"]

Family = Literal["binomial", "gaussian", "poisson"]


@dataclass(frozen=True)
class SiteStats:
    """What a site releases for one iteration at the coordinator's β: aggregates only.

    xtwx = XᵀWX (pxp), xtwz = XᵀWz (p) with z the working response, n rows, deviance at β.
    """

    n: int
    xtwx: np.ndarray
    xtwz: np.ndarray
    deviance: float

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "xtwx": self.xtwx.tolist(),
            "xtwz": self.xtwz.tolist(),
            "deviance": self.deviance,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> SiteStats:
        return cls(
            int(d["n"]),  # type: ignore[call-overload]
            np.asarray(d["xtwx"], dtype=np.float64),
            np.asarray(d["xtwz"], dtype=np.float64),
            float(d["deviance"]),  # type: ignore[arg-type]
        )


Site = Callable[[np.ndarray], SiteStats]


def site_stats(family: Family, x: np.ndarray, y: np.ndarray, beta: np.ndarray) -> SiteStats:
    """IRLS statistics of one site's design `x` (with intercept column) and outcome `y` at `beta`."""
    eta = x @ beta
    if family == "gaussian":
        w = np.ones_like(eta)
        z = y
        dev = float(np.sum((y - eta) ** 2))
    elif family == "binomial":
        mu = 1.0 / (1.0 + np.exp(-eta))
        mu = np.clip(mu, 1e-15, 1 - 1e-15)
        w = mu * (1 - mu)
        z = eta + (y - mu) / w
        dev = float(-2.0 * np.sum(y * np.log(mu) + (1 - y) * np.log(1 - mu)))
    else:
        mu = np.exp(eta)
        w = mu
        z = eta + (y - mu) / mu
        with np.errstate(divide="ignore", invalid="ignore"):
            term = np.where(y > 0, y * np.log(y / mu), 0.0)
        dev = float(2.0 * np.sum(term - (y - mu)))
    xw = x * w[:, None]
    return SiteStats(len(y), xw.T @ x, xw.T @ z, dev)


@dataclass(frozen=True)
class GlmFit:
    names: list[str]
    coef: np.ndarray
    cov: np.ndarray
    deviance: float
    n: int
    iterations: int
    converged: bool
    scale: float

    @property
    def se(self) -> np.ndarray:
        return np.sqrt(np.diag(self.cov))

    def conf_int(self, z: float = 1.959963984540054) -> np.ndarray:
        return np.column_stack([self.coef - z * self.se, self.coef + z * self.se])

    def to_dict(self) -> dict[str, object]:
        return {
            "names": self.names,
            "coef": self.coef.tolist(),
            "se": self.se.tolist(),
            "deviance": self.deviance,
            "n": self.n,
            "iterations": self.iterations,
            "converged": self.converged,
            "scale": self.scale,
        }


def _pooled(sites: Sequence[Site], beta: np.ndarray) -> SiteStats:
    parts = [site(beta) for site in sites]
    return SiteStats(
        sum(p.n for p in parts),
        sum((p.xtwx for p in parts), np.zeros((len(beta), len(beta)))),
        sum((p.xtwz for p in parts), np.zeros(len(beta))),
        sum(p.deviance for p in parts),
    )


def fit_glm(
    sites: Sequence[Site],
    family: Family,
    n_params: int,
    *,
    names: list[str] | None = None,
    max_iter: int = 50,
    tol: float = 1e-10,
) -> GlmFit:
    """Fit by distributed Newton/IRLS: β ← (Σ XᵀWX)⁻¹ Σ XᵀWz until no coefficient moves more than `tol`.

    `sites` are callables β -> SiteStats (in-process `GlmSite`s, or HTTP calls to providers). The
    pooled statistics equal those of the pooled data, so the fit equals a single-site fit exactly.
    Standard errors use the Fisher information at the final β (dispersion = deviance / (n - p) for
    the Gaussian family).
    """
    if not sites:
        raise ValidationError("fit_glm needs at least one site")
    beta = np.zeros(n_params)
    converged = False
    it = 0
    for step_no in range(1, max_iter + 1):
        it = step_no
        s = _pooled(sites, beta)
        new = np.linalg.solve(s.xtwx, s.xtwz)
        step = float(np.max(np.abs(new - beta)))
        beta = new
        if step < tol:
            converged = True
            break
    final = _pooled(sites, beta)
    scale = final.deviance / (final.n - n_params) if family == "gaussian" else 1.0
    cov = np.linalg.inv(final.xtwx) * scale
    labels = names or [f"x{i}" for i in range(n_params)]
    return GlmFit(labels, beta, cov, final.deviance, final.n, it, converged, scale)


class GlmSite:
    """One provider's side of a federated GLM over its consenting cohort.

    Construction runs the cohort and design queries once and applies the disclosure checks
    (rows ≥ minimum cohort, parameters ≤ ratio x rows, for a binomial outcome both outcome levels
    present and no empty cell between the outcome and any binary covariate); each call then returns
    only the aggregates of `site_stats` for the β it is given.
    """

    def __init__(
        self,
        engine: ClinicalEngine,
        consent: ConsentFilter,
        spec: QuerySpec,
        analysis_id: str,
        rules: DisclosureRules,
    ) -> None:
        authorise(spec, rules)
        found = [a for a in spec.analyses if a.id == analysis_id]
        if not found or not isinstance(found[0], GlmAnalysis):
            raise ValidationError(f"the spec has no glm analysis {analysis_id!r}")
        a: GlmAnalysis = found[0]
        self.family: Family = a.family
        b = SqlBuilder(engine.dialect)
        engine.set_consent(consent)
        engine.materialise(b.cohort(spec))
        data = engine.matrix(b.design(a.outcome, a.covariates))
        n = data.shape[0]
        self.n_params = len(a.covariates) + 1
        self.names = ["intercept", *(_label(v.kind, i) for i, v in enumerate(a.covariates))]
        y = data[:, 0] if n else np.zeros(0)
        x = np.column_stack([np.ones(n), data[:, 1:]]) if n else np.zeros((0, self.n_params))
        _check(self.family, x, y, self.n_params, rules)
        self._x, self._y = x, y

    @property
    def rows(self) -> int:
        return int(self._x.shape[0])

    def design_digest(self) -> str:
        """SHA-256 of the design (outcome and covariates) in row-order-free form: a session rebuilt
        after a restart can prove it iterates on the same data (a query returns rows in any order)."""
        data = np.column_stack([self._y, self._x]) if self.rows else np.zeros((0, self.n_params + 1))
        ordered = data[np.lexsort(data.T[::-1])] if self.rows else data
        return hashlib.sha256(np.ascontiguousarray(ordered, dtype=np.float64).tobytes()).hexdigest()

    def __call__(self, beta: np.ndarray) -> SiteStats:
        beta = np.asarray(beta, dtype=np.float64)
        if beta.shape != (self.n_params,) or not np.all(np.isfinite(beta)):
            raise ValidationError(f"beta must be {self.n_params} finite numbers")
        return site_stats(self.family, self._x, self._y, beta)


def _label(kind: str, i: int) -> str:
    return f"{kind}_{i}"


def _check(family: Family, x: np.ndarray, y: np.ndarray, p: int, rules: DisclosureRules) -> None:
    n = len(y)
    if n < rules.cohort_floor:
        raise DisclosureError(
            f"glm: {n} complete cases, below the minimum of {rules.cohort_floor}", rule="min-cohort"
        )
    if p > rules.glm_max_param_ratio * n:
        raise DisclosureError(
            f"glm: {p} parameters for {n} rows exceeds {rules.glm_max_param_ratio:g} x rows",
            rule="glm-saturation",
        )
    if family == "binomial":
        if not np.all((y == 0) | (y == 1)):
            raise ValidationError("glm: a binomial outcome must be 0/1")
        ones = int(y.sum())
        if ones == 0 or ones == n:
            raise DisclosureError("glm: one outcome level is empty at this site", rule="glm-empty-cell")
        for j in range(1, x.shape[1]):
            col = x[:, j]
            if np.all((col == 0) | (col == 1)):
                for cv in (0.0, 1.0):
                    for yv in (0.0, 1.0):
                        if not np.any((col == cv) & (y == yv)):
                            raise DisclosureError(
                                f"glm: covariate {j} x outcome has an empty cell at this site",
                                rule="glm-empty-cell",
                            )
    if family == "poisson" and (np.any(y < 0) or not np.all(np.floor(y) == y)):
        raise ValidationError("glm: a poisson outcome must be a non-negative count")
