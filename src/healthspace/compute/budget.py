"""The privacy budget ledger: ε spent per consumer x scenario x dataset, charged atomically before release."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from healthspace.compute.tables import BudgetAccountRow, BudgetSpendRow
from healthspace.core.clock import utcnow
from healthspace.core.db import Database
from healthspace.core.errors import ConflictError, ForbiddenError, ValidationError

__all__ = ["MICRO", "BudgetExhaustedError", "BudgetKey", "BudgetLedger"]

MICRO = 1_000_000

_ACCOUNTS = cast(Table, BudgetAccountRow.__table__)
# Read on every job (the data plane's decision): a Core statement built once, not an ORM identity load.
_SPENT = select(_ACCOUNTS.c.spent_micro).where(
    _ACCOUNTS.c.consumer_id == bindparam("b_consumer"),
    _ACCOUNTS.c.scenario_id == bindparam("b_scenario"),
    _ACCOUNTS.c.dataset_id == bindparam("b_dataset"),
)


class BudgetExhaustedError(ForbiddenError):
    code = "privacy-budget-exhausted"
    title = "Privacy budget exhausted"


@dataclass(frozen=True, slots=True)
class BudgetKey:
    consumer_id: str
    scenario_id: str
    dataset_id: str


def _charge(epsilon: float) -> int:
    # Charges round up and limits round down, so rounding never lets a job overspend.
    return math.ceil(epsilon * MICRO - 1e-6)


def _limit(epsilon: float) -> int:
    return math.floor(epsilon * MICRO + 1e-6)


class BudgetLedger:
    """SQL ledger (branch "compute"; SQLite or PostgreSQL).

    Contract: `spend` MUST refuse (BudgetExhaustedError, nothing recorded) when the charge would take the
    account above `limit`; MUST refuse a job id already charged (ConflictError); MUST be atomic under
    concurrent spenders: the check and the increment are one conditional UPDATE, so two jobs can never
    both fit into the last bit of budget.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def spent(self, key: BudgetKey, session: Session | None = None) -> float:
        """ε spent so far; read in `session` when given (a caller's transaction), else in its own."""
        if session is not None:
            return self._spent(session, key)
        with self.db.session() as s:
            return self._spent(s, key)

    @staticmethod
    def _spent(s: Session, key: BudgetKey) -> float:
        micro = s.execute(
            _SPENT,
            {"b_consumer": key.consumer_id, "b_scenario": key.scenario_id, "b_dataset": key.dataset_id},
        ).scalar_one_or_none()
        return 0.0 if micro is None else int(micro) / MICRO

    def remaining(self, key: BudgetKey, limit: float) -> float:
        return max(0.0, (_limit(limit) - round(self.spent(key) * MICRO)) / MICRO)

    def spend(
        self, key: BudgetKey, epsilon: float, limit: float, job_id: str, now: datetime | None = None
    ) -> float:
        """Charge `epsilon` for `job_id`; returns the ε spent after the charge."""
        if not (epsilon > 0 and math.isfinite(epsilon)) or not (limit > 0 and math.isfinite(limit)):
            raise ValidationError("epsilon and limit must be positive finite numbers")
        at = now or utcnow()
        charge, cap = _charge(epsilon), _limit(limit)
        pk = (key.consumer_id, key.scenario_id, key.dataset_id)
        with self.db.session() as s:
            if s.get(BudgetAccountRow, pk) is None:
                try:
                    with s.begin_nested():
                        s.add(
                            BudgetAccountRow(
                                consumer_id=key.consumer_id,
                                scenario_id=key.scenario_id,
                                dataset_id=key.dataset_id,
                                spent_micro=0,
                                updated_at=at,
                            )
                        )
                except IntegrityError:
                    pass  # another job opened the account first; the conditional update below decides
            acc = BudgetAccountRow
            res = s.execute(
                update(acc)
                .where(
                    acc.consumer_id == key.consumer_id,
                    acc.scenario_id == key.scenario_id,
                    acc.dataset_id == key.dataset_id,
                    acc.spent_micro + charge <= cap,
                )
                .values(spent_micro=acc.spent_micro + charge, updated_at=at)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                spent = s.execute(
                    select(acc.spent_micro).where(
                        acc.consumer_id == key.consumer_id,
                        acc.scenario_id == key.scenario_id,
                        acc.dataset_id == key.dataset_id,
                    )
                ).scalar_one()
                raise BudgetExhaustedError(
                    f"privacy budget exhausted: requested ε={epsilon:g} with ε={spent / MICRO:g} spent "
                    f"of ε={limit:g} for this consumer, scenario and dataset"
                )
            try:
                with s.begin_nested():
                    s.add(
                        BudgetSpendRow(
                            job_id=job_id,
                            consumer_id=key.consumer_id,
                            scenario_id=key.scenario_id,
                            dataset_id=key.dataset_id,
                            epsilon_micro=charge,
                            spent_at=at,
                        )
                    )
            except IntegrityError:
                raise ConflictError(f"job {job_id!r} has already been charged") from None
            total = s.execute(
                select(acc.spent_micro).where(
                    acc.consumer_id == key.consumer_id,
                    acc.scenario_id == key.scenario_id,
                    acc.dataset_id == key.dataset_id,
                )
            ).scalar_one()
            return int(total) / MICRO
