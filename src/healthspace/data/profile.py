"""Data standard profiles: the declarative rules every ingested resource is checked against.

A profile names, per FHIR resource type, the elements that must be present, the code systems its main
code may come from, value sets for coded elements, the unit and plausible range of each LOINC measurement,
and formats for patient identifiers. It is plain JSON (see `docs/data.md`); `default_profile()` is the
one the demo hospitals load against.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from healthspace.core.errors import ValidationError
from healthspace.data.fhir import ELEMENTS

__all__ = ["MeasurementRule", "StandardProfile", "default_profile", "load_profile"]


class MeasurementRule(BaseModel):
    """Accepted units (UCUM codes) and plausible range [low, high] of one LOINC-coded measurement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str = Field(description="LOINC code, e.g. 4548-4")
    name: str = ""
    units: list[str] = Field(min_length=1)
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _range(self) -> MeasurementRule:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"measurement {self.code}: low {self.low} > high {self.high}")
        return self


class StandardProfile(BaseModel):
    """A data standard. Element names are those of `healthspace.data.fhir.ELEMENTS`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    version: str
    title: str = ""
    required: dict[str, list[str]] = Field(default_factory=dict, description="type -> elements")
    code_systems: dict[str, list[str]] = Field(
        default_factory=dict, description="type -> allowed system URIs of its main code"
    )
    value_sets: dict[str, list[str]] = Field(default_factory=dict, description='"Type.element" -> codes')
    measurements: list[MeasurementRule] = Field(default_factory=list)
    measurements_closed: bool = Field(
        default=False, description="reject LOINC codes that have no measurement rule"
    )
    identifier_formats: dict[str, str] = Field(
        default_factory=dict, description="Patient.identifier system URI -> regular expression (full match)"
    )

    @model_validator(mode="after")
    def _known(self) -> StandardProfile:
        for rtype, elements in self.required.items():
            for el in elements:
                if el not in ELEMENTS.get(rtype, {}):
                    raise ValueError(f"required element {rtype}.{el} is not one we map")
        for rtype in self.code_systems:
            if rtype not in ELEMENTS:
                raise ValueError(f"code systems given for unmapped type {rtype}")
        for key in self.value_sets:
            rtype, _, el = key.partition(".")
            if el not in ELEMENTS.get(rtype, {}):
                raise ValueError(f"value set for {key}, which is not an element we map")
        for system, pattern in self.identifier_formats.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"identifier format for {system}: {exc}") from None
        codes = [m.code for m in self.measurements]
        if len(codes) != len(set(codes)):
            raise ValueError("a LOINC code has more than one measurement rule")
        return self

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    def allowed_systems(self, rtype: str) -> frozenset[str]:
        return frozenset(self.code_systems.get(rtype, ()))


def load_profile(source: Path | str | bytes) -> StandardProfile:
    """Load a profile from a JSON file path or JSON text; a bad profile raises `ValidationError`."""
    try:
        text = Path(source).read_bytes() if isinstance(source, Path) else source
        return StandardProfile.model_validate_json(text)
    except (OSError, pydantic.ValidationError) as exc:
        raise ValidationError(f"standard profile rejected: {exc}") from None


def default_profile() -> StandardProfile:
    """The demo's standard (`profiles/default.json` in this package)."""
    text = resources.files("healthspace.data").joinpath("profiles/default.json").read_text("utf-8")
    return StandardProfile.model_validate(json.loads(text))
