"""The OMOP CDM 5.4 tables the clinical store holds, as Arrow schemas, plus our few extension columns.

Column names, order, types and required-ness follow the CDM 5.4 field specification (a test checks them
against the published CSV). Columns prefixed `hs_` are ours: the FHIR logical id each row came from (the
natural key), the code system of the source code, and the ingest batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

__all__ = [
    "CDM_TABLES",
    "CONCEPT_EHR",
    "CONCEPT_EHR_PRESCRIPTION",
    "EXTENSION_PREFIX",
    "Column",
    "TableSpec",
    "arrow_schema",
    "duckdb_ddl",
]

EXTENSION_PREFIX = "hs_"
# OMOP type concepts: where the record came from.
CONCEPT_EHR = 32817
CONCEPT_EHR_PRESCRIPTION = 32838

_ARROW = {
    "integer": pa.int64(),
    "float": pa.float64(),
    "date": pa.date32(),
    "datetime": pa.timestamp("us", tz="UTC"),
    "varchar": pa.string(),
}
_DUCKDB = {
    "integer": "BIGINT",
    "float": "DOUBLE",
    "date": "DATE",
    "datetime": "TIMESTAMPTZ",
    "varchar": "VARCHAR",
}


@dataclass(frozen=True)
class Column:
    name: str
    cdm_type: str  # integer | float | date | datetime | varchar
    required: bool = False


@dataclass(frozen=True)
class TableSpec:
    name: str
    primary_key: str | None
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def _cols(spec: str) -> tuple[Column, ...]:
    """`name:type[!]` separated by spaces; `!` marks a required (NOT NULL) column."""
    out = []
    for item in spec.split():
        name, typ = item.split(":")
        out.append(Column(name, typ.rstrip("!"), typ.endswith("!")))
    return tuple(out)


_EXT_EVENT = " hs_fhir_id:varchar! hs_source_vocabulary:varchar hs_batch_id:varchar!"

CDM_TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        TableSpec(
            "person",
            "person_id",
            _cols(
                "person_id:integer! gender_concept_id:integer! year_of_birth:integer! month_of_birth:integer"
                " day_of_birth:integer birth_datetime:datetime race_concept_id:integer!"
                " ethnicity_concept_id:integer! location_id:integer provider_id:integer care_site_id:integer"
                " person_source_value:varchar gender_source_value:varchar gender_source_concept_id:integer"
                " race_source_value:varchar race_source_concept_id:integer ethnicity_source_value:varchar"
                " ethnicity_source_concept_id:integer hs_fhir_id:varchar! hs_batch_id:varchar!"
            ),
        ),
        TableSpec(
            "observation_period",
            "observation_period_id",
            _cols(
                "observation_period_id:integer! person_id:integer! observation_period_start_date:date!"
                " observation_period_end_date:date! period_type_concept_id:integer!"
            ),
        ),
        TableSpec(
            "visit_occurrence",
            "visit_occurrence_id",
            _cols(
                "visit_occurrence_id:integer! person_id:integer! visit_concept_id:integer!"
                " visit_start_date:date! visit_start_datetime:datetime visit_end_date:date!"
                " visit_end_datetime:datetime visit_type_concept_id:integer! provider_id:integer"
                " care_site_id:integer visit_source_value:varchar visit_source_concept_id:integer"
                " admitted_from_concept_id:integer admitted_from_source_value:varchar"
                " discharged_to_concept_id:integer discharged_to_source_value:varchar"
                " preceding_visit_occurrence_id:integer" + _EXT_EVENT
            ),
        ),
        TableSpec(
            "condition_occurrence",
            "condition_occurrence_id",
            _cols(
                "condition_occurrence_id:integer! person_id:integer! condition_concept_id:integer!"
                " condition_start_date:date! condition_start_datetime:datetime condition_end_date:date"
                " condition_end_datetime:datetime condition_type_concept_id:integer!"
                " condition_status_concept_id:integer stop_reason:varchar provider_id:integer"
                " visit_occurrence_id:integer visit_detail_id:integer condition_source_value:varchar"
                " condition_source_concept_id:integer condition_status_source_value:varchar" + _EXT_EVENT
            ),
        ),
        TableSpec(
            "drug_exposure",
            "drug_exposure_id",
            _cols(
                "drug_exposure_id:integer! person_id:integer! drug_concept_id:integer!"
                " drug_exposure_start_date:date! drug_exposure_start_datetime:datetime"
                " drug_exposure_end_date:date! drug_exposure_end_datetime:datetime verbatim_end_date:date"
                " drug_type_concept_id:integer! stop_reason:varchar refills:integer quantity:float"
                " days_supply:integer sig:varchar route_concept_id:integer lot_number:varchar"
                " provider_id:integer visit_occurrence_id:integer visit_detail_id:integer"
                " drug_source_value:varchar drug_source_concept_id:integer route_source_value:varchar"
                " dose_unit_source_value:varchar" + _EXT_EVENT
            ),
        ),
        TableSpec(
            "measurement",
            "measurement_id",
            _cols(
                "measurement_id:integer! person_id:integer! measurement_concept_id:integer!"
                " measurement_date:date! measurement_datetime:datetime measurement_time:varchar"
                " measurement_type_concept_id:integer! operator_concept_id:integer value_as_number:float"
                " value_as_concept_id:integer unit_concept_id:integer range_low:float range_high:float"
                " provider_id:integer visit_occurrence_id:integer visit_detail_id:integer"
                " measurement_source_value:varchar measurement_source_concept_id:integer"
                " unit_source_value:varchar unit_source_concept_id:integer value_source_value:varchar"
                " measurement_event_id:integer meas_event_field_concept_id:integer" + _EXT_EVENT
            ),
        ),
        TableSpec(
            "procedure_occurrence",
            "procedure_occurrence_id",
            _cols(
                "procedure_occurrence_id:integer! person_id:integer! procedure_concept_id:integer!"
                " procedure_date:date! procedure_datetime:datetime procedure_end_date:date"
                " procedure_end_datetime:datetime procedure_type_concept_id:integer!"
                " modifier_concept_id:integer quantity:integer provider_id:integer"
                " visit_occurrence_id:integer visit_detail_id:integer procedure_source_value:varchar"
                " procedure_source_concept_id:integer modifier_source_value:varchar" + _EXT_EVENT
            ),
        ),
        TableSpec(
            "death",
            None,  # the CDM gives death no primary key; we keep one row per person on ingest
            _cols(
                "person_id:integer! death_date:date! death_datetime:datetime death_type_concept_id:integer"
                " cause_concept_id:integer cause_source_value:varchar cause_source_concept_id:integer"
                " hs_fhir_id:varchar! hs_batch_id:varchar!"
            ),
        ),
    )
}


def arrow_schema(table: str) -> pa.Schema:
    spec = CDM_TABLES[table]
    return pa.schema([pa.field(c.name, _ARROW[c.cdm_type], nullable=not c.required) for c in spec.columns])


def duckdb_ddl(table: str) -> str:
    """`CREATE TABLE` for `table` (used for empty tables and by other engines that mirror the store)."""
    spec = CDM_TABLES[table]
    cols = ", ".join(
        f"{c.name} {_DUCKDB[c.cdm_type]}{' NOT NULL' if c.required else ''}" for c in spec.columns
    )
    pk = f", PRIMARY KEY ({spec.primary_key})" if spec.primary_key else ""
    return f"CREATE TABLE {spec.name} ({cols}{pk})"
