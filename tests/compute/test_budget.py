"""The privacy budget ledger on SQLite and PostgreSQL, and the job refusal when the budget is spent."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from healthspace.compute import (
    BudgetExhaustedError,
    BudgetKey,
    BudgetLedger,
    DisclosureRules,
    DuckDBEngine,
    JobContext,
    parse_spec,
    run_job,
)
from healthspace.consent.filter import ConsentFilter
from healthspace.core.db import Database
from healthspace.core.errors import ConflictError

KEY = BudgetKey("uni-hk", "diabetes-outcomes-research", "gz-t2d")


@pytest.fixture
def ledger(make_db: Callable[..., Database]) -> BudgetLedger:
    return BudgetLedger(make_db("compute"))


def test_spends_accumulate(ledger: BudgetLedger) -> None:
    ledger.spend(KEY, 1.0, 3.0, "j1")
    assert ledger.spend(KEY, 0.5, 3.0, "j2") == 1.5
    assert ledger.remaining(KEY, 3.0) == 1.5


def test_overspend_is_refused_and_not_recorded(ledger: BudgetLedger) -> None:
    ledger.spend(KEY, 2.5, 3.0, "j1")
    with pytest.raises(BudgetExhaustedError, match=r"requested ε=1 with ε=2\.5 spent of ε=3"):
        ledger.spend(KEY, 1.0, 3.0, "j2")
    assert ledger.spent(KEY) == 2.5


def test_budget_can_be_spent_exactly(ledger: BudgetLedger) -> None:
    for i in range(10):
        ledger.spend(KEY, 0.3, 3.0, f"j{i}")
    with pytest.raises(BudgetExhaustedError):
        ledger.spend(KEY, 0.000001, 3.0, "last")


def test_same_job_is_not_charged_twice(ledger: BudgetLedger) -> None:
    ledger.spend(KEY, 1.0, 3.0, "j1")
    with pytest.raises(ConflictError):
        ledger.spend(KEY, 1.0, 3.0, "j1")
    assert ledger.spent(KEY) == 1.0


def test_accounts_are_separate_per_consumer(ledger: BudgetLedger) -> None:
    ledger.spend(KEY, 3.0, 3.0, "j1")
    other = BudgetKey("biopharma", KEY.scenario_id, KEY.dataset_id)
    assert ledger.spend(other, 3.0, 3.0, "j2") == 3.0


def test_concurrent_spenders_never_overspend(ledger: BudgetLedger) -> None:
    errors: list[Exception] = []

    def spend(i: int) -> None:
        try:
            ledger.spend(KEY, 1.0, 3.0, f"c{i}")
        except BudgetExhaustedError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.spent(KEY) == 3.0
    assert len(errors) == 3


def test_job_is_refused_once_the_budget_is_spent(
    sqlite_url: str, gz_engine: DuckDBEngine, gz_consent: ConsentFilter, tmp_path: Path
) -> None:
    db = Database(sqlite_url, branches=["compute"])
    ledger = BudgetLedger(db)
    rules = DisclosureRules(epsilon_total=1.0)
    spec = parse_spec({"version": 1, "analyses": [{"type": "count", "id": "n"}], "privacy": {"epsilon": 0.4}})
    ctx = lambda i: JobContext(f"job-{i}", KEY.consumer_id, KEY.scenario_id, KEY.dataset_id)  # noqa: E731
    assert run_job(spec, gz_engine, gz_consent, rules, ctx(1), ledger=ledger).epsilon_spent == 0.4
    run_job(spec, gz_engine, gz_consent, rules, ctx(2), ledger=ledger)
    with pytest.raises(BudgetExhaustedError):
        run_job(spec, gz_engine, gz_consent, rules, ctx(3), ledger=ledger)
    assert ledger.spent(KEY) == 0.8
    db.dispose()
