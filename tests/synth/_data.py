"""Reads generated OMOP tables back into per-patient baseline data, independently of the generator's code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from healthspace.synth.generate import SynthSummary


@dataclass
class Population:
    summary: SynthSummary

    @property
    def out(self) -> Path:
        return self.summary.out

    def omop(self, table: str) -> pa.Table:
        return pq.read_table(self.out / "omop" / f"{table}.parquet")


# ICD-10 groups as an analyst would define them (not taken from the generator).
ICD10_GROUPS = {
    "t2d": ("E11",),
    "htn": ("I10",),
    "ckd": ("N18",),
    "ihd": ("I20", "I21", "I22", "I23", "I24", "I25"),
    "copd": ("J44",),
}


def baseline(pop: Population) -> pd.DataFrame:
    """One row per person: sex, age at index, problem-list flags, index-visit labs, death."""
    person = pop.omop("person").to_pandas()
    period = pop.omop("observation_period").to_pandas()
    df = person[["person_id", "gender_concept_id", "birth_datetime"]].merge(
        period[["person_id", "observation_period_start_date", "observation_period_end_date"]], on="person_id"
    )
    df["male"] = (df["gender_concept_id"] == 8507).astype(float)
    index = pd.to_datetime(df["observation_period_start_date"])
    birth = df["birth_datetime"].dt.tz_localize(None)
    df["age"] = (index - birth).dt.days / 365.25
    cond = pop.omop("condition_occurrence").to_pandas()
    problems = cond[cond["visit_occurrence_id"].isna()]
    for key, prefixes in ICD10_GROUPS.items():
        ids = problems.loc[problems["condition_source_value"].str.startswith(prefixes), "person_id"].unique()
        df[key] = df["person_id"].isin(ids).astype(float)
    meas = pop.omop("measurement").to_pandas()
    meas = meas.merge(df[["person_id", "observation_period_start_date"]], on="person_id")
    at_index = meas[meas["measurement_date"] == meas["observation_period_start_date"]]
    for loinc, name in (("4548-4", "hba1c"), ("62238-1", "egfr"), ("14682-9", "creatinine")):
        values = at_index[at_index["measurement_source_value"] == loinc].set_index("person_id")[
            "value_as_number"
        ]
        if values.index.has_duplicates:
            raise AssertionError(f"more than one {name} at the index visit")
        df[name] = df["person_id"].map(values)
    death = pop.omop("death").to_pandas()
    df["dead"] = df["person_id"].isin(death["person_id"]).astype(float)
    return df


def drug_users(pop: Population, atc_prefix: str) -> np.ndarray:
    drugs = pop.omop("drug_exposure").to_pandas()
    return np.asarray(drugs.loc[drugs["drug_source_value"].str.startswith(atc_prefix), "person_id"].unique())
