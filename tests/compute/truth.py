"""Ground truth for the engine tests, computed in pandas straight from the synth Parquet files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tests.compute.conftest import consenting_ids, omop


def cohort(site_dir: Path, prefix: str) -> pd.DataFrame:
    """Consenting persons with a condition code starting with `prefix`: person_id, sex, age, index, end."""
    person = omop(site_dir, "person")
    period = omop(site_dir, "observation_period")
    cond = omop(site_dir, "condition_occurrence")
    ids = set(cond.loc[cond.condition_source_value.str.startswith(prefix), "person_id"])
    ids &= set(consenting_ids(site_dir))
    df = person[person.person_id.isin(ids)].merge(period, on="person_id")
    df["sex"] = np.where(df.gender_concept_id == 8507, "male", "female")
    birth = pd.to_datetime(dict(year=df.year_of_birth, month=df.month_of_birth, day=df.day_of_birth))
    df["index"] = pd.to_datetime(df.observation_period_start_date)
    df["end"] = pd.to_datetime(df.observation_period_end_date)
    df["age"] = (df["index"] - birth).dt.days / 365.25
    return df[["person_id", "sex", "age", "index", "end"]]


def follow_up(site_dir: Path, c: pd.DataFrame) -> pd.DataFrame:
    """Days from index to death (event) or end of observation (censored); deaths on/before index excluded."""
    death = omop(site_dir, "death")
    df = c.merge(death[["person_id", "death_date"]], on="person_id", how="left")
    dd = pd.to_datetime(df.death_date)
    df = df[~(dd <= df["index"])].copy()
    dd = pd.to_datetime(df.death_date)
    hit = dd.notna() & (dd <= df["end"])
    df["ev"] = hit.astype(int)
    df["t"] = np.where(hit, (dd - df["index"]).dt.days, (df["end"] - df["index"]).dt.days)
    return df
