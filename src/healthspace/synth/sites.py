"""Registry of the synthetic hospital sites: population structure, disease prevalence and consent rates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from healthspace.core.errors import ValidationError

__all__ = ["SCENARIO_IDS", "SITES", "SiteProfile", "get_site"]

# Usage scenarios of the authority's scenario registry (authority/seed.py); keep the ids in step.
SCENARIO_IDS: tuple[str, ...] = (
    "diabetes-outcomes-research",
    "hospital-quality-improvement",
    "drug-safety-surveillance",
    "imaging-triage-ai-training",
)


@dataclass(frozen=True)
class SiteProfile:
    """Parameters of one synthetic hospital.

    `age_band_weights` are the shares of the adult patients in the bands of `model.AGE_BANDS` (sum 1);
    `prevalence` is the expected share of patients with each chronic condition (keys of
    `model.CONDITION_MODELS`); `consent_permit` is the probability that a patient permits each scenario.
    """

    code: str
    name: str
    city: str
    jurisdiction: str
    country: str
    female_share: float
    age_band_weights: tuple[float, ...]
    prevalence: Mapping[str, float]
    consent_permit: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "city": self.city,
            "jurisdiction": self.jurisdiction,
            "country": self.country,
            "female_share": self.female_share,
            "age_band_weights": list(self.age_band_weights),
            "prevalence": dict(self.prevalence),
            "consent_permit": dict(self.consent_permit),
        }


def _site(
    code: str,
    name: str,
    city: str,
    jurisdiction: str,
    country: str,
    female_share: float,
    age_band_weights: tuple[float, ...],
    prevalence: dict[str, float],
    consent_permit: tuple[float, float, float, float],
) -> SiteProfile:
    return SiteProfile(
        code=code,
        name=name,
        city=city,
        jurisdiction=jurisdiction,
        country=country,
        female_share=female_share,
        age_band_weights=age_band_weights,
        prevalence=MappingProxyType(prevalence),
        consent_permit=MappingProxyType(dict(zip(SCENARIO_IDS, consent_permit, strict=True))),
    )


# Bands: 18-29, 30-39, 40-49, 50-59, 60-69, 70-79, 80-94. Consent order follows SCENARIO_IDS.
SITES: Mapping[str, SiteProfile] = MappingProxyType(
    {
        "gz": _site(
            "gz",
            "Guangzhou general hospital",
            "Guangzhou",
            "CN-GD",
            "CN",
            0.51,
            (0.16, 0.18, 0.17, 0.17, 0.15, 0.11, 0.06),
            {"t2d": 0.12, "htn": 0.25, "ckd": 0.08, "ihd": 0.06, "copd": 0.05},
            (0.82, 0.90, 0.76, 0.60),
        ),
        "sz": _site(
            "sz",
            "Shenzhen general hospital",
            "Shenzhen",
            "CN-GD",
            "CN",
            0.48,
            (0.27, 0.26, 0.19, 0.13, 0.08, 0.05, 0.02),
            {"t2d": 0.08, "htn": 0.16, "ckd": 0.05, "ihd": 0.03, "copd": 0.025},
            (0.78, 0.88, 0.72, 0.65),
        ),
        "hk": _site(
            "hk",
            "Hong Kong general hospital",
            "Hong Kong",
            "HK",
            "HK",
            0.54,
            (0.09, 0.11, 0.13, 0.17, 0.20, 0.18, 0.12),
            {"t2d": 0.16, "htn": 0.32, "ckd": 0.11, "ihd": 0.09, "copd": 0.07},
            (0.70, 0.85, 0.66, 0.48),
        ),
    }
)


def get_site(name: str) -> SiteProfile:
    """The profile named `name`; an unknown name is a `ValidationError` that lists the known ones."""
    profile = SITES.get(name)
    if profile is None:
        raise ValidationError(
            f"unknown site {name!r}; known sites: {', '.join(sorted(SITES))}", known_sites=sorted(SITES)
        )
    return profile
