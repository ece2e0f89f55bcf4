"""Synthetic hospital populations with known ground truth (FHIR R4 NDJSON, OMOP-style Parquet).

Entry point: `healthspace.synth.generate.generate`; CLI: `healthspace synth` (`synth.cli.synth_command`).
The generating model, including the outcome coefficients, is in `healthspace.synth.model`.
"""

from healthspace.synth.model import OUTCOME_COEFFICIENTS
from healthspace.synth.sites import SCENARIO_IDS, SITES, SiteProfile, get_site

__all__ = ["OUTCOME_COEFFICIENTS", "SCENARIO_IDS", "SITES", "SiteProfile", "get_site"]
