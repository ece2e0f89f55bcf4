"""Tail bounds of the discrete Laplace noise the providers add, for tests that check noisy releases."""

from __future__ import annotations

import math

import numpy as np


def laplace_noise_bound(epsilon: float, p: float = 1e-9, terms: int = 1) -> int:
    """The smallest b with P(|X_1 + ... + X_terms| > b) < p, X_i iid discrete Laplace of scale 1/epsilon.

    P(X = x) is proportional to exp(-epsilon |x|) (OpenDP's `make_laplace` on integers at scale
    1/epsilon, the mechanism of `dp_counts` for a sensitivity-1 count). The bound is Chernoff's,
    2 min_t exp(-t b) M(t)^terms with M(t) = (1 - a)^2 / ((1 - a e^t)(1 - a e^-t)), a = exp(-epsilon);
    any t in (0, epsilon) gives a valid bound, so a grid of t is enough.
    """
    a = math.exp(-epsilon)
    t = np.linspace(epsilon / 400, epsilon * (1 - 1 / 400), 399)
    log_m = 2 * math.log1p(-a) - np.log1p(-a * np.exp(t)) - np.log1p(-a * np.exp(-t))
    b = 0
    # P(|S| > b) = P(|S| >= b + 1) <= 2 min_t exp(-t (b + 1) + terms log M(t))
    while math.log(2) + float(np.min(-t * (b + 1) + terms * log_m)) >= math.log(p):
        b += 1
    return b
