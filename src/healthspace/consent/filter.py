"""The consent filter: the consenting person ids, shaped for a set-based join in the clinical engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import duckdb
import pyarrow as pa

__all__ = ["ConsentFilter"]


@dataclass(frozen=True, slots=True)
class ConsentFilter:
    """The patients whose consent covers `scenario_id` for `data_classes` at `at`.

    `person_ids` is a sorted, duplicate-free int64 Arrow array. Use it as a join, never as a per-patient
    loop: `register(con)` makes it a DuckDB relation, then
    `SELECT ... FROM measurement m JOIN consenting c USING (person_id)`.
    """

    scenario_id: str
    at: datetime
    data_classes: frozenset[str]
    person_ids: pa.Array

    @classmethod
    def of(
        cls, scenario_id: str, at: datetime, data_classes: frozenset[str], ids: Sequence[int]
    ) -> ConsentFilter:
        return cls(scenario_id, at, data_classes, pa.array(ids, type=pa.int64()))

    def __len__(self) -> int:
        return len(self.person_ids)

    def table(self) -> pa.Table:
        """A one-column Arrow table (`person_id`), usable as a join relation by DuckDB or PyArrow."""
        return pa.table({"person_id": self.person_ids})

    def register(self, con: duckdb.DuckDBPyConnection, name: str = "consenting") -> str:
        """Register the cohort as relation `name` on `con` (zero-copy); returns the name."""
        if not name.isidentifier():
            raise ValueError(f"relation name {name!r} is not an identifier")
        con.register(name, self.table())
        return name
