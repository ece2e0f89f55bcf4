"""The generated populations match the documented site profiles and model within sampling error."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from healthspace.synth import model
from healthspace.synth.sites import SCENARIO_IDS, SITES
from tests.synth._data import Population, drug_users

SITE_CODES = ("gz", "sz", "hk")
CONDITIONS = ("t2d", "htn", "ckd", "ihd", "copd")
Z = 4.0  # tolerance in standard errors: a correct generator fails one check in ~16,000


def _proportion_ok(observed: float, expected: float, n: int) -> bool:
    return abs(observed - expected) <= Z * math.sqrt(expected * (1 - expected) / n)


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _clipped_normal_mean(mu: float, sd: float, lo: float, hi: float) -> float:
    a, b = (lo - mu) / sd, (hi - mu) / sd
    return lo * _cdf(a) + hi * (1 - _cdf(b)) + mu * (_cdf(b) - _cdf(a)) + sd * (_phi(a) - _phi(b))


@pytest.mark.parametrize("site", SITE_CODES)
@pytest.mark.parametrize("condition", CONDITIONS)
def test_prevalence_matches_site_profile(
    baselines: dict[str, pd.DataFrame], site: str, condition: str
) -> None:
    df = baselines[site]
    expected = SITES[site].prevalence[condition]
    assert _proportion_ok(df[condition].mean(), expected, len(df)), (df[condition].mean(), expected)


@pytest.mark.parametrize("site", SITE_CODES)
def test_female_share_matches_site_profile(baselines: dict[str, pd.DataFrame], site: str) -> None:
    df = baselines[site]
    assert _proportion_ok(1 - df["male"].mean(), SITES[site].female_share, len(df))


@pytest.mark.parametrize("site", SITE_CODES)
def test_mean_age_matches_age_band_weights(baselines: dict[str, pd.DataFrame], site: str) -> None:
    df = baselines[site]
    w = np.asarray(SITES[site].age_band_weights)
    lo = np.array([b[0] for b in model.AGE_BANDS], dtype=float)
    hi = np.array([b[1] for b in model.AGE_BANDS], dtype=float)
    mid = (lo + hi) / 2
    mean = float(w @ mid)
    sd = math.sqrt(float(w @ ((hi - lo) ** 2 / 12 + mid**2)) - mean**2)
    assert abs(df["age"].mean() - mean) <= Z * sd / math.sqrt(len(df)), (df["age"].mean(), mean)


def test_shenzhen_is_youngest_and_hong_kong_oldest(baselines: dict[str, pd.DataFrame]) -> None:
    means = {site: baselines[site]["age"].mean() for site in SITE_CODES}
    assert means["sz"] < means["gz"] < means["hk"]


def test_every_patient_is_an_adult_at_index(baselines: dict[str, pd.DataFrame]) -> None:
    ages = pd.concat([b["age"] for b in baselines.values()])
    assert ages.min() >= 18.0 - 1 / 365
    assert ages.max() < 95.0


@pytest.mark.parametrize("site", SITE_CODES)
def test_hba1c_mean_in_diabetics_matches_model(baselines: dict[str, pd.DataFrame], site: str) -> None:
    p = model.HBA1C_DIABETES
    h = baselines[site].loc[lambda d: d["t2d"] == 1, "hba1c"]
    expected = _clipped_normal_mean(p["mean"], p["sd"], p["low"], p["high"])
    assert abs(h.mean() - expected) <= Z * p["sd"] / math.sqrt(len(h)) + 0.01, (h.mean(), expected)


@pytest.mark.parametrize("site", SITE_CODES)
def test_hba1c_mean_without_diabetes_matches_model(baselines: dict[str, pd.DataFrame], site: str) -> None:
    p = model.HBA1C_NO_DIABETES
    h = baselines[site].loc[lambda d: d["t2d"] == 0, "hba1c"]
    expected = _clipped_normal_mean(p["mean"], p["sd"], p["low"], p["high"])
    assert abs(h.mean() - expected) <= Z * p["sd"] / math.sqrt(len(h)) + 0.01, (h.mean(), expected)


def test_every_patient_has_one_hba1c_at_index(baselines: dict[str, pd.DataFrame]) -> None:
    assert all(b["hba1c"].notna().all() for b in baselines.values())


def test_egfr_at_index_is_below_60_exactly_in_ckd(baselines: dict[str, pd.DataFrame]) -> None:
    df = pd.concat(baselines.values())
    assert (df.loc[df["ckd"] == 1, "egfr"] < 60).all()
    assert (df.loc[df["ckd"] == 0, "egfr"] >= 60).all()


def test_mean_egfr_in_ckd_matches_stage_mix(baselines: dict[str, pd.DataFrame]) -> None:
    egfr = pd.concat(b.loc[b["ckd"] == 1, "egfr"] for b in baselines.values())
    # uniform on [lo, hi - 1] per stage, mixed by the stage probabilities
    parts = [
        (p, (lo + hi - 1) / 2, (hi - 1 - lo) ** 2 / 12)
        for p, (lo, hi) in zip(model.CKD_STAGE_PROBABILITIES, model.CKD_STAGE_EGFR, strict=True)
    ]
    mean = sum(p * m for p, m, _ in parts)
    var = sum(p * (v + m * m) for p, m, v in parts) - mean * mean
    assert abs(egfr.mean() - mean) <= Z * math.sqrt(var / len(egfr)) + 0.1, (egfr.mean(), mean)


def test_creatinine_gives_recorded_egfr_by_ckd_epi_2021(baselines: dict[str, pd.DataFrame]) -> None:
    df = pd.concat(baselines.values())
    # The 2021 race-free CKD-EPI creatinine equation, computed forward from the recorded creatinine.
    scr = df["creatinine"] / 88.42
    female = df["male"] == 0
    kappa = np.where(female, 0.7, 0.9)
    alpha = np.where(female, -0.241, -0.302)
    r = scr / kappa
    egfr = 142 * np.minimum(r, 1) ** alpha * np.maximum(r, 1) ** -1.2 * 0.9938 ** df["age"]
    egfr = egfr * np.where(female, 1.012, 1.0)
    # creatinine is recorded to 1 umol/L, which moves eGFR by up to ~2 %
    assert (np.abs(egfr - df["egfr"]) <= 0.025 * df["egfr"] + 0.6).all()


def test_metformin_is_prescribed_only_to_diabetics(
    populations: dict[str, Population], baselines: dict[str, pd.DataFrame]
) -> None:
    df = baselines["gz"]
    users = drug_users(populations["gz"], "A10BA02")
    assert len(users) > 0
    assert df.set_index("person_id").loc[users, "t2d"].eq(1).all()


def test_insulin_and_sglt2_are_prescribed_only_to_diabetics(
    populations: dict[str, Population], baselines: dict[str, pd.DataFrame]
) -> None:
    df = baselines["hk"].set_index("person_id")
    for prefix in ("A10A", "A10BK"):
        users = drug_users(populations["hk"], prefix)
        assert len(users) > 0, prefix
        assert df.loc[users, "t2d"].eq(1).all(), prefix


def test_statin_share_in_ihd_matches_treatment_rule(
    populations: dict[str, Population], baselines: dict[str, pd.DataFrame]
) -> None:
    df = baselines["hk"]
    on_statin = df["person_id"].isin(drug_users(populations["hk"], "C10AA"))
    ihd = df["ihd"] == 1
    expected = model.TREATMENT["statin_if_ihd"]
    assert _proportion_ok(on_statin[ihd].mean(), expected, int(ihd.sum()))
    assert on_statin[ihd].mean() > on_statin[~ihd].mean() + 0.3


def test_hba1c_is_higher_in_diabetics_than_in_others(baselines: dict[str, pd.DataFrame]) -> None:
    df = baselines["gz"]
    assert df.loc[df["t2d"] == 1, "hba1c"].mean() > df.loc[df["t2d"] == 0, "hba1c"].mean() + 1.5


@pytest.mark.parametrize("site", SITE_CODES)
@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_consent_permit_rate_matches_site_profile(
    populations: dict[str, Population], site: str, scenario: str
) -> None:
    consent = populations[site].omop("consent").to_pandas()
    rows = consent[consent["scenario_id"] == scenario]
    expected = SITES[site].consent_permit[scenario]
    assert len(rows) == populations[site].summary.patients
    assert _proportion_ok((rows["decision"] == "permit").mean(), expected, len(rows))


def test_consent_rates_differ_between_sites_and_scenarios() -> None:
    rates = {(s, sc) for s in SITE_CODES for sc in SCENARIO_IDS}
    assert len({SITES[s].consent_permit[sc] for s, sc in rates}) > len(SCENARIO_IDS)


def test_withdrawals_are_permits_withdrawn_after_the_decision(populations: dict[str, Population]) -> None:
    consent = populations["hk"].omop("consent").to_pandas()
    withdrawn = consent[consent["withdrawn_at"].notna()]
    assert len(withdrawn) > 0
    assert (withdrawn["decision"] == "permit").all()
    assert (withdrawn["withdrawn_at"] > withdrawn["decided_at"]).all()
    assert (withdrawn["withdrawn_at"] < pd.Timestamp(model.AS_OF.isoformat(), tz="UTC")).all()


def test_withdrawal_share_matches_model(populations: dict[str, Population]) -> None:
    consent = populations["hk"].omop("consent").to_pandas()
    permits = consent[consent["decision"] == "permit"]
    for scenario, rate in model.CONSENT_WITHDRAWAL.items():
        rows = permits[permits["scenario_id"] == scenario]
        # a permit decided on the last observed day cannot be withdrawn, hence a one-sided slack
        observed = rows["withdrawn_at"].notna().mean()
        assert _proportion_ok(observed, rate, len(rows)) or 0 < rate - observed < 0.005, scenario
