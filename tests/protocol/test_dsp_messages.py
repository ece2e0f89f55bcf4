"""DSP wire models read every official example and write it back unchanged; what we build validates."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from healthspace.core.errors import ValidationError
from healthspace.protocol import _bench
from healthspace.protocol.errors import DspValidationError
from healthspace.protocol.messages import (
    MESSAGE_MODELS,
    Agreement,
    Auth,
    CatalogError,
    CatalogRequestMessage,
    CatalogResponse,
    ContractAgreementMessage,
    ContractAgreementVerificationMessage,
    ContractNegotiation,
    ContractNegotiationError,
    ContractNegotiationEventMessage,
    ContractNegotiationTerminationMessage,
    ContractOfferMessage,
    ContractRequestMessage,
    DataAddress,
    DataService,
    Dataset,
    DatasetRequestMessage,
    DatasetResponse,
    Distribution,
    DspMessage,
    EndpointProperty,
    Offer,
    ProtocolVersion,
    Rule,
    TransferCompletionMessage,
    TransferError,
    TransferProcess,
    TransferRequestMessage,
    TransferStartMessage,
    TransferSuspensionMessage,
    TransferTerminationMessage,
    VersionResponse,
    agreement_timestamp,
    message_key,
    parse_as,
    parse_message,
    to_dict,
    to_json,
)
from healthspace.protocol.schemas import MESSAGE_SCHEMAS, SchemaRegistry
from healthspace.protocol.states import NegotiationState, TransferState

DSP = Path(__file__).resolve().parents[2].parent / "shared" / "conformance" / "dsp-2025-1"
TYPED_EXAMPLES = sorted(p for p in DSP.glob("*/example/*.json") if "@type" in orjson.loads(p.read_bytes()))


def _rel(path: Path) -> str:
    return path.relative_to(DSP).as_posix()


def test_there_is_a_model_for_every_message_schema() -> None:
    assert set(MESSAGE_MODELS) == set(MESSAGE_SCHEMAS)


def test_all_24_typed_examples_are_collected() -> None:
    assert len(TYPED_EXAMPLES) == 24


@pytest.mark.parametrize("path", TYPED_EXAMPLES, ids=_rel)
def test_official_example_round_trips_unchanged(registry: SchemaRegistry, path: Path) -> None:
    raw = path.read_bytes()
    message = parse_message(raw, registry)
    assert message.model_dump(by_alias=True)["@type"] == orjson.loads(raw)["@type"]
    emitted = to_json(message, registry)  # validates the output again
    assert orjson.loads(emitted) == orjson.loads(raw)


def test_version_response_round_trips(registry: SchemaRegistry) -> None:
    raw = (DSP / "common/example/protocol-version.json").read_bytes()
    message = parse_as(raw, VersionResponse, registry)
    assert [v.version for v in message.protocol_versions] == ["2025-1", "2024-1", "2025-1"]
    assert orjson.loads(to_json(message, registry)) == orjson.loads(raw)


def test_parsed_members_are_typed(registry: SchemaRegistry) -> None:
    raw = (DSP / "negotiation/example/contract-negotiation.json").read_bytes()
    message = parse_as(raw, ContractNegotiation, registry)
    assert message.state is NegotiationState.REQUESTED
    assert message.provider_pid == "urn:uuid:a343fcbf-99fc-4ce8-8e9b-148c97605aab"


def test_parse_as_refuses_a_message_of_another_type(registry: SchemaRegistry) -> None:
    raw = (DSP / "transfer/example/transfer-completion-message.json").read_bytes()
    with pytest.raises(DspValidationError) as caught:
        parse_as(raw, TransferSuspensionMessage, registry)
    assert "/@type" in [p.pointer for p in caught.value.problems]


def test_a_body_that_is_not_json_is_a_400(registry: SchemaRegistry) -> None:
    with pytest.raises(DspValidationError, match="not JSON") as caught:
        parse_message(b"{not json", registry)
    assert caught.value.status == 400


def test_an_invalid_message_never_reaches_a_model(registry: SchemaRegistry) -> None:
    raw = (
        DSP / "invalid/negotiation/contract-request-message-schema/INVALID_REQUEST_NO_OFFER.json"
    ).read_bytes()
    with pytest.raises(DspValidationError, match="/offer"):
        parse_message(raw, registry)


# --- what we build ------------------------------------------------------------------------------------------

CPID, PPID = "urn:uuid:consumer-1", "urn:uuid:provider-1"
OFFER = Offer(id="urn:uuid:offer-1", target="urn:uuid:dataset-1", permission=[Rule(action="use")])
AGREEMENT = Agreement(
    id="urn:uuid:agreement-1",
    target="urn:uuid:dataset-1",
    assigner="did:web:hospital",
    assignee="did:web:university",
    timestamp=agreement_timestamp(datetime(2025, 3, 1, 9, 30, tzinfo=UTC)),
    permission=[
        Rule(
            action="use",
            constraint=[{"leftOperand": "purpose", "operator": "eq", "rightOperand": "research"}],
        )
    ],
)
ADDRESS = DataAddress(
    endpoint_type="https://w3id.org/idsa/v4.1/HTTP",
    endpoint="https://hospital.example/data",
    endpoint_properties=[EndpointProperty(name="authorization", value="secret-token-123")],
)
CATALOG_OFFER = Offer(id="urn:uuid:offer-1", permission=[Rule(action="use")])
DATASET = Dataset(
    id="urn:uuid:dataset-1",
    has_policy=[CATALOG_OFFER],
    distribution=[Distribution(format="HttpData-PULL", access_service="urn:uuid:service-1")],
)

BUILT: dict[str, Callable[[], Any]] = {
    "CatalogRequestMessage": lambda: CatalogRequestMessage(filter=[]),
    "DatasetRequestMessage": lambda: DatasetRequestMessage(dataset="urn:uuid:dataset-1"),
    "Catalog": lambda: CatalogResponse(
        id="urn:uuid:catalog-1",
        participant_id="did:web:hospital",
        dataset=[DATASET],
        service=[DataService(id="urn:uuid:service-1", endpoint_url="https://hospital.example/dsp")],
    ),
    "Dataset": lambda: DatasetResponse(
        id="urn:uuid:dataset-1", has_policy=[CATALOG_OFFER], distribution=DATASET.distribution
    ),
    "CatalogError": lambda: CatalogError(code="not-found", reason=["no such dataset"]),
    "ContractRequestMessage": lambda: ContractRequestMessage(
        consumer_pid=CPID, offer=OFFER, callback_address="https://university.example/dsp"
    ),
    "ContractOfferMessage": lambda: ContractOfferMessage(provider_pid=PPID, consumer_pid=CPID, offer=OFFER),
    "ContractAgreementMessage": lambda: ContractAgreementMessage(
        provider_pid=PPID, consumer_pid=CPID, agreement=AGREEMENT
    ),
    "ContractAgreementVerificationMessage": lambda: ContractAgreementVerificationMessage(
        provider_pid=PPID, consumer_pid=CPID
    ),
    "ContractNegotiationEventMessage": lambda: ContractNegotiationEventMessage(
        provider_pid=PPID, consumer_pid=CPID, event_type="FINALIZED"
    ),
    "ContractNegotiationTerminationMessage": lambda: ContractNegotiationTerminationMessage(
        provider_pid=PPID, consumer_pid=CPID, code="consent-withdrawn", reason=["consent withdrawn"]
    ),
    "ContractNegotiation": lambda: ContractNegotiation(
        provider_pid=PPID, consumer_pid=CPID, state=NegotiationState.AGREED
    ),
    "ContractNegotiationError": lambda: ContractNegotiationError(
        provider_pid=PPID, consumer_pid=CPID, code="400", reason=["not allowed in state FINALIZED"]
    ),
    "TransferRequestMessage": lambda: TransferRequestMessage(
        consumer_pid=CPID,
        agreement_id="urn:uuid:agreement-1",
        format="compute-to-data",
        callback_address="https://university.example/dsp",
    ),
    "TransferStartMessage": lambda: TransferStartMessage(
        provider_pid=PPID, consumer_pid=CPID, data_address=ADDRESS
    ),
    "TransferSuspensionMessage": lambda: TransferSuspensionMessage(provider_pid=PPID, consumer_pid=CPID),
    "TransferCompletionMessage": lambda: TransferCompletionMessage(provider_pid=PPID, consumer_pid=CPID),
    "TransferTerminationMessage": lambda: TransferTerminationMessage(
        provider_pid=PPID, consumer_pid=CPID, reason=["agreement retired"]
    ),
    "TransferProcess": lambda: TransferProcess(
        provider_pid=PPID, consumer_pid=CPID, state=TransferState.STARTED
    ),
    "TransferError": lambda: TransferError(provider_pid=PPID, consumer_pid=CPID, code="500"),
}


def test_a_builder_exists_for_every_message_type() -> None:
    assert set(BUILT) == set(MESSAGE_SCHEMAS)


@pytest.mark.parametrize("type_name", sorted(BUILT))
def test_built_message_validates_against_its_schema(registry: SchemaRegistry, type_name: str) -> None:
    message = BUILT[type_name]()
    document = to_dict(message)
    assert document["@context"] == ["https://w3id.org/dspace/2025/1/context.jsonld"]
    assert registry.validate_message(document) == type_name


@pytest.mark.parametrize("type_name", sorted(BUILT))
def test_built_message_parses_back_to_an_equal_model(registry: SchemaRegistry, type_name: str) -> None:
    message = BUILT[type_name]()
    assert parse_message(to_json(message, registry), registry) == message


def test_built_version_response_validates(registry: SchemaRegistry) -> None:
    message = VersionResponse(
        protocol_versions=[
            ProtocolVersion(
                version="2025-1", path="/dsp", auth=Auth(protocol="healthspace-token", version="1")
            )
        ]
    )
    registry.validate_as(to_dict(message), "VersionResponse")


def test_emitting_a_message_the_schema_rejects_is_refused(registry: SchemaRegistry) -> None:
    # A counter-request carries providerPid; adding a callbackAddress breaks the schema's "exactly one".
    message = ContractRequestMessage(
        consumer_pid=CPID, provider_pid=PPID, offer=OFFER, callback_address="https://university.example/dsp"
    )
    with pytest.raises(DspValidationError):
        to_json(message, registry)


def test_unknown_members_survive_a_round_trip(registry: SchemaRegistry) -> None:
    document = to_dict(BUILT["TransferCompletionMessage"]())
    document["healthspace:note"] = {"why": "kept"}
    message = parse_message(orjson.dumps(document), registry)
    assert to_dict(message) == document


def test_endpoint_tokens_stay_out_of_reprs() -> None:
    assert "secret-token-123" not in repr(ADDRESS)
    assert to_dict(ADDRESS)["endpointProperties"][0]["value"] == "secret-token-123"


def test_agreement_timestamp_is_utc_with_z() -> None:
    moment = datetime(2025, 3, 1, 17, 30, tzinfo=timezone(timedelta(hours=8)))
    assert agreement_timestamp(moment) == "2025-03-01T09:30:00.000Z"


def test_agreement_timestamp_refuses_naive_datetimes() -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        agreement_timestamp(datetime(2025, 3, 1, 9, 30))


def test_message_key_splits_negotiation_events() -> None:
    event = ContractNegotiationEventMessage(provider_pid=PPID, consumer_pid=CPID, event_type="ACCEPTED")
    assert message_key(event) == "ContractNegotiationEventMessage:ACCEPTED"
    assert message_key(BUILT["TransferCompletionMessage"]()) == "TransferCompletionMessage"


def test_every_model_is_a_dsp_message() -> None:
    assert all(issubclass(model, DspMessage) for model in MESSAGE_MODELS.values())


def test_benchmark_suite_runs_quickly_and_reports_against_its_baseline(registry: SchemaRegistry) -> None:
    figures = _bench.run(quick=True, registry=registry)
    assert [f.name for f in figures] == ["dsp.parse.contract_request", "dsp.emit.contract_request"]
    assert all(f.median > 0 and f.ratio is not None for f in figures)
