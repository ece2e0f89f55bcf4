"""Parse the DSP TCK's mandatory scenarios (`dsp-tck-scenarios.md`) into data a test or a driver can use.

Each scenario is a heading `## <id>: <title>` followed by sequence-diagram lines: `A->>B: X` is a
message (or a signal to the connector under test), `A--->>B: X` the answer to the previous one. The
connector under test (CUT) is a consumer in the `CN_C`/`TP_C` groups and a provider elsewhere.

Names are normalised to DSP 2025-1 wire names through the explicit `ALIASES` table (the TCK's diagrams
use a few older names); anything not in it is kept as written, so an unknown name shows up in tests.
`ERRATA` lists the places where the transcribed diagram disagrees with the TCK's own test code; they
are corrected only when asked (`apply_errata=True`), so a test can show that each erratum is real.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["ALIASES", "ERRATA", "Scenario", "Step", "load_scenarios", "parse_scenarios"]

# TCK diagram name -> DSP 2025-1 wire name (or a marker for what is not a DSP message body).
ALIASES: dict[str, str] = {
    "CatalogDatasetMessage": "DatasetRequestMessage",
    "ContractVerificationMessage": "ContractAgreementVerificationMessage",
    "ContractNegotiationEventMessage:accepted": "ContractNegotiationEventMessage:ACCEPTED",
    "ContractNegotiationEventMessage:finalized": "ContractNegotiationEventMessage:FINALIZED",
    "MetadataResponse": "VersionResponse",
    # The TCK's consumer-side transfer diagrams name the provider's ACK after the request.
    "TransferRequest": "TransferProcess",
}

# Not DSP message bodies: a nudge to the CUT, an HTTP GET without body, HTTP status lines.
SIGNALS = frozenset({"Signal to start negotiation", "Signal to start transfer"})
BODILESS_REQUESTS = frozenset({"MetadataRequest"})
OK, ERROR = "200 OK", "4xx ERROR"

_HEADING = re.compile(r"^## (?P<id>[A-Z_]+:\d\d-\d\d): (?P<title>.+)$")
_LINE = re.compile(r"^(?P<src>TCK|CUT)(?P<arrow>-->>|->>)(?P<dst>TCK|CUT): (?P<name>.+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Step:
    sender: str  # "TCK" or "CUT"
    receiver: str
    name: str  # normalised
    is_response: bool

    @property
    def is_message(self) -> bool:
        return not self.is_response and self.name not in SIGNALS and self.name not in BODILESS_REQUESTS


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    cut_role: str  # "provider" or "consumer"
    protocol: str  # "catalog", "metadata", "negotiation" or "transfer"
    steps: tuple[Step, ...]
    errata: tuple[str, ...] = field(default=())

    @property
    def expects_rejection(self) -> bool:
        """The scenario ends with the CUT (or TCK) answering the last message with a 4xx error."""
        return bool(self.steps) and self.steps[-1].is_response and self.steps[-1].name == ERROR

    @property
    def names(self) -> set[str]:
        """Every DSP body named (messages and response bodies), signals and status lines excluded."""
        return {
            s.name
            for s in self.steps
            if s.name not in SIGNALS | BODILESS_REQUESTS and s.name not in (OK, ERROR)
        }


def _cut_role(scenario_id: str) -> str:
    return "consumer" if scenario_id.split(":")[0].endswith("_C") else "provider"


def _protocol(scenario_id: str) -> str:
    group = scenario_id.split(":")[0].removesuffix("_C")
    return {"CAT": "catalog", "MET": "metadata", "CN": "negotiation", "TP": "transfer"}[group]


def parse_scenarios(text: str) -> list[Scenario]:
    """Parse the whole document; raises ValueError on a line it does not understand."""
    scenarios: list[Scenario] = []
    current: dict[str, str] | None = None
    steps: list[Step] = []

    def flush() -> None:
        if current is not None:
            scenarios.append(
                Scenario(
                    id=current["id"],
                    title=current["title"],
                    cut_role=_cut_role(current["id"]),
                    protocol=_protocol(current["id"]),
                    steps=tuple(steps),
                )
            )

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        heading = _HEADING.match(line)
        if heading:
            flush()
            current, steps = heading.groupdict(), []
            continue
        step = _LINE.match(line)
        if step is None or current is None:
            raise ValueError(f"line {number}: cannot parse {line!r}")
        name = step["name"].strip()
        steps.append(
            Step(
                sender=step["src"].upper(),
                receiver=step["dst"].upper(),
                name=ALIASES.get(name, name),
                is_response=step["arrow"] == "-->>",
            )
        )
    flush()
    return scenarios


def _drop_stray_termination(s: Scenario) -> Scenario:
    # The TCK test (ContractNegotiationProvider01Test.cn_01_03) ends at FINALIZED; the diagram's extra
    # provider termination after FINALIZED is a copy slip (and the FINALIZED event lacks its 200 OK).
    steps = list(s.steps)
    i = next(k for k, st in enumerate(steps) if st.name == "ContractNegotiationTerminationMessage")
    return replace(s, steps=(*steps[:i], Step("TCK", "CUT", OK, True)), errata=(*s.errata, "CN:01-03"))


def _catalog_error(s: Scenario) -> Scenario:
    # The TCK test (Catalog01Test.cat_01_03) expects a CatalogError for an unknown dataset id.
    steps = (*s.steps[:-1], replace(s.steps[-1], name="CatalogError"))
    return replace(s, steps=steps, errata=(*s.errata, "CAT:01-03"))


ERRATA = {
    "CN:01-03": _drop_stray_termination,
    "CAT:01-03": _catalog_error,
}


def load_scenarios(path: Path, *, apply_errata: bool = True) -> list[Scenario]:
    scenarios = parse_scenarios(path.read_text(encoding="utf-8"))
    if apply_errata:
        scenarios = [ERRATA[s.id](s) if s.id in ERRATA else s for s in scenarios]
    return scenarios
