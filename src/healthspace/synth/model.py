"""The generating model of the synthetic hospitals: every parameter the ground truth depends on, frozen.

Analyses of the generated data (prevalence, incidence, federated logistic regression) are checked
against these numbers. docs/synth.md describes the same model in prose; change both together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from healthspace.core.errors import ConfigurationError
from healthspace.synth.sites import SCENARIO_IDS, SiteProfile

__all__ = [
    "AGE_BANDS",
    "AS_OF",
    "CKD_STAGE_EGFR",
    "CKD_STAGE_PROBABILITIES",
    "CONDITION_MODELS",
    "CONSENT_WITHDRAWAL",
    "FOLLOW_UP_END",
    "HBA1C_DIABETES",
    "HBA1C_NO_DIABETES",
    "INDEX_FIRST",
    "INDEX_LAST",
    "OUTCOME_AGE_CENTRE",
    "OUTCOME_COEFFICIENTS",
    "OUTCOME_HBA1C_CENTRE",
    "TREATMENT",
    "VISIT_RATES",
    "ConditionModel",
    "condition_scales",
    "day_number",
    "model_json",
    "outcome_linear_predictor",
]

# --- calendar -------------------------------------------------------------------------------------
# A fixed "as-of" date, never `now`, so a seed always gives the same files.
AS_OF = date(2026, 1, 1)
FOLLOW_UP_END = date(2025, 12, 31)  # last day of observation for patients alive at the end
INDEX_FIRST = date(2023, 1, 1)  # index (first) visits fall in 2023
INDEX_LAST = date(2023, 12, 31)

_EPOCH = date(1970, 1, 1)


def day_number(d: date) -> int:
    """Days since 1970-01-01, the representation of Arrow's date32."""
    return (d - _EPOCH).days


# --- demographics ---------------------------------------------------------------------------------
# Age at the index visit is uniform within a band; band shares come from the site profile.
AGE_BANDS: tuple[tuple[int, int], ...] = (
    (18, 30),
    (30, 40),
    (40, 50),
    (50, 60),
    (60, 70),
    (70, 80),
    (80, 95),
)


# --- chronic conditions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ConditionModel:
    """P(condition) = scale(site) x age_multiplier[band] x male_rr^male x prod(rr[c] for earlier c present).

    `scale` is solved exactly (see `condition_scales`) so that the expected prevalence at a site equals
    the site's documented prevalence.
    """

    key: str
    age_multipliers: tuple[float, ...]
    male_rr: float
    rr_given: Mapping[str, float]


CONDITION_MODELS: tuple[ConditionModel, ...] = (
    ConditionModel("t2d", (0.15, 0.35, 0.70, 1.20, 1.80, 2.10, 2.00), 1.20, MappingProxyType({})),
    ConditionModel("htn", (0.15, 0.30, 0.60, 1.10, 1.60, 2.00, 2.20), 1.15, MappingProxyType({"t2d": 1.5})),
    ConditionModel(
        "ckd", (0.10, 0.20, 0.40, 0.80, 1.50, 2.60, 3.80), 1.00, MappingProxyType({"t2d": 2.2, "htn": 1.8})
    ),
    ConditionModel(
        "ihd", (0.03, 0.10, 0.35, 0.80, 1.60, 2.60, 3.40), 1.80, MappingProxyType({"t2d": 2.0, "htn": 1.8})
    ),
    ConditionModel("copd", (0.05, 0.10, 0.30, 0.70, 1.50, 2.40, 3.00), 2.50, MappingProxyType({})),
)
MAX_CONDITION_PROBABILITY = 0.95

# CKD stage 3 / 4 / 5 among CKD patients, and the baseline eGFR range of each (uniform within).
CKD_STAGE_PROBABILITIES: tuple[float, float, float] = (0.75, 0.18, 0.07)
CKD_STAGE_EGFR: tuple[tuple[float, float], ...] = ((30.0, 60.0), (15.0, 30.0), (5.0, 15.0))


def _condition_solution(site: SiteProfile) -> tuple[tuple[float, ...], float]:
    # Enumerate (band, sex, earlier conditions) exactly: 7 x 2 x 2^k cells, so the scale that gives the
    # documented marginal prevalence is exact rather than estimated from a sample.
    female = site.female_share
    cells: list[tuple[int, bool, dict[str, bool], float]] = []
    for band, w in enumerate(site.age_band_weights):
        cells.append((band, False, {}, w * female))
        cells.append((band, True, {}, w * (1.0 - female)))
    scales: list[float] = []
    worst = 0.0
    for cm in CONDITION_MODELS:

        def relative(cell: tuple[int, bool, dict[str, bool], float], cm: ConditionModel = cm) -> float:
            band, male, flags, _ = cell
            r = cm.age_multipliers[band] * (cm.male_rr if male else 1.0)
            for other, rr in cm.rr_given.items():
                if flags[other]:
                    r *= rr
            return r

        expected = sum(cell[3] * relative(cell) for cell in cells)
        scale = site.prevalence[cm.key] / expected
        scales.append(scale)
        nxt: list[tuple[int, bool, dict[str, bool], float]] = []
        for cell in cells:
            p = scale * relative(cell)
            worst = max(worst, p)
            band, male, flags, w = cell
            nxt.append((band, male, {**flags, cm.key: True}, w * p))
            nxt.append((band, male, {**flags, cm.key: False}, w * (1.0 - p)))
        cells = nxt
    return tuple(scales), worst


def condition_scales(site: SiteProfile) -> tuple[float, ...]:
    """Scale factor of each condition (order of CONDITION_MODELS) that makes the site prevalence exact.

    Raises ConfigurationError if some patient type would get a probability above 0.95, which would make
    the documented prevalence unreachable.
    """
    scales, worst = _condition_solution(site)
    if worst > MAX_CONDITION_PROBABILITY:
        raise ConfigurationError(
            f"site {site.code!r}: a condition probability reaches {worst:.3f} > {MAX_CONDITION_PROBABILITY}"
        )
    return scales


# --- laboratory values ----------------------------------------------------------------------------
# HbA1c (%) at the index visit: normal(mean, sd) clipped to [low, high], recorded with one decimal.
HBA1C_DIABETES = MappingProxyType({"mean": 7.6, "sd": 1.4, "low": 5.8, "high": 14.0})
HBA1C_NO_DIABETES = MappingProxyType({"mean": 5.4, "sd": 0.35, "low": 4.0, "high": 6.4})
HBA1C_FOLLOW_UP_SD = 0.4
# eGFR (mL/min/1.73 m2) without CKD: normal(125 - 0.7 x age, 12) clipped to [60, 150].
EGFR_NO_CKD = MappingProxyType({"intercept": 125.0, "per_year": -0.7, "sd": 12.0, "low": 60.0, "high": 150.0})
EGFR_FOLLOW_UP_SD = 4.0
# Fasting glucose (mmol/L) = 1.59 x HbA1c - 3.2 + normal(0, 0.7), clipped to [3, 30].
GLUCOSE = MappingProxyType({"per_hba1c": 1.59, "intercept": -3.2, "sd": 0.7, "low": 3.0, "high": 30.0})
# LDL (mmol/L) = normal(3.1 + 0.2 x diabetes - 1.1 x statin, 0.8) clipped to [0.8, 7.5].
LDL = MappingProxyType({"mean": 3.1, "diabetes": 0.2, "statin": -1.1, "sd": 0.8, "low": 0.8, "high": 7.5})
# Systolic BP (mmHg) = 118 + 0.45 (age - 40) + 16 htn - 8 antihypertensive + normal(0, 12), in [85, 230];
# diastolic = 20 + 0.45 systolic + normal(0, 7), in [45, 130].
SBP = MappingProxyType(
    {"intercept": 118.0, "per_year_over_40": 0.45, "htn": 16.0, "treated": -8.0, "sd": 12.0}
)
DBP = MappingProxyType({"intercept": 20.0, "per_sbp": 0.45, "sd": 7.0})
# BMI (kg/m2) = normal(23.0 + 2.5 diabetes + 1.2 htn, 3.2) clipped to [15, 48].
BMI = MappingProxyType({"mean": 23.0, "diabetes": 2.5, "htn": 1.2, "sd": 3.2, "low": 15.0, "high": 48.0})

# --- treatments (patient level, fixed over follow-up) ----------------------------------------------
TREATMENT = MappingProxyType(
    {
        "metformin_if_t2d": 0.80,
        "metformin_if_t2d_egfr_below_30": 0.10,
        "insulin_if_t2d_hba1c_9_or_more": 0.55,
        "insulin_if_t2d_hba1c_below_9": 0.08,
        "sitagliptin_if_t2d": 0.20,
        "sglt2_if_t2d_with_ckd_or_ihd": 0.40,
        "sglt2_if_t2d_otherwise": 0.15,
        "statin_if_ihd": 0.85,
        "statin_if_t2d": 0.55,
        "statin_if_htn": 0.25,
        "statin_otherwise": 0.04,
        "ace_inhibitor_if_htn_with_t2d_or_ckd": 0.50,
        "ace_inhibitor_if_htn_otherwise": 0.30,
        "losartan_if_htn_without_ace_inhibitor": 0.35,
        "amlodipine_if_htn": 0.45,
        "aspirin_if_ihd": 0.75,
        "tiotropium_if_copd": 0.60,
        "salbutamol_if_copd": 0.80,
    }
)

# --- visits ---------------------------------------------------------------------------------------
# Follow-up visits per year of follow-up: base + per_condition x number of chronic conditions (Poisson).
VISIT_RATES = MappingProxyType(
    {
        "outpatient": (1.6, 1.1),
        "emergency": (0.12, 0.08),
        "inpatient": (0.04, 0.08),
    }
)
# Probability that a follow-up visit of a patient with a chronic condition is coded to one of them.
CHRONIC_VISIT_REASON = 0.65

# --- outcome --------------------------------------------------------------------------------------
# Death during follow-up (index visit to 2025-12-31), logistic in covariates measured at the index visit:
#   logit P(death) = intercept + age_per_10y (age - 60)/10 + male + hba1c_per_pct (HbA1c - 6.0)
#                    + ckd + ihd + copd
# age = (index date - birth date) in days / 365.25; HbA1c = the value recorded at the index visit;
# ckd/ihd/copd = the condition is on the problem list at the index visit.
OUTCOME_COEFFICIENTS: Mapping[str, float] = MappingProxyType(
    {
        "intercept": -3.4,
        "age_per_10y": 0.55,
        "male": 0.35,
        "hba1c_per_pct": 0.20,
        "ckd": 0.75,
        "ihd": 0.60,
        "copd": 0.55,
    }
)
OUTCOME_AGE_CENTRE = 60.0
OUTCOME_HBA1C_CENTRE = 6.0


def outcome_linear_predictor(
    age_years: npt.NDArray[np.float64],
    male: npt.NDArray[np.bool_],
    hba1c: npt.NDArray[np.float64],
    ckd: npt.NDArray[np.bool_],
    ihd: npt.NDArray[np.bool_],
    copd: npt.NDArray[np.bool_],
) -> npt.NDArray[np.float64]:
    """Log-odds of death during follow-up for each patient (see OUTCOME_COEFFICIENTS)."""
    c = OUTCOME_COEFFICIENTS
    eta: npt.NDArray[np.float64] = (
        c["intercept"]
        + c["age_per_10y"] * (age_years - OUTCOME_AGE_CENTRE) / 10.0
        + c["male"] * male
        + c["hba1c_per_pct"] * (hba1c - OUTCOME_HBA1C_CENTRE)
        + c["ckd"] * ckd
        + c["ihd"] * ihd
        + c["copd"] * copd
    )
    return eta


# --- consent --------------------------------------------------------------------------------------
# Probability that a permit is later withdrawn, by scenario (same at every site). The permit rates are
# per site (sites.py).
CONSENT_WITHDRAWAL: Mapping[str, float] = MappingProxyType(
    dict(zip(SCENARIO_IDS, (0.04, 0.02, 0.03, 0.08), strict=True))
)
# Decisions are taken between the index visit and this day.
CONSENT_DECISIONS_UNTIL = date(2025, 12, 1)


def model_json(site: SiteProfile) -> dict[str, Any]:
    """The parameters used for `site`, as recorded in the manifest."""

    def plain(m: Mapping[str, Any]) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in m.items()}

    return {
        "as_of": AS_OF.isoformat(),
        "index_dates": [INDEX_FIRST.isoformat(), INDEX_LAST.isoformat()],
        "follow_up_end": FOLLOW_UP_END.isoformat(),
        "age_bands": [list(b) for b in AGE_BANDS],
        "conditions": [
            {
                "key": cm.key,
                "age_multipliers": list(cm.age_multipliers),
                "male_rr": cm.male_rr,
                "rr_given": dict(cm.rr_given),
                "scale": scale,
            }
            for cm, scale in zip(CONDITION_MODELS, condition_scales(site), strict=True)
        ],
        "ckd_stage_probabilities": list(CKD_STAGE_PROBABILITIES),
        "ckd_stage_egfr": [list(r) for r in CKD_STAGE_EGFR],
        "labs": {
            "hba1c_diabetes": plain(HBA1C_DIABETES),
            "hba1c_no_diabetes": plain(HBA1C_NO_DIABETES),
            "hba1c_follow_up_sd": HBA1C_FOLLOW_UP_SD,
            "egfr_no_ckd": plain(EGFR_NO_CKD),
            "egfr_follow_up_sd": EGFR_FOLLOW_UP_SD,
            "glucose": plain(GLUCOSE),
            "ldl": plain(LDL),
            "sbp": plain(SBP),
            "dbp": plain(DBP),
            "bmi": plain(BMI),
        },
        "treatment": plain(TREATMENT),
        "visit_rates_per_year": plain(VISIT_RATES),
        "chronic_visit_reason": CHRONIC_VISIT_REASON,
        "outcome": {
            "event": "death during follow-up (OMOP death row / FHIR Patient.deceasedDateTime)",
            "link": "logit",
            "coefficients": dict(OUTCOME_COEFFICIENTS),
            "age_centre": OUTCOME_AGE_CENTRE,
            "hba1c_centre": OUTCOME_HBA1C_CENTRE,
        },
        "consent_withdrawal": dict(CONSENT_WITHDRAWAL),
        "consent_decisions_until": CONSENT_DECISIONS_UNTIL.isoformat(),
    }
