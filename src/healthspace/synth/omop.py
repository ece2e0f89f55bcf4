"""OMOP CDM 5.4-style Arrow tables of a simulated chunk, and their Parquet schemas.

Column names follow the CDM 5.4 field-level specification. Two documented additions:
`<domain>_source_vocabulary` columns name the code system of each `<domain>_source_value` (the CDM keeps
that only through `*_source_concept_id`, which needs the OMOP vocabulary tables), and the `consent`
table (patient x usage scenario), which the CDM has no place for. Concept ids of clinical codes are 0
("no matching concept"): mapping source codes to standard concepts is left to a vocabulary step.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from healthspace.synth import simulate as sim
from healthspace.synth.codes import DRUGS, LABS, PROCEDURES
from healthspace.synth.sites import SCENARIO_IDS

__all__ = [
    "EXTENSION_COLUMNS",
    "EXTENSION_TABLES",
    "OMOP_SCHEMAS",
    "OMOP_TABLES",
    "omop_tables",
]

# Standard concepts used (OMOP vocabulary): gender, visit and the "EHR" type concept.
GENDER_MALE, GENDER_FEMALE = 8507, 8532
VISIT_CONCEPTS = (9202, 9203, 9201)  # outpatient, emergency room, inpatient (simulate.VISIT_*)
VISIT_SOURCE = ("AMB", "EMER", "IMP")  # the FHIR Encounter.class codes (v3 ActCode)
TYPE_EHR = 32817

_DATE = pa.date32()
_TS = pa.timestamp("us", tz="UTC")

OMOP_SCHEMAS: Mapping[str, pa.Schema] = MappingProxyType(
    {
        "person": pa.schema(
            [
                ("person_id", pa.int64()),
                ("gender_concept_id", pa.int32()),
                ("year_of_birth", pa.int32()),
                ("month_of_birth", pa.int32()),
                ("day_of_birth", pa.int32()),
                ("birth_datetime", _TS),
                ("race_concept_id", pa.int32()),
                ("ethnicity_concept_id", pa.int32()),
                ("person_source_value", pa.string()),
                ("gender_source_value", pa.string()),
            ]
        ),
        "observation_period": pa.schema(
            [
                ("observation_period_id", pa.int64()),
                ("person_id", pa.int64()),
                ("observation_period_start_date", _DATE),
                ("observation_period_end_date", _DATE),
                ("period_type_concept_id", pa.int32()),
            ]
        ),
        "visit_occurrence": pa.schema(
            [
                ("visit_occurrence_id", pa.int64()),
                ("person_id", pa.int64()),
                ("visit_concept_id", pa.int32()),
                ("visit_start_date", _DATE),
                ("visit_end_date", _DATE),
                ("visit_type_concept_id", pa.int32()),
                ("visit_source_value", pa.string()),
            ]
        ),
        "condition_occurrence": pa.schema(
            [
                ("condition_occurrence_id", pa.int64()),
                ("person_id", pa.int64()),
                ("condition_concept_id", pa.int32()),
                ("condition_start_date", _DATE),
                ("condition_end_date", _DATE),
                ("condition_type_concept_id", pa.int32()),
                ("visit_occurrence_id", pa.int64()),
                ("condition_source_value", pa.string()),
                ("condition_source_vocabulary", pa.string()),
            ]
        ),
        "measurement": pa.schema(
            [
                ("measurement_id", pa.int64()),
                ("person_id", pa.int64()),
                ("measurement_concept_id", pa.int32()),
                ("measurement_date", _DATE),
                ("measurement_type_concept_id", pa.int32()),
                ("value_as_number", pa.float64()),
                ("unit_concept_id", pa.int32()),
                ("visit_occurrence_id", pa.int64()),
                ("measurement_source_value", pa.string()),
                ("measurement_source_vocabulary", pa.string()),
                ("unit_source_value", pa.string()),
            ]
        ),
        "drug_exposure": pa.schema(
            [
                ("drug_exposure_id", pa.int64()),
                ("person_id", pa.int64()),
                ("drug_concept_id", pa.int32()),
                ("drug_exposure_start_date", _DATE),
                ("drug_exposure_end_date", _DATE),
                ("drug_type_concept_id", pa.int32()),
                ("quantity", pa.float64()),
                ("days_supply", pa.int32()),
                ("sig", pa.string()),
                ("visit_occurrence_id", pa.int64()),
                ("drug_source_value", pa.string()),
                ("drug_source_vocabulary", pa.string()),
                ("route_source_value", pa.string()),
            ]
        ),
        "procedure_occurrence": pa.schema(
            [
                ("procedure_occurrence_id", pa.int64()),
                ("person_id", pa.int64()),
                ("procedure_concept_id", pa.int32()),
                ("procedure_date", _DATE),
                ("procedure_type_concept_id", pa.int32()),
                ("visit_occurrence_id", pa.int64()),
                ("procedure_source_value", pa.string()),
                ("procedure_source_vocabulary", pa.string()),
            ]
        ),
        "death": pa.schema(
            [
                ("person_id", pa.int64()),
                ("death_date", _DATE),
                ("death_type_concept_id", pa.int32()),
            ]
        ),
        "consent": pa.schema(
            [
                ("consent_id", pa.int64()),
                ("person_id", pa.int64()),
                ("scenario_id", pa.string()),
                ("decision", pa.string()),
                ("decided_at", _TS),
                ("withdrawn_at", _TS),
            ]
        ),
    }
)
OMOP_TABLES: tuple[str, ...] = tuple(OMOP_SCHEMAS)
EXTENSION_TABLES: frozenset[str] = frozenset({"consent"})
EXTENSION_COLUMNS: frozenset[tuple[str, str]] = frozenset(
    {
        ("condition_occurrence", "condition_source_vocabulary"),
        ("measurement", "measurement_source_vocabulary"),
        ("drug_exposure", "drug_source_vocabulary"),
        ("procedure_occurrence", "procedure_source_vocabulary"),
    }
)

_CONDITION_SOURCE = pa.array([c.code for c in sim.CONDITION_CODES])
_LAB_SOURCE = pa.array([lab.code for lab in LABS])
_LAB_UNIT = pa.array([lab.unit for lab in LABS])
_DRUG_SOURCE = pa.array([d.code for d in DRUGS])
_DRUG_SIG = pa.array([d.sig for d in DRUGS])
_DRUG_ROUTE = pa.array([d.route for d in DRUGS])
_PROCEDURE_SOURCE = pa.array([p.code for p in PROCEDURES])
_VISIT_SOURCE = pa.array(list(VISIT_SOURCE))
_SCENARIO = pa.array(list(SCENARIO_IDS))
_DECISION = pa.array(["deny", "permit"])


def _date(days: npt.NDArray[np.generic]) -> pa.Array:
    d = np.asarray(days, dtype=np.int32)
    return pa.array(d, type=pa.int32(), mask=d == sim.NO_DAY).cast(_DATE)


def _id_or_null(ids: npt.NDArray[np.generic]) -> pa.Array:
    return pa.array(ids, type=pa.int64(), mask=np.asarray(ids) < 0)


def _const_int(value: int, n: int) -> pa.Array:
    return pa.array(np.full(n, value, dtype=np.int32))


def _take(values: pa.Array, index: npt.NDArray[np.generic]) -> pa.Array:
    return pc.take(values, pa.array(np.asarray(index, dtype=np.int32)))


def _table(name: str, columns: dict[str, pa.Array]) -> pa.Table:
    return pa.Table.from_arrays(list(columns.values()), schema=OMOP_SCHEMAS[name])


def omop_tables(ch: sim.Chunk, site_code: str) -> dict[str, pa.Table]:
    """Arrow tables of `ch` in OMOP_SCHEMAS layout, keyed by table name."""
    p = ch.person
    n = ch.patients
    birth = np.asarray(p["birth_day"]).astype("datetime64[D]")
    years = birth.astype("datetime64[Y]")
    months = birth.astype("datetime64[M]")
    male = np.asarray(p["male"])
    pid = np.asarray(p["person_id"])
    person_source = pc.binary_join_element_wise(f"{site_code}-pat-", pc.cast(pa.array(pid), pa.string()), "")
    out: dict[str, pa.Table] = {}
    out["person"] = _table(
        "person",
        {
            "person_id": pa.array(pid),
            "gender_concept_id": pa.array(np.where(male, GENDER_MALE, GENDER_FEMALE).astype(np.int32)),
            "year_of_birth": pa.array((years.astype(np.int64) + 1970).astype(np.int32)),
            "month_of_birth": pa.array(((months - years).astype(np.int64) + 1).astype(np.int32)),
            "day_of_birth": pa.array(((birth - months).astype(np.int64) + 1).astype(np.int32)),
            "birth_datetime": pa.array(birth.astype("datetime64[us]").astype(np.int64), type=pa.int64()).cast(
                _TS
            ),
            "race_concept_id": _const_int(0, n),
            "ethnicity_concept_id": _const_int(0, n),
            "person_source_value": person_source,
            "gender_source_value": _take(pa.array(["F", "M"]), male.astype(np.int8)),
        },
    )
    out["observation_period"] = _table(
        "observation_period",
        {
            "observation_period_id": pa.array(pid),
            "person_id": pa.array(pid),
            "observation_period_start_date": _date(p["index_day"]),
            "observation_period_end_date": _date(p["end_day"]),
            "period_type_concept_id": _const_int(TYPE_EHR, n),
        },
    )
    v = ch.visit
    nv = ch.rows("visit")
    kind = np.asarray(v["kind"])
    out["visit_occurrence"] = _table(
        "visit_occurrence",
        {
            "visit_occurrence_id": pa.array(v["visit_occurrence_id"]),
            "person_id": pa.array(v["person_id"]),
            "visit_concept_id": pa.array(np.asarray(VISIT_CONCEPTS, dtype=np.int32)[kind]),
            "visit_start_date": _date(v["start_day"]),
            "visit_end_date": _date(v["end_day"]),
            "visit_type_concept_id": _const_int(TYPE_EHR, nv),
            "visit_source_value": _take(_VISIT_SOURCE, kind),
        },
    )
    c = ch.condition
    nc = ch.rows("condition")
    out["condition_occurrence"] = _table(
        "condition_occurrence",
        {
            "condition_occurrence_id": pa.array(c["condition_occurrence_id"]),
            "person_id": pa.array(c["person_id"]),
            "condition_concept_id": _const_int(0, nc),
            "condition_start_date": _date(c["start_day"]),
            "condition_end_date": _date(c["end_day"]),
            "condition_type_concept_id": _const_int(TYPE_EHR, nc),
            "visit_occurrence_id": _id_or_null(c["visit_occurrence_id"]),
            "condition_source_value": _take(_CONDITION_SOURCE, c["code"]),
            "condition_source_vocabulary": pa.repeat("ICD10", nc),
        },
    )
    ms = ch.measurement
    nm = ch.rows("measurement")
    out["measurement"] = _table(
        "measurement",
        {
            "measurement_id": pa.array(ms["measurement_id"]),
            "person_id": pa.array(ms["person_id"]),
            "measurement_concept_id": _const_int(0, nm),
            "measurement_date": _date(ms["day"]),
            "measurement_type_concept_id": _const_int(TYPE_EHR, nm),
            "value_as_number": pa.array(ms["value"]),
            "unit_concept_id": _const_int(0, nm),
            "visit_occurrence_id": pa.array(ms["visit_occurrence_id"]),
            "measurement_source_value": _take(_LAB_SOURCE, ms["lab"]),
            "measurement_source_vocabulary": pa.repeat("LOINC", nm),
            "unit_source_value": _take(_LAB_UNIT, ms["lab"]),
        },
    )
    d = ch.drug
    nd = ch.rows("drug")
    out["drug_exposure"] = _table(
        "drug_exposure",
        {
            "drug_exposure_id": pa.array(d["drug_exposure_id"]),
            "person_id": pa.array(d["person_id"]),
            "drug_concept_id": _const_int(0, nd),
            "drug_exposure_start_date": _date(d["start_day"]),
            "drug_exposure_end_date": _date(d["end_day"]),
            "drug_type_concept_id": _const_int(TYPE_EHR, nd),
            "quantity": pa.array(d["quantity"]),
            "days_supply": pa.array(np.asarray(d["days_supply"], dtype=np.int32)),
            "sig": _take(_DRUG_SIG, d["drug"]),
            "visit_occurrence_id": pa.array(d["visit_occurrence_id"]),
            "drug_source_value": _take(_DRUG_SOURCE, d["drug"]),
            "drug_source_vocabulary": pa.repeat("ATC", nd),
            "route_source_value": _take(_DRUG_ROUTE, d["drug"]),
        },
    )
    pr = ch.procedure
    npr = ch.rows("procedure")
    out["procedure_occurrence"] = _table(
        "procedure_occurrence",
        {
            "procedure_occurrence_id": pa.array(pr["procedure_occurrence_id"]),
            "person_id": pa.array(pr["person_id"]),
            "procedure_concept_id": _const_int(0, npr),
            "procedure_date": _date(pr["day"]),
            "procedure_type_concept_id": _const_int(TYPE_EHR, npr),
            "visit_occurrence_id": pa.array(pr["visit_occurrence_id"]),
            "procedure_source_value": _take(_PROCEDURE_SOURCE, pr["procedure"]),
            "procedure_source_vocabulary": pa.repeat("SNOMED", npr),
        },
    )
    dead = np.asarray(p["death_day"]) != sim.NO_DAY
    out["death"] = _table(
        "death",
        {
            "person_id": pa.array(pid[dead]),
            "death_date": _date(np.asarray(p["death_day"])[dead]),
            "death_type_concept_id": _const_int(TYPE_EHR, int(dead.sum())),
        },
    )
    cs = ch.consent
    withdrawn_s = np.asarray(cs["withdrawn_s"])
    out["consent"] = _table(
        "consent",
        {
            "consent_id": pa.array(cs["consent_id"]),
            "person_id": pa.array(cs["person_id"]),
            "scenario_id": _take(_SCENARIO, cs["scenario"]),
            "decision": _take(_DECISION, np.asarray(cs["permit"]).astype(np.int8)),
            "decided_at": pa.array(np.asarray(cs["decided_s"]) * 1_000_000, type=pa.int64()).cast(_TS),
            "withdrawn_at": pa.array(withdrawn_s * 1_000_000, type=pa.int64(), mask=withdrawn_s < 0).cast(
                _TS
            ),
        },
    )
    return out
