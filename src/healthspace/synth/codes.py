"""Code tables of the synthetic hospitals: ICD-10, LOINC, ATC and SNOMED CT codes with their displays."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ACUTE_CONDITIONS",
    "CHRONIC_CONDITION_CODES",
    "DRUGS",
    "LABS",
    "PROCEDURES",
    "SYSTEM_ATC",
    "SYSTEM_ICD10",
    "SYSTEM_LOINC",
    "SYSTEM_SNOMED",
    "SYSTEM_UCUM",
    "Code",
    "Drug",
    "Lab",
]

# FHIR canonical URIs of the code systems; the OMOP side names them by their OMOP vocabulary_id.
SYSTEM_ICD10 = "http://hl7.org/fhir/sid/icd-10"
SYSTEM_LOINC = "http://loinc.org"
SYSTEM_ATC = "http://www.whocc.no/atc"
SYSTEM_SNOMED = "http://snomed.info/sct"
SYSTEM_UCUM = "http://unitsofmeasure.org"


@dataclass(frozen=True)
class Code:
    """A code with its display. Displays are plain ASCII without quotes so they embed in JSON as is."""

    code: str
    display: str


@dataclass(frozen=True)
class Lab:
    """A LOINC-coded measurement: UCUM unit, decimals it is recorded with, and FHIR category."""

    key: str
    code: str
    display: str
    unit: str
    decimals: int
    category: str  # "laboratory" or "vital-signs"


@dataclass(frozen=True)
class Drug:
    """An ATC-coded drug with the prescription written for it."""

    key: str
    code: str
    display: str
    route: str
    sig: str
    units_per_day: float
    days_supply: int


# WHO ICD-10 (four-character) codes of the chronic conditions, by condition key. CKD is coded by stage.
CHRONIC_CONDITION_CODES: dict[str, tuple[Code, ...]] = {
    "t2d": (Code("E11.9", "Type 2 diabetes mellitus without complications"),),
    "htn": (Code("I10", "Essential (primary) hypertension"),),
    "ckd": (
        Code("N18.3", "Chronic kidney disease, stage 3"),
        Code("N18.4", "Chronic kidney disease, stage 4"),
        Code("N18.5", "Chronic kidney disease, stage 5"),
    ),
    "ihd": (Code("I25.1", "Atherosclerotic heart disease"),),
    "copd": (Code("J44.9", "Chronic obstructive pulmonary disease, unspecified"),),
}

# Reasons for a visit of a patient seen for something other than a chronic condition, with weights.
ACUTE_CONDITIONS: tuple[tuple[Code, float], ...] = (
    (Code("J06.9", "Acute upper respiratory infection, unspecified"), 0.30),
    (Code("M54.5", "Low back pain"), 0.15),
    (Code("K52.9", "Noninfective gastroenteritis and colitis, unspecified"), 0.12),
    (Code("R51", "Headache"), 0.10),
    (Code("N39.0", "Urinary tract infection, site not specified"), 0.10),
    (Code("K21.9", "Gastro-oesophageal reflux disease without oesophagitis"), 0.10),
    (Code("M17.9", "Gonarthrosis, unspecified"), 0.07),
    (Code("J18.9", "Pneumonia, unspecified"), 0.06),
)

# Order matters: it is the column order of the lab matrices in the simulation.
LABS: tuple[Lab, ...] = (
    Lab("hba1c", "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 1, "laboratory"),
    Lab("glucose", "14771-0", "Fasting glucose [Moles/volume] in Serum or Plasma", "mmol/L", 1, "laboratory"),
    Lab("creatinine", "14682-9", "Creatinine [Moles/volume] in Serum or Plasma", "umol/L", 0, "laboratory"),
    Lab(
        "egfr",
        "62238-1",
        "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or Blood "
        "by Creatinine-based formula (CKD-EPI)",
        "mL/min/{1.73_m2}",
        0,
        "laboratory",
    ),
    Lab("ldl", "22748-8", "Cholesterol in LDL [Moles/volume] in Serum or Plasma", "mmol/L", 1, "laboratory"),
    Lab("sbp", "8480-6", "Systolic blood pressure", "mm[Hg]", 0, "vital-signs"),
    Lab("dbp", "8462-4", "Diastolic blood pressure", "mm[Hg]", 0, "vital-signs"),
    Lab("bmi", "39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 1, "vital-signs"),
)

# Order matters: it is the column order of the treatment matrix in the simulation.
DRUGS: tuple[Drug, ...] = (
    Drug("metformin", "A10BA02", "metformin", "oral", "500 mg twice daily", 2, 90),
    Drug("insulin_glargine", "A10AE04", "insulin glargine", "subcutaneous", "20 units at bedtime", 1, 30),
    Drug("sitagliptin", "A10BH01", "sitagliptin", "oral", "100 mg once daily", 1, 90),
    Drug("dapagliflozin", "A10BK01", "dapagliflozin", "oral", "10 mg once daily", 1, 90),
    Drug("empagliflozin", "A10BK03", "empagliflozin", "oral", "10 mg once daily", 1, 90),
    Drug("atorvastatin", "C10AA05", "atorvastatin", "oral", "20 mg once daily at night", 1, 90),
    Drug("rosuvastatin", "C10AA07", "rosuvastatin", "oral", "10 mg once daily", 1, 90),
    Drug("enalapril", "C09AA02", "enalapril", "oral", "10 mg twice daily", 2, 90),
    Drug("perindopril", "C09AA04", "perindopril", "oral", "4 mg once daily", 1, 90),
    Drug("losartan", "C09CA01", "losartan", "oral", "50 mg once daily", 1, 90),
    Drug("amlodipine", "C08CA01", "amlodipine", "oral", "5 mg once daily", 1, 90),
    Drug("aspirin", "B01AC06", "acetylsalicylic acid", "oral", "100 mg once daily", 1, 90),
    Drug(
        "tiotropium", "R03BB04", "tiotropium bromide", "inhalation", "18 micrograms inhaled once daily", 1, 30
    ),
    Drug("salbutamol", "R03AC02", "salbutamol", "inhalation", "2 puffs of 100 micrograms as needed", 4, 30),
)

# SNOMED CT procedure codes. Order matters: column order of the procedure matrix in the simulation.
PROCEDURES: tuple[Code, ...] = (
    Code("29303009", "Electrocardiographic procedure"),
    Code("399208008", "Plain chest X-ray"),
    Code("127783003", "Spirometry"),
    Code("415070008", "Percutaneous coronary intervention"),
    Code("302497006", "Hemodialysis"),
)
