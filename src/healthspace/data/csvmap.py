"""CSV files described by a mapping: each row becomes a FHIR R4 resource, then the usual validated ingest.

A mapping is a FHIR resource written as a template, with `{column}` placeholders for the CSV's cells:

    {"resourceType": "Observation",
     "template": {"resourceType": "Observation", "id": "lab-{lab_id}", "status": "final",
                  "subject": {"reference": "Patient/{patient_id}"},
                  "code": {"coding": [{"system": "http://loinc.org", "code": "{loinc}"}]},
                  "effectiveDateTime": "{taken_at}",
                  "valueQuantity": {"value": "{value:number}", "unit": "{unit}", "code": "{unit}"}}}

A string that is exactly one placeholder takes the cell's value (`:number` makes it a JSON number when
it parses as one); placeholders inside longer strings are substituted as text. An empty cell removes the
member it fills, so the standard's required-element rules see it missing. A cell that does not parse as
the type asked for is kept as written, so validation refuses the resource and quarantines it with the
reason instead of storing it without the value. Rows become NDJSON, streamed, and go through
`ingest_ndjson`: the same standard, quarantine, idempotency and atomic batch as FHIR exports.
"""

from __future__ import annotations

import csv
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from healthspace.core.errors import ValidationError
from healthspace.data.ingest import IngestReport, ingest_ndjson
from healthspace.data.profile import StandardProfile
from healthspace.data.store import ClinicalStore

__all__ = ["CsvMapping", "csv_to_ndjson", "ingest_csv", "load_mapping"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_ .-]*?)(?::(number|string))?\}")
_DROP = object()  # a member whose only cell was empty


class CsvMapping(BaseModel):
    """How the rows of one kind of CSV file become FHIR resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resource_type: str = Field(alias="resourceType", pattern=r"^[A-Z][A-Za-z]+$")
    template: dict[str, Any]
    delimiter: Literal[",", ";", "\t", "|"] = ","
    encoding: str = "utf-8"

    def columns(self) -> set[str]:
        """Every column the template names."""
        found: set[str] = set()

        def walk(v: Any) -> None:
            if isinstance(v, str):
                found.update(m.group(1) for m in _PLACEHOLDER.finditer(v))
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)

        walk(self.template)
        return found


def load_mapping(path: Path) -> CsvMapping:
    try:
        mapping = CsvMapping.model_validate(orjson.loads(path.read_bytes()))
    except FileNotFoundError:
        raise ValidationError(f"no such CSV mapping: {path.name}") from None
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise ValidationError(f"CSV mapping {path.name} is not valid: {exc}") from None
    if mapping.template.get("resourceType") != mapping.resource_type:
        raise ValidationError(
            f"CSV mapping {path.name}: the template's resourceType must be {mapping.resource_type}"
        )
    return mapping


def _fill(value: Any, row: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: v for k, v in ((k, _fill(v, row)) for k, v in value.items()) if v is not _DROP}
        return out or _DROP
    if isinstance(value, list):
        items = [v for v in (_fill(x, row) for x in value) if v is not _DROP]
        return items or _DROP
    if not isinstance(value, str):
        return value
    whole = _PLACEHOLDER.fullmatch(value)
    if whole:
        cell = row[whole.group(1)].strip()
        if not cell:
            return _DROP
        if whole.group(2) == "number":
            try:
                number = float(cell)
            except ValueError:
                return cell  # kept as written: validation refuses it with the reason
            return (
                int(number) if number.is_integer() and "." not in cell and "e" not in cell.lower() else number
            )
        return cell
    cells = [row[m.group(1)].strip() for m in _PLACEHOLDER.finditer(value)]
    if any(not c for c in cells):
        return _DROP
    return _PLACEHOLDER.sub(lambda m: row[m.group(1)].strip(), value)


def _rows(path: Path, mapping: CsvMapping) -> Iterator[bytes]:
    with path.open(newline="", encoding=mapping.encoding) as f:
        reader = csv.DictReader(f, delimiter=mapping.delimiter)
        missing = mapping.columns() - set(reader.fieldnames or ())
        if missing:
            raise ValidationError(
                f"{path.name} has no column(s) {', '.join(sorted(missing))} that the mapping uses; "
                f"its header is: {', '.join(reader.fieldnames or ()) or '(empty)'}"
            )
        for row in reader:
            if None in row:  # more cells than header names: the row is not what the mapping describes
                yield b"{not json: row with more cells than the header}"
                continue
            filled = _fill(mapping.template, {k: v or "" for k, v in row.items()})
            yield orjson.dumps(filled if filled is not _DROP else {"resourceType": mapping.resource_type})


def csv_to_ndjson(path: Path, mapping: CsvMapping, out: Path) -> int:
    """Write one NDJSON line per CSV row (line n of the NDJSON is data row n). Returns the row count."""
    n = 0
    with out.open("wb") as f:
        for line in _rows(path, mapping):
            f.write(line + b"\n")
            n += 1
    return n


def ingest_csv(
    store: ClinicalStore,
    files: Sequence[tuple[Path, CsvMapping]],
    standard: StandardProfile | None = None,
    *,
    progress: bool = False,
) -> IngestReport:
    """Convert each CSV with its mapping and ingest them all as one batch (as `ingest_ndjson` does).

    A row with more cells than the header is quarantined as malformed with its line number; every
    other row becomes a resource that the standard accepts or quarantines."""
    with tempfile.TemporaryDirectory(prefix="hs-csv-") as tmp:
        converted = []
        for path, mapping in files:
            out = Path(tmp) / f"{path.name}.ndjson"  # the batch names its sources after the CSV files
            csv_to_ndjson(path, mapping, out)
            converted.append(out)
        return ingest_ndjson(store, converted, standard, progress=progress)
