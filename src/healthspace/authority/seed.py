"""Usage scenarios a new Greater Bay Area data space starts with (seeded by the demo)."""

from __future__ import annotations

from datetime import date

from healthspace.authority.models import OutputType, ScenarioCreate

__all__ = ["DEMO_SCENARIOS"]

# The ids are shared with the synthetic generator's consent table (synth/): keep them in step.
DEMO_SCENARIOS: tuple[ScenarioCreate, ...] = (
    ScenarioCreate(
        id="diabetes-outcomes-research",
        title="Type 2 diabetes outcomes research",
        description="Cohort studies of glycaemic control, treatment pathways and complications in adults "
        "with type 2 diabetes across Greater Bay Area hospitals.",
        purpose_code="HRESCH",
        data_classes=["demographics", "conditions", "laboratory", "medications", "encounters"],
        output_types=[OutputType.AGGREGATE, OutputType.MODEL],
        approving_body="Joint Research Ethics Committee, GBA Health Data Space",
        approval_reference="JREC-2026-014",
        valid_from=date(2026, 1, 1),
        valid_until=date(2028, 12, 31),
    ),
    ScenarioCreate(
        id="hospital-quality-improvement",
        title="Hospital quality improvement",
        description="Benchmarking of readmission, length of stay and guideline adherence between hospitals.",
        purpose_code="HOPERAT",
        data_classes=["demographics", "encounters", "conditions", "procedures"],
        output_types=[OutputType.AGGREGATE],
        approving_body="Guangdong Provincial Health Commission, Quality Control Centre",
        approval_reference="GDHC-QC-2026-07",
        valid_from=date(2026, 1, 1),
        valid_until=date(2027, 12, 31),
    ),
    ScenarioCreate(
        id="drug-safety-surveillance",
        title="Post-marketing drug safety surveillance",
        description="Signal detection for adverse events after new glucose-lowering and cardiovascular "
        "drugs.",
        purpose_code="PUBHLTH",
        data_classes=["demographics", "conditions", "medications", "laboratory"],
        output_types=[OutputType.AGGREGATE, OutputType.DEIDENTIFIED_EXTRACT],
        approving_body="Hong Kong Department of Health, Drug Office",
        approval_reference="DO-PV-2026-031",
        valid_from=date(2026, 3, 1),
        valid_until=date(2029, 2, 28),
    ),
    ScenarioCreate(
        id="imaging-triage-ai-training",
        title="AI model training for imaging triage",
        description="Training and validation of a triage model on structured findings linked to imaging "
        "referrals; only the trained model leaves the hospital.",
        purpose_code="TREATDS",
        data_classes=["demographics", "conditions", "procedures", "encounters"],
        output_types=[OutputType.MODEL],
        approving_body="Macao Health Bureau, Ethics Committee for Medical Research",
        approval_reference="SSM-CEPM-2026-112",
        valid_from=date(2026, 6, 1),
        valid_until=date(2027, 5, 31),
    ),
)
