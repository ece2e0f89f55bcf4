"""Benchmark of the DSP wire layer: parse + schema-check + model a ContractRequestMessage, and emit it back.

Exposed as `run(quick) -> list[Figure]` for the bench suite registry. The baseline is the same schema
check done by `jsonschema` alone (the reference implementation; jsonschema-rs checks on the hot path).
"""

from __future__ import annotations

import orjson

from healthspace.bench.harness import Figure, rate
from healthspace.protocol.messages import ContractRequestMessage, Offer, Rule, parse_message, to_json
from healthspace.protocol.schemas import SchemaRegistry, default_registry

__all__ = ["run"]

# Proposed target for issue 3 (none was given): a connector handles ten thousand messages a second.
TARGET_MESSAGES_PER_SECOND = 10_000.0


def _sample() -> bytes:
    message = ContractRequestMessage(
        consumer_pid="urn:uuid:32541fe6-c580-409e-85a8-8a9a32fbe833",
        callback_address="https://consumer.example/dsp",
        offer=Offer(
            id="urn:uuid:d526561f-528e-4d5a-ae12-9a9dd9b7a815",
            target="urn:uuid:3dd1add8-4d2d-569e-d634-8394a8836a88",
            permission=[
                Rule(
                    action="use",
                    constraint=[{"leftOperand": "purpose", "operator": "eq", "rightOperand": "research"}],
                )
            ],
        ),
    )
    return orjson.dumps(message.model_dump(mode="json", exclude_none=True))


def run(quick: bool, registry: SchemaRegistry | None = None) -> list[Figure]:
    """Messages per second for parse (bytes -> checked model) and emit (model -> checked bytes)."""
    reg = registry or default_registry()
    raw = _sample()
    ops = 300 if quick else 5_000
    repeat = 3 if quick else 7

    def interpreted() -> None:
        for _ in range(ops):
            if not reg.reference_is_valid(orjson.loads(raw), "ContractRequestMessage"):
                raise RuntimeError("benchmark sample is invalid")

    def parse() -> None:
        for _ in range(ops):
            parse_message(raw, reg)

    model = parse_message(raw, reg)

    def emit() -> None:
        for _ in range(ops):
            to_json(model, reg)

    baseline = rate(interpreted, ops, repeat=repeat)
    return [
        Figure(
            name="dsp.parse.contract_request",
            unit="messages/s",
            samples=rate(parse, ops, repeat=repeat),
            baseline_name="jsonschema validation alone",
            baseline_samples=baseline,
            target=TARGET_MESSAGES_PER_SECOND,
            note="orjson + jsonschema-rs check + pydantic model",
        ),
        Figure(
            name="dsp.emit.contract_request",
            unit="messages/s",
            samples=rate(emit, ops, repeat=repeat),
            baseline_name="jsonschema validation alone",
            baseline_samples=baseline,
            target=TARGET_MESSAGES_PER_SECOND,
            note="model dump + jsonschema-rs check + orjson",
        ),
    ]
