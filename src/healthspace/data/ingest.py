"""Streaming ingestion of FHIR R4 (Bulk NDJSON and Bundles) into the clinical store, with validation.

Records are read in chunks (50,000 by default), parsed with orjson and flattened by `fhir.MAPPERS`; each
chunk then goes through DuckDB as Arrow: the standard profile's rules are evaluated set-based, valid rows are
mapped to OMOP and de-duplicated on their natural key (the FHIR logical id), failing rows go to the
quarantine with every reason. A whole call is one batch: it commits at the end or not at all, and the same
content ingested again is recognised and adds nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from healthspace.core.clock import utcnow
from healthspace.core.errors import ValidationError
from healthspace.core.ids import person_id_for
from healthspace.data.fhir import FHIR_R4_RESOURCE_TYPES, MAPPERS, NOT_CLINICAL, STAGING, SYSTEMS
from healthspace.data.profile import StandardProfile, default_profile
from healthspace.data.schema import (
    CDM_TABLES,
    CONCEPT_EHR,
    CONCEPT_EHR_PRESCRIPTION,
    arrow_schema,
)
from healthspace.data.store import QUARANTINE_SCHEMA, BatchWriter, ClinicalStore

__all__ = [
    "CHUNK_RECORDS",
    "IngestReport",
    "ingest_bundle",
    "ingest_ndjson",
    "ingest_records",
    "person_id_for",
]

CHUNK_RECORDS = 50_000
_FLUSH_ROWS = 250_000
_LOINC = "http://loinc.org"
BUNDLE_TYPES = frozenset({"transaction", "batch", "collection"})

Record = tuple[int, int, bytes]  # (source index, line or entry number from 1, raw JSON)


class IngestReport(BaseModel):
    """What one ingest did. `rules` counts records failing each rule (a record may fail several)."""

    batch_id: str
    dataset_id: str
    profile: str
    sources: list[str]
    already_ingested: bool = False
    read: int = 0
    resources: dict[str, int] = Field(default_factory=dict)
    inserted: dict[str, int] = Field(default_factory=dict)
    duplicates: int = 0
    rejected: int = 0
    rules: dict[str, int] = Field(default_factory=dict)
    unmapped: dict[str, int] = Field(default_factory=dict)
    not_clinical: dict[str, int] = Field(default_factory=dict)
    warnings: dict[str, int] = Field(default_factory=dict)
    quarantine_ids: list[str] = Field(default_factory=list, description="first 1,000 only")
    started_at: datetime
    finished_at: datetime | None = None

    @property
    def seconds(self) -> float:
        return ((self.finished_at or utcnow()) - self.started_at).total_seconds()

    @property
    def accepted(self) -> int:
        return sum(self.inserted.values())


# --- SQL building ------------------------------------------------------------------------------------


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _lits(values: Iterable[str]) -> str:
    return ", ".join(_lit(v) for v in values)


_MACROS = [
    "CREATE MACRO hs_key(x) AS CAST(md5_number_upper(x) >> 1 AS BIGINT)",
    "CREATE MACRO hs_ts(x) AS TRY_CAST(CASE length(x) WHEN 4 THEN x || '-01-01' WHEN 7 THEN x || '-01' "
    "ELSE x END AS TIMESTAMPTZ)",
    "CREATE MACRO hs_date(x) AS CAST(hs_ts(left(x, 10)) AS DATE)",
    "CREATE MACRO hs_vocab(x) AS CASE x "
    + " ".join(f"WHEN {_lit(k)} THEN {_lit(v)}" for k, v in SYSTEMS.items())
    + " ELSE x END",
]

# Staging date columns per type, with the FHIR element they come from (for messages).
_DATES: dict[str, dict[str, str]] = {
    "Patient": {"birth_date": "birthDate", "deceased_dt": "deceasedDateTime"},
    "Encounter": {"start": "period.start", "end": "period.end"},
    "Condition": {"onset": "onset[x]", "abatement": "abatement[x]"},
    "Observation": {"effective": "effective[x]"},
    "MedicationRequest": {
        "authored": "authoredOn",
        "validity_start": "dispenseRequest.validityPeriod.start",
        "validity_end": "dispenseRequest.validityPeriod.end",
    },
    "Procedure": {"performed": "performed[x]", "performed_end": "performedPeriod.end"},
}

_KEY = {
    "person": "person_id",
    "death": "person_id",
    "visit_occurrence": "visit_occurrence_id",
    "condition_occurrence": "condition_occurrence_id",
    "drug_exposure": "drug_exposure_id",
    "measurement": "measurement_id",
    "procedure_occurrence": "procedure_occurrence_id",
}

_OPT_VISIT = "CASE WHEN s.encounter IS NOT NULL THEN hs_key(s.encounter) END"

# OMOP columns per output (table, FHIR type, extra row filter); columns not named are NULL.
_OUTPUTS: list[tuple[str, str, str, dict[str, str]]] = [
    (
        "person",
        "Patient",
        "",
        {
            "person_id": "hs_key('Patient/' || s.id)",
            "gender_concept_id": "CASE s.gender WHEN 'male' THEN 8507 WHEN 'female' THEN 8532 ELSE 0 END",
            "year_of_birth": "year(hs_date(s.birth_date))",
            "month_of_birth": "CASE WHEN length(s.birth_date) >= 7 THEN month(hs_date(s.birth_date)) END",
            "day_of_birth": "CASE WHEN length(s.birth_date) >= 10 THEN day(hs_date(s.birth_date)) END",
            "birth_datetime": "CASE WHEN length(s.birth_date) >= 10 THEN hs_ts(s.birth_date) END",
            "race_concept_id": "0",
            "ethnicity_concept_id": "0",
            "person_source_value": "left(s.identifier_value, 50)",
            "gender_source_value": "s.gender",
            "hs_fhir_id": "'Patient/' || s.id",
        },
    ),
    (
        "death",
        "Patient",
        "s.deceased_dt IS NOT NULL",
        {
            "person_id": "hs_key('Patient/' || s.id)",
            "death_date": "hs_date(s.deceased_dt)",
            "death_datetime": "CASE WHEN length(s.deceased_dt) > 10 THEN hs_ts(s.deceased_dt) END",
            "death_type_concept_id": str(CONCEPT_EHR),
            "hs_fhir_id": "'Patient/' || s.id",
        },
    ),
    (
        "visit_occurrence",
        "Encounter",
        "",
        {
            "visit_occurrence_id": "hs_key('Encounter/' || s.id)",
            "person_id": "hs_key(s.subject)",
            "visit_concept_id": "CASE WHEN s.class_code IN ('IMP', 'ACUTE', 'NONAC') THEN 9201 "
            "WHEN s.class_code = 'AMB' THEN 9202 WHEN s.class_code = 'EMER' THEN 9203 ELSE 0 END",
            "visit_start_date": "hs_date(s.start)",
            "visit_start_datetime": "hs_ts(s.start)",
            # OMOP asks for an end date; an encounter without one is taken to end the day it started.
            "visit_end_date": 'coalesce(hs_date(s."end"), hs_date(s.start))',
            "visit_end_datetime": 'hs_ts(s."end")',
            "visit_type_concept_id": str(CONCEPT_EHR),
            "visit_source_value": "s.class_code",
            "hs_fhir_id": "'Encounter/' || s.id",
            "hs_source_vocabulary": "'v3-ActCode'",
        },
    ),
    (
        "condition_occurrence",
        "Condition",
        "",
        {
            "condition_occurrence_id": "hs_key('Condition/' || s.id)",
            "person_id": "hs_key(s.subject)",
            "condition_concept_id": "0",
            "condition_start_date": "hs_date(s.onset)",
            "condition_start_datetime": "hs_ts(s.onset)",
            "condition_end_date": "hs_date(s.abatement)",
            "condition_end_datetime": "hs_ts(s.abatement)",
            "condition_type_concept_id": str(CONCEPT_EHR),
            "visit_occurrence_id": _OPT_VISIT,
            "condition_source_value": "left(s.code, 50)",
            "condition_source_concept_id": "0",
            "condition_status_source_value": "s.clinical_status",
            "hs_fhir_id": "'Condition/' || s.id",
            "hs_source_vocabulary": "hs_vocab(s.code_system)",
        },
    ),
    (
        "measurement",
        "Observation",
        "",
        {
            "measurement_id": "hs_key('Observation/' || s.id)",
            "person_id": "hs_key(s.subject)",
            "measurement_concept_id": "0",
            "measurement_date": "hs_date(s.effective)",
            "measurement_datetime": "hs_ts(s.effective)",
            "measurement_type_concept_id": str(CONCEPT_EHR),
            "value_as_number": "s.value_num",
            "unit_concept_id": "CASE WHEN s.unit IS NOT NULL THEN 0 END",
            "range_low": "s.ref_low",
            "range_high": "s.ref_high",
            "visit_occurrence_id": _OPT_VISIT,
            "measurement_source_value": "left(s.code, 50)",
            "measurement_source_concept_id": "0",
            "unit_source_value": "left(s.unit, 50)",
            "value_source_value": "left(coalesce(s.value_code, CAST(s.value_num AS VARCHAR)), 50)",
            "hs_fhir_id": "'Observation/' || s.id",
            "hs_source_vocabulary": "hs_vocab(s.code_system)",
        },
    ),
    (
        "drug_exposure",
        "MedicationRequest",
        "",
        {
            "drug_exposure_id": "hs_key('MedicationRequest/' || s.id)",
            "person_id": "hs_key(s.subject)",
            "drug_concept_id": "0",
            "drug_exposure_start_date": "hs_date(coalesce(s.authored, s.validity_start))",
            "drug_exposure_start_datetime": "hs_ts(coalesce(s.authored, s.validity_start))",
            # OMOP requires an end: the validity end, else start + days supply - 1, else the start.
            "drug_exposure_end_date": "coalesce(hs_date(s.validity_end), "
            "CAST(hs_date(coalesce(s.authored, s.validity_start)) "
            "+ CAST(greatest(round(s.supply_days) - 1, 0) AS INTEGER) AS DATE), "
            "hs_date(coalesce(s.authored, s.validity_start)))",
            "drug_exposure_end_datetime": "hs_ts(s.validity_end)",
            "verbatim_end_date": "hs_date(s.validity_end)",
            "drug_type_concept_id": str(CONCEPT_EHR_PRESCRIPTION),
            "refills": "s.refills",
            "quantity": "s.quantity",
            "days_supply": "CAST(round(s.supply_days) AS BIGINT)",
            "sig": "s.sig",
            "visit_occurrence_id": _OPT_VISIT,
            "drug_source_value": "left(s.code, 50)",
            "drug_source_concept_id": "0",
            "route_source_value": "left(s.route, 50)",
            "hs_fhir_id": "'MedicationRequest/' || s.id",
            "hs_source_vocabulary": "hs_vocab(s.code_system)",
        },
    ),
    (
        "procedure_occurrence",
        "Procedure",
        "",
        {
            "procedure_occurrence_id": "hs_key('Procedure/' || s.id)",
            "person_id": "hs_key(s.subject)",
            "procedure_concept_id": "0",
            "procedure_date": "hs_date(s.performed)",
            "procedure_datetime": "hs_ts(s.performed)",
            "procedure_end_date": "hs_date(s.performed_end)",
            "procedure_end_datetime": "hs_ts(s.performed_end)",
            "procedure_type_concept_id": str(CONCEPT_EHR),
            "visit_occurrence_id": _OPT_VISIT,
            "procedure_source_value": "left(s.code, 50)",
            "procedure_source_concept_id": "0",
            "hs_fhir_id": "'Procedure/' || s.id",
            "hs_source_vocabulary": "hs_vocab(s.code_system)",
        },
    ),
]

_DUCK_TYPES = {
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.date32(): "DATE",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
    pa.string(): "VARCHAR",
}


def _error_sql(rtype: str, profile: StandardProfile) -> tuple[str, str]:
    """(errors list expression, extra joins) for one resource type under `profile`."""
    from healthspace.data.fhir import ELEMENTS

    elements = ELEMENTS[rtype]
    checks: list[str] = []

    def add(cond: str, rule: str, detail: str) -> None:
        checks.append(f"CASE WHEN {cond} THEN {_lit(rule + '|')} || {detail} END")

    for el in profile.required.get(rtype, []):
        expr = "s." + elements[el] if elements[el].isidentifier() else elements[el]
        expr = expr if "(" not in elements[el] else elements[el]
        add(f"({expr}) IS NULL", f"required.{rtype}.{el}", _lit(f"{rtype}.{el} is missing"))
    for col, el in _DATES[rtype].items():
        c = f's."{col}"'
        add(
            f"{c} IS NOT NULL AND hs_ts({c}) IS NULL",
            "format.datetime",
            f"{_lit(f'{rtype}.{el} ')} || {c} || ' is not a FHIR date or dateTime'",
        )
    if "subject" in elements:
        add(
            "s.subject IS NOT NULL AND NOT starts_with(s.subject, 'Patient/')",
            "reference.subject",
            f"{_lit(f'{rtype}.subject must reference a Patient, not ')} || s.subject",
        )
    if "encounter" in elements:
        add(
            "s.encounter IS NOT NULL AND NOT starts_with(s.encounter, 'Encounter/')",
            "reference.encounter",
            f"{_lit(f'{rtype}.encounter must reference an Encounter, not ')} || s.encounter",
        )
    allowed = profile.code_systems.get(rtype)
    if allowed:
        add(
            f"s.code IS NOT NULL AND coalesce(s.code_system, '') NOT IN ({_lits(allowed)})",
            "codesystem.not_allowed",
            f"{_lit(f'{rtype} code system ')} || coalesce(s.code_system, '(none)') || ' is not allowed'",
        )
    for key, codes in profile.value_sets.items():
        t, _, el = key.partition(".")
        if t != rtype:
            continue
        expr = elements[el] if "(" in elements[el] else f"s.{elements[el]}"
        add(
            f"({expr}) IS NOT NULL AND ({expr}) NOT IN ({_lits(codes)})",
            "valueset.not_member",
            f"{_lit(f'{key} ')} || ({expr}) || ' is not in the value set'",
        )
    joins = ""
    if rtype == "Observation":
        add(
            "s.value_bad IS NOT NULL",
            "format.quantity",
            "'Observation.valueQuantity.value ' || s.value_bad || ' is not a number'",
        )
        joins = f" LEFT JOIN hs_rules r ON s.code_system = {_lit(_LOINC)} AND r.code = s.code"
        add(
            "r.code IS NOT NULL AND s.value_num IS NOT NULL "
            "AND NOT list_contains(r.units, coalesce(s.unit, ''))",
            "measurement.unit",
            "s.code || ' unit ' || coalesce(s.unit, '(none)') || ' is not one of ' "
            "|| array_to_string(r.units, ', ')",
        )
        add(
            "r.code IS NOT NULL AND s.value_num IS NOT NULL "
            "AND (s.value_num < r.low OR s.value_num > r.high)",
            "measurement.range",
            "s.code || ' value ' || CAST(s.value_num AS VARCHAR) || ' outside plausible range [' "
            "|| coalesce(CAST(r.low AS VARCHAR), '') || ', ' || coalesce(CAST(r.high AS VARCHAR), '') || ']'",
        )
        if profile.measurements_closed:
            add(
                f"r.code IS NULL AND s.code_system = {_lit(_LOINC)}",
                "measurement.unknown_code",
                "'LOINC ' || s.code || ' has no measurement rule in the standard'",
            )
    if rtype == "Patient":
        joins = " LEFT JOIN hs_idfmt f ON f.system = s.identifier_system"
        add(
            "f.system IS NOT NULL AND s.identifier_value IS NOT NULL "
            "AND NOT regexp_full_match(s.identifier_value, f.pattern)",
            "identifier.format",
            "'Patient.identifier ' || s.identifier_value || ' does not match the format of ' || f.system",
        )
    expr = f"list_filter([{', '.join(checks)}], x -> x IS NOT NULL)" if checks else "CAST([] AS VARCHAR[])"
    return expr, joins


# --- the pipeline ------------------------------------------------------------------------------------


class _Pipeline:
    def __init__(
        self, store: ClinicalStore, writer: BatchWriter, profile: StandardProfile, report: IngestReport
    ) -> None:
        self.store, self.writer, self.profile, self.report = store, writer, profile, report
        self.allowed = {t: profile.allowed_systems(t) for t in MAPPERS}
        con = duckdb.connect(":memory:")
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET temp_directory = ''")
        for m in _MACROS:
            con.execute(m)
        con.execute("CREATE TABLE hs_rules (code VARCHAR, units VARCHAR[], low DOUBLE, high DOUBLE)")
        if profile.measurements:
            con.executemany(
                "INSERT INTO hs_rules VALUES (?, ?, ?, ?)",
                [[m.code, m.units, m.low, m.high] for m in profile.measurements],
            )
        con.execute("CREATE TABLE hs_idfmt (system VARCHAR, pattern VARCHAR)")
        if profile.identifier_formats:
            con.executemany("INSERT INTO hs_idfmt VALUES (?, ?)", list(profile.identifier_formats.items()))
        self.con = con
        self.errors_sql = {t: _error_sql(t, profile) for t in MAPPERS}
        self.keys_loaded: set[str] = set()
        self.buffers: dict[str, list[pa.Table]] = {}
        self.buffered: Counter[str] = Counter()
        self.quarantine: list[dict[str, Any]] = []
        self.rules: Counter[str] = Counter()
        self.resources: Counter[str] = Counter()
        self.unmapped: Counter[str] = Counter()
        self.not_clinical: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self.inserted: Counter[str] = Counter()
        self.sources: list[str] = report.sources
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hs-ingest")
        self._pending: Future[None] | None = None

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(BaseException):
                self._pending.result()
        self._loader.shutdown(wait=True)
        self.con.close()

    def _keys(self, table: str) -> str:
        name = f"keys_{table}"
        if table not in self.keys_loaded:
            self.con.register("hs_existing", self.store.dataset(table))
            self.con.execute(f"CREATE TABLE {name} AS SELECT {_KEY[table]} AS k FROM hs_existing")  # noqa: S608
            self.con.unregister("hs_existing")
            self.keys_loaded.add(table)
        return name

    def _reject(self, src: int, line: int, raw: bytes, rtype: Any, rid: Any, errors: Sequence[str]) -> None:
        rules = [e.split("|", 1)[0] for e in errors]
        with self._lock:
            self._reject_locked(src, line, raw, rtype, rid, errors, rules)

    def _reject_locked(
        self, src: int, line: int, raw: bytes, rtype: Any, rid: Any, errors: Sequence[str], rules: list[str]
    ) -> None:
        self.rules.update(rules)
        self.quarantine.append(
            {
                "quarantine_id": str(uuid.uuid4()),
                "batch_id": self.writer.batch_id,
                "source": self.sources[src],
                "line": line,
                "resource_type": rtype if isinstance(rtype, str) else None,
                "resource_id": rid if isinstance(rid, str) else None,
                "rules": rules,
                "reason": "; ".join(e.split("|", 1)[-1] for e in errors),
                "raw": raw,
                "created_at": utcnow(),
            }
        )

    def process(self, chunk: Sequence[Record]) -> None:
        rows: dict[str, list[tuple[Any, ...]]] = {}
        meta: dict[str, list[Record]] = {}
        loads = orjson.loads
        for rec in chunk:
            src, line, raw = rec
            try:
                r = loads(raw)
            except orjson.JSONDecodeError as exc:
                self._reject(src, line, raw, None, None, [f"json.malformed|line {line}: {exc}"])
                continue
            if not isinstance(r, dict):
                self._reject(
                    src, line, raw, None, None, [f"json.not_object|line {line} is not a JSON object"]
                )
                continue
            rtype = r.get("resourceType")
            mapper = MAPPERS.get(rtype) if isinstance(rtype, str) else None
            if mapper is not None and isinstance(rtype, str):
                rows.setdefault(rtype, []).append(mapper(r, self.allowed[rtype]))
                meta.setdefault(rtype, []).append(rec)
                self.resources[rtype] += 1
            elif rtype in NOT_CLINICAL:
                self.not_clinical[rtype] += 1
                self.resources[rtype] += 1
            elif rtype in FHIR_R4_RESOURCE_TYPES:
                self.unmapped[rtype] += 1
                self.resources[rtype] += 1
            elif rtype is None:
                self._reject(
                    src, line, raw, None, r.get("id"), ["resource.type_missing|resourceType is missing"]
                )
            else:
                self._reject(
                    src,
                    line,
                    raw,
                    rtype,
                    r.get("id"),
                    [f"resource.type_unknown|{str(rtype)[:64]!r} is not a FHIR R4 resource type"],
                )
        # Loading runs in a worker thread (DuckDB and Arrow release the GIL) while the next chunk is parsed;
        # one chunk at a time in order, so the result is the same as a sequential run.
        self.wait()
        self._pending = self._loader.submit(self._load, rows, meta)

    def wait(self) -> None:
        """Block until the chunk being loaded is done; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _load(self, rows: dict[str, list[tuple[Any, ...]]], meta: dict[str, list[Record]]) -> None:
        for rtype, trows in rows.items():
            self._process_type(rtype, trows, meta[rtype])
        self._flush(final=False)

    def _process_type(self, rtype: str, trows: list[tuple[Any, ...]], meta: list[Record]) -> None:
        staging = STAGING[rtype]
        cols = list(zip(*trows, strict=True))
        arrays = [pa.array(c, type=t) for c, (_, t) in zip(cols, staging, strict=True)]
        # Source positions and raw bytes stay in Python: only rejected rows need them.
        arrays.append(pa.array(range(len(trows)), pa.int64()))
        names = [n for n, _ in staging] + ["_ord"]
        con = self.con
        con.register("stg", pa.Table.from_arrays(arrays, names=names))
        errors, joins = self.errors_sql[rtype]
        con.execute(f"CREATE OR REPLACE TEMP TABLE m AS SELECT s.*, {errors} AS errors FROM stg s{joins}")  # noqa: S608
        con.unregister("stg")
        bad = con.execute("SELECT _ord, id, errors FROM m WHERE len(errors) > 0").fetchall()
        for ord_, rid, errs in bad:
            src, line, raw = meta[ord_]
            self._reject(src, line, raw, rtype, rid, errs)
        if rtype == "Patient":
            (n,) = con.execute(  # type: ignore[misc]
                "SELECT count(*) FROM m WHERE len(errors) = 0 AND deceased_flag AND deceased_dt IS NULL"
            ).fetchone()
            if n:
                self.warnings["death.date_unknown"] += int(n)
        for table, src_type, where, exprs in _OUTPUTS:
            if src_type == rtype:
                self._emit(table, exprs, where)

    def _emit(self, table: str, exprs: dict[str, str], where: str) -> None:
        schema = arrow_schema(table)
        select = []
        for f in schema:
            if f.name == "hs_batch_id":
                select.append(f"{_lit(self.writer.batch_id)} AS hs_batch_id")
            elif f.name in exprs:
                select.append(f"{exprs[f.name]} AS {f.name}")
            else:
                select.append(f"CAST(NULL AS {_DUCK_TYPES[f.type]}) AS {f.name}")
        key, keys = _KEY[table], self._keys(table)
        cond = "len(s.errors) = 0" + (f" AND {where}" if where else "")
        con = self.con
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE o AS SELECT {', '.join(select)}, s._ord FROM m s WHERE {cond}"  # noqa: S608
        )
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE fresh AS SELECT * FROM o "  # noqa: S608
            f"WHERE {key} NOT IN (SELECT k FROM {keys}) "
            f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY _ord) = 1"
        )
        (total,) = con.execute("SELECT count(*) FROM o").fetchone()  # type: ignore[misc]
        out = con.execute("SELECT * EXCLUDE (_ord) FROM fresh").to_arrow_table()
        con.execute(f"INSERT INTO {keys} SELECT {key} FROM fresh")  # noqa: S608
        if table != "death":
            self.report.duplicates += int(total) - out.num_rows
        if out.num_rows:
            self.buffers.setdefault(table, []).append(out.cast(schema))
            self.buffered[table] += out.num_rows
            self.inserted[table] += out.num_rows

    def _flush(self, *, final: bool) -> None:
        for table, parts in list(self.buffers.items()):
            if parts and (final or self.buffered[table] >= _FLUSH_ROWS):
                self.writer.write(table, pa.concat_tables(parts).combine_chunks())
                self.buffers[table] = []
                self.buffered[table] = 0
        with self._lock:
            if not self.quarantine or not (final or len(self.quarantine) >= _FLUSH_ROWS // 10):
                return
            rejected, self.quarantine = self.quarantine, []
        self.writer.write("quarantine", pa.Table.from_pylist(rejected, schema=QUARANTINE_SCHEMA))
        self.report.quarantine_ids.extend(
            q["quarantine_id"] for q in rejected[: max(0, 1000 - len(self.report.quarantine_ids))]
        )
        self.report.rejected += len(rejected)

    def finish(self) -> None:
        self.wait()
        self._flush(final=True)
        if sum(self.inserted.values()):
            self._observation_periods()

    def _observation_periods(self) -> None:
        """One period per person, from their earliest to their latest recorded event (derived, replaced)."""
        con = self.con
        for t in (
            "person",
            "visit_occurrence",
            "condition_occurrence",
            "drug_exposure",
            "measurement",
            "procedure_occurrence",
        ):
            con.register(f"v_{t}", self.writer.visible(t))
        rows = con.execute(
            f"""
            SELECT e.person_id AS observation_period_id, e.person_id,
                   min(e.d) AS observation_period_start_date, max(e.d) AS observation_period_end_date,
                   {CONCEPT_EHR} AS period_type_concept_id
            FROM (
                SELECT person_id, visit_start_date AS d FROM v_visit_occurrence
                UNION ALL SELECT person_id, visit_end_date FROM v_visit_occurrence
                UNION ALL SELECT person_id, condition_start_date FROM v_condition_occurrence
                UNION ALL SELECT person_id, drug_exposure_start_date FROM v_drug_exposure
                UNION ALL SELECT person_id, drug_exposure_end_date FROM v_drug_exposure
                UNION ALL SELECT person_id, measurement_date FROM v_measurement
                UNION ALL SELECT person_id, procedure_date FROM v_procedure_occurrence
            ) e
            WHERE e.d IS NOT NULL AND e.person_id IN (SELECT person_id FROM v_person)
            GROUP BY e.person_id
            """  # noqa: S608
        ).to_arrow_table()
        self.writer.replace("observation_period", rows.cast(arrow_schema("observation_period")))


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _new_batch_id() -> str:
    return f"b{utcnow().strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


def ingest_records(
    store: ClinicalStore,
    chunks: Iterable[Sequence[Record]],
    sources: list[str],
    digest: bytes,
    standard: StandardProfile | None = None,
    *,
    on_chunk: Callable[[int], None] | None = None,
    fail_on_reject: bool = False,
    prerejected: Sequence[tuple[int, int, bytes, str, str]] = (),
    resolves: Mapping[str, dict[str, str]] | None = None,
) -> IngestReport:
    """Ingest `chunks` of records as one atomic batch identified by the content `digest`.

    The building block of the public entry points. With `fail_on_reject` any rejected record aborts the
    batch with `ValidationError` (used to re-submit a fixed quarantined resource). `prerejected` records
    (source, line, raw, rule, detail) were refused before parsing (e.g. a Bundle entry's request method)
    and go straight to the quarantine. `resolves` marks quarantine entries resolved by this batch.
    """
    profile = standard or default_profile()
    batch_id = _new_batch_id()
    report = IngestReport(
        batch_id=batch_id,
        dataset_id=store.dataset_id,
        profile=profile.ref,
        sources=sources,
        started_at=utcnow(),
    )
    mac = store.content_mac(digest)
    if any(b.get("content_mac") == mac for b in store.batches):
        report.already_ingested = True
        report.finished_at = utcnow()
        return report
    with store.batch(batch_id) as writer:
        # Another process may have committed this content while we waited for the lock.
        if any(b.get("content_mac") == mac for b in store.batches):
            raise _AlreadyIngestedError
        pipeline = _Pipeline(store, writer, profile, report)
        try:
            for src, line, raw, rule, detail in prerejected:
                report.read += 1
                pipeline._reject(src, line, raw, None, None, [f"{rule}|{detail}"])
            for chunk in chunks:
                report.read += len(chunk)
                pipeline.process(chunk)
                if on_chunk is not None:
                    on_chunk(len(chunk))
            pipeline.wait()
            if fail_on_reject and (pipeline.quarantine or report.rejected):
                reasons = "; ".join(q["reason"] for q in pipeline.quarantine)
                raise ValidationError(f"resource still rejected: {reasons}")
            pipeline.finish()
        finally:
            pipeline.close()
        report.resources = dict(pipeline.resources)
        report.inserted = {t: pipeline.inserted[t] for t in CDM_TABLES if pipeline.inserted[t]}
        report.rules = dict(sorted(pipeline.rules.items()))
        report.unmapped = dict(pipeline.unmapped)
        report.not_clinical = dict(pipeline.not_clinical)
        report.warnings = dict(pipeline.warnings)
        report.finished_at = utcnow()
        record = report.model_dump(mode="json", exclude={"quarantine_ids"})
        record["content_mac"] = mac
        writer.finish(record, {q: {**v, "batch_id": batch_id} for q, v in (resolves or {}).items()})
    return report


class _AlreadyIngestedError(Exception):
    pass


def _progress(enabled: bool) -> Progress:
    """A progress bar on stderr, drawn only when asked for and stderr is a terminal."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[records]:,} records"),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=False,
    )


def _file_digest(paths: Sequence[Path]) -> bytes:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        h.update(b"\x00file-end\x00")
    return h.digest()


def ingest_ndjson(
    store: ClinicalStore,
    paths: Sequence[Path | str],
    standard: StandardProfile | None = None,
    *,
    progress: bool = False,
    chunk_records: int = CHUNK_RECORDS,
) -> IngestReport:
    """Ingest FHIR Bulk Data NDJSON files (any mix of resource types per file) as one batch.

    Memory stays bounded by the chunk size whatever the file size. Blank lines are skipped; a line that is
    not JSON is quarantined with its line number.
    """
    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise ValidationError(f"no such NDJSON file: {p.name}")
    total = sum(p.stat().st_size for p in files)
    sources = [p.name for p in files]
    with _progress(progress) as bar:
        task = bar.add_task(f"ingest {store.dataset_id}", total=total or 1, records=0)
        done = {"bytes": 0, "records": 0}

        def chunks() -> Iterator[list[Record]]:
            chunk: list[Record] = []
            for si, p in enumerate(files):
                ln = 0
                with p.open("rb") as f:
                    # readlines(hint) reads whole blocks; much cheaper than a generator per line.
                    while block := f.readlines(1 << 23):
                        for line in block:
                            ln += 1
                            stripped = line.strip()
                            if stripped:
                                chunk.append((si, ln, stripped))
                        done["bytes"] += sum(map(len, block))
                        while len(chunk) >= chunk_records:
                            yield chunk[:chunk_records]
                            chunk = chunk[chunk_records:]
            if chunk:
                yield chunk

        def on_chunk(n: int) -> None:
            done["records"] += n
            bar.update(task, completed=done["bytes"], records=done["records"])

        try:
            return ingest_records(
                store,
                chunks(),
                sources,
                _file_digest(files),
                standard,
                on_chunk=on_chunk,
            )
        except _AlreadyIngestedError:
            return _already(store, sources, standard)


def _already(store: ClinicalStore, sources: list[str], standard: StandardProfile | None) -> IngestReport:
    now = utcnow()
    return IngestReport(
        batch_id="",
        dataset_id=store.dataset_id,
        profile=(standard or default_profile()).ref,
        sources=sources,
        already_ingested=True,
        started_at=now,
        finished_at=now,
    )


def _bundle_records(
    bundle: Mapping[str, Any],
) -> tuple[list[Record], list[tuple[int, int, bytes, str, str]]]:
    """Entries of a Bundle as records, with `urn:uuid:` references resolved to `Type/id`.

    Also returns the entries refused outright (a transaction DELETE, an entry without a resource).
    """
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise ValidationError("Bundle.entry must be a list")
    btype = bundle.get("type")
    resolve: dict[str, str] = {}
    for e in entries:
        if not isinstance(e, dict):
            continue
        res, full = e.get("resource"), e.get("fullUrl")
        if isinstance(res, dict) and isinstance(full, str) and isinstance(res.get("resourceType"), str):
            rid = res.get("id")
            if not isinstance(rid, str) and full.startswith("urn:uuid:"):
                rid = full.removeprefix("urn:uuid:")
            if isinstance(rid, str):
                resolve[full] = f"{res['resourceType']}/{rid}"
    records: list[Record] = []
    refused: list[tuple[int, int, bytes, str, str]] = []
    for i, e in enumerate(entries, 1):
        res = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(res, dict):
            refused.append((0, i, orjson.dumps(e), "bundle.entry", f"entry {i} has no resource"))
            continue
        if btype in ("transaction", "batch"):
            request = e.get("request")
            method = request.get("method") if isinstance(request, dict) else None
            if method not in ("POST", "PUT"):
                refused.append(
                    (
                        0,
                        i,
                        orjson.dumps(e),
                        "bundle.method",
                        f"entry {i}: request method {method!r} is not ingested",
                    )
                )
                continue
        res = dict(res)
        full = e.get("fullUrl")
        if "id" not in res and isinstance(full, str) and full in resolve:
            res["id"] = resolve[full].split("/", 1)[1]
        records.append((0, i, orjson.dumps(_resolve_refs(res, resolve))))
    return records, refused


def _resolve_refs(node: Any, resolve: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and v in resolve:
                out[k] = resolve[v]
            else:
                out[k] = _resolve_refs(v, resolve)
        return out
    if isinstance(node, list):
        return [_resolve_refs(v, resolve) for v in node]
    return node


def ingest_bundle(
    store: ClinicalStore,
    bundle: bytes | str | Mapping[str, Any],
    standard: StandardProfile | None = None,
    *,
    source: str = "bundle",
) -> IngestReport:
    """Ingest a FHIR R4 Bundle of type transaction, batch or collection as one batch.

    `urn:uuid:` full URLs are resolved, so entries may reference each other as transactions do. Entries
    are numbered from 1 in quarantine records. Other bundle types raise `ValidationError`.
    """
    if isinstance(bundle, bytes | str):
        raw = bundle.encode() if isinstance(bundle, str) else bundle
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValidationError(f"bundle is not valid JSON: {exc}") from None
    else:
        doc = dict(bundle)
        raw = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        raise ValidationError("not a FHIR Bundle (resourceType must be 'Bundle')")
    if doc.get("type") not in BUNDLE_TYPES:
        raise ValidationError(
            f"Bundle type {doc.get('type')!r} is not ingested; use one of {', '.join(sorted(BUNDLE_TYPES))}"
        )
    records, refused = _bundle_records(doc)
    try:
        return ingest_records(
            store,
            _chunks(records, CHUNK_RECORDS),
            [source],
            hashlib.sha256(raw).digest(),
            standard,
            prerejected=refused,
        )
    except _AlreadyIngestedError:
        return _already(store, [source], standard)
