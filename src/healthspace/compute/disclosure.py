"""Disclosure control: agreement rules, cell suppression (primary, secondary), rounding, DP noise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import opendp.prelude as dp

from healthspace.core.errors import ConfigurationError, ForbiddenError

__all__ = [
    "DisclosureError",
    "DisclosureRules",
    "Grid",
    "dp_counts",
    "primary_suppression",
    "round_to",
    "secondary_suppression",
]

dp.enable_features("contrib")


class DisclosureError(ForbiddenError):
    """The result would disclose too much (a cohort too small, a differencing pattern, a GLM too small)."""

    code = "disclosure-refused"
    title = "Result refused by disclosure control"


@dataclass(frozen=True, slots=True)
class DisclosureRules:
    """What the agreement (and the provider's own rules) impose on every job.

    min_cell_size   published counts 0 < n < k are suppressed (the ODRL `minCellSize`)
    rounding_base   published counts are rounded to a multiple of this (1 = no rounding)
    min_cohort_size a cohort below this is refused outright (defaults to min_cell_size)
    min_difference  a person set differing from a recent one by 0 < d < this is refused (defaults to k)
    epsilon_total   the ODRL `privacyBudget`: when set, every job must be differentially private and
                    is charged to the budget ledger
    output_types    the ODRL `outputType` values allowed ("aggregate"; "model" for GLMs)
    analyses        analysis types allowed, None for all
    glm_max_param_ratio  parameters ≤ ratio x rows at each site (DataSHIELD's nfilter.glm)
    """

    min_cell_size: int = 10
    rounding_base: int = 1
    min_cohort_size: int | None = None
    min_difference: int | None = None
    epsilon_total: float | None = None
    output_types: frozenset[str] = frozenset({"aggregate"})
    analyses: frozenset[str] | None = None
    glm_max_param_ratio: float = 0.33

    def __post_init__(self) -> None:
        if self.min_cell_size < 1 or self.rounding_base < 1:
            raise ConfigurationError("min_cell_size and rounding_base must be at least 1")
        if self.epsilon_total is not None and not self.epsilon_total > 0:
            raise ConfigurationError("epsilon_total must be positive when set")
        if not 0 < self.glm_max_param_ratio <= 1:
            raise ConfigurationError("glm_max_param_ratio must be in (0, 1]")

    @property
    def cohort_floor(self) -> int:
        return self.min_cohort_size if self.min_cohort_size is not None else self.min_cell_size

    @property
    def difference_floor(self) -> int:
        return self.min_difference if self.min_difference is not None else self.min_cell_size


def round_to(n: int, base: int) -> int:
    """Round half up to a multiple of `base` (deterministic, so repeating a query reveals nothing new)."""
    return math.floor(n / base + 0.5) * base if base > 1 else n


@dataclass
class Grid:
    """A table of counts with its margins: `cells[r][c]`, row totals, column totals and a grand total.

    A one-way table is a single row. `hidden` marks suppressed entries as (r, c), with r == R for the
    column-total row and c == C for the row-total column.
    """

    cells: list[list[int]]
    hidden: set[tuple[int, int]] = field(default_factory=set)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.cells), len(self.cells[0])

    def value(self, r: int, c: int) -> int:
        rows, cols = self.shape
        if r < rows and c < cols:
            return self.cells[r][c]
        if r < rows:
            return sum(self.cells[r])
        if c < cols:
            return sum(row[c] for row in self.cells)
        return sum(sum(row) for row in self.cells)

    def entries(self) -> list[tuple[int, int]]:
        """Every published entry; a one-way table has no column-total row (it would repeat the cells)."""
        rows, cols = self.shape
        last = rows + 1 if rows > 1 else 1
        return [(r, c) for r in range(last) for c in range(cols + 1)]

    def lines(self) -> list[list[tuple[int, int]]]:
        """Every additive relation: each row with its total, each column with its total, and the margins."""
        rows, cols = self.shape
        if rows == 1:
            return [[(0, c) for c in range(cols + 1)]]
        out = [[(r, c) for c in range(cols + 1)] for r in range(rows + 1)]
        out += [[(r, c) for r in range(rows + 1)] for c in range(cols + 1)]
        return out


def primary_suppression(grid: Grid, k: int) -> None:
    for r, c in grid.entries():
        if 0 < grid.value(r, c) < k:
            grid.hidden.add((r, c))


def secondary_suppression(grid: Grid) -> None:
    """Hide more entries until no additive line has exactly one hidden entry.

    A line with a single hidden entry gives it away by subtraction. The complement chosen is the
    smallest visible non-zero interior cell of the line (then a zero cell, then a margin), the usual
    heuristic that loses least information. Repeats until stable, since each new hiding may expose
    another line.
    """
    rows, cols = grid.shape
    changed = True
    while changed:
        changed = False
        for line in grid.lines():
            hidden = [e for e in line if e in grid.hidden]
            if len(hidden) != 1:
                continue
            visible = [e for e in line if e not in grid.hidden]
            if not visible:
                continue

            def rank(e: tuple[int, int]) -> tuple[int, int, int]:
                is_margin = int(e[0] == rows or e[1] == cols)
                v = grid.value(*e)
                return (is_margin, int(v == 0), v)

            grid.hidden.add(min(visible, key=rank))
            changed = True


def _laplace_scale(epsilon: float) -> float:
    # Each person is in one cell: adding or removing one changes the L1 norm by 1.
    return 1.0 / epsilon


def dp_counts(
    counts: Sequence[int],
    epsilon: float,
    mechanism: Literal["laplace", "gaussian"] = "laplace",
    delta: float = 1e-7,
) -> list[int]:
    """Counts of disjoint groups with integer noise from OpenDP's discrete Laplace or discrete Gaussian.

    The measurement is built for sensitivity 1 (one person in one group) and its privacy loss is
    checked with OpenDP's own map before sampling; a mechanism that would exceed `epsilon` (or
    (ε, δ) for the Gaussian) is never sampled.
    """
    space = (
        dp.vector_domain(dp.atom_domain(T=int)),
        (dp.l1_distance(T=int) if mechanism == "laplace" else dp.l2_distance(T=int)),
    )
    if mechanism == "laplace":
        meas = dp.m.make_laplace(*space, scale=_laplace_scale(epsilon))
        loss = float(meas.map(1))  # type: ignore[no-untyped-call]
        if loss > epsilon * (1 + 1e-9):
            raise ConfigurationError(f"Laplace mechanism would spend ε={loss}, above {epsilon}")
    else:

        def approx(scale: float) -> dp.Measurement:
            gauss = dp.m.make_gaussian(*space, scale=scale)
            return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(gauss), delta)

        scale = dp.binary_search_param(approx, d_in=1, d_out=(epsilon, delta))
        meas = dp.m.make_gaussian(*space, scale=scale)
        eps_used, _ = approx(scale).map(1)  # type: ignore[no-untyped-call]
        if eps_used > epsilon * (1 + 1e-9):
            raise ConfigurationError(f"Gaussian mechanism would spend ε={eps_used}, above {epsilon}")
    noisy = meas([int(c) for c in counts])
    return [int(v) for v in np.asarray(noisy, dtype=np.int64)]
