"""Typed DSP 2025-1 wire messages (catalog, negotiation, transfer, version) as compact JSON.

No JSON-LD processing: a message is plain JSON that validates against its official schema. Incoming
bytes go orjson -> schema check (`SchemaRegistry`) -> model; outgoing models go model -> dict ->
schema check -> orjson, so a connector never emits a message its peers' schemas reject.

Models keep members they do not declare (`extra="allow"`), so a message read and written back is the
same JSON. ODRL rule bodies (`permission`, `prohibition`, `obligation` constraints) are kept as plain
JSON here; the policy package interprets them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError
from pydantic.alias_generators import to_camel

from healthspace.core.errors import ValidationError
from healthspace.protocol.errors import DspValidationError, Problem
from healthspace.protocol.schemas import DSP_CONTEXT, SchemaRegistry, default_registry
from healthspace.protocol.states import NegotiationState, TransferState

__all__ = [
    "MESSAGE_MODELS",
    "Agreement",
    "Auth",
    "Catalog",
    "CatalogError",
    "CatalogRequestMessage",
    "ContractAgreementMessage",
    "ContractAgreementVerificationMessage",
    "ContractNegotiation",
    "ContractNegotiationError",
    "ContractNegotiationEventMessage",
    "ContractNegotiationTerminationMessage",
    "ContractOfferMessage",
    "ContractRequestMessage",
    "DataAddress",
    "DataService",
    "Dataset",
    "DatasetRequestMessage",
    "Distribution",
    "DspMessage",
    "EndpointProperty",
    "Offer",
    "ProtocolVersion",
    "Rule",
    "TransferCompletionMessage",
    "TransferError",
    "TransferProcess",
    "TransferRequestMessage",
    "TransferStartMessage",
    "TransferSuspensionMessage",
    "TransferTerminationMessage",
    "VersionResponse",
    "agreement_timestamp",
    "message_key",
    "parse_as",
    "parse_message",
    "to_dict",
    "to_json",
]


def _context() -> list[str]:
    return [DSP_CONTEXT]


class _Wire(BaseModel):
    """Shared wire settings: camelCase members, `@`-members by alias, unknown members kept."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        extra="allow",
        frozen=True,
    )


# --- ODRL policies as DSP 2025-1 carries them -----------------------------------------------------------


class Rule(_Wire):
    """An ODRL permission, prohibition or duty. Constraints stay JSON (atomic or logical, nested)."""

    action: str
    constraint: list[dict[str, Any]] | None = None


class Offer(_Wire):
    """An ODRL offer. In a message it names its `target`; in a catalog the dataset is the target."""

    id: str = Field(alias="@id")
    dsp_type: Literal["Offer"] | None = Field("Offer", alias="@type")
    target: str | None = None
    profile: str | list[str] | None = None
    assigner: str | None = None
    assignee: str | None = None
    permission: list[Rule] | None = None
    prohibition: list[Rule] | None = None
    obligation: list[Rule] | None = None


class Agreement(_Wire):
    """An ODRL agreement: target, assigner and assignee are required; `timestamp` is an XSD dateTime."""

    id: str = Field(alias="@id")
    dsp_type: Literal["Agreement"] = Field("Agreement", alias="@type")
    target: str
    assigner: str
    assignee: str
    timestamp: str | None = None
    profile: str | list[str] | None = None
    permission: list[Rule] | None = None
    prohibition: list[Rule] | None = None
    obligation: list[Rule] | None = None


def agreement_timestamp(moment: datetime) -> str:
    """An aware datetime as the XSD dateTime an `Agreement.timestamp` carries (UTC, `Z`)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValidationError("agreement timestamps must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- catalog (DCAT as DSP 2025-1 carries it) ---------------------------------------------------------------


class DataService(_Wire):
    id: str = Field(alias="@id")
    dsp_type: Literal["DataService"] = Field("DataService", alias="@type")
    endpoint_url: str = Field(alias="endpointURL")
    serves_dataset: list[Dataset] | None = None


class Distribution(_Wire):
    dsp_type: Literal["Distribution"] | None = Field("Distribution", alias="@type")
    format: str
    access_service: str | DataService
    has_policy: list[Offer] | None = None


class Dataset(_Wire):
    """A dataset; `context` is set only when it is the root of a response (GET /catalog/datasets/{id})."""

    context: list[str] | None = Field(None, alias="@context")
    id: str = Field(alias="@id")
    dsp_type: Literal["Dataset"] | None = Field("Dataset", alias="@type")
    has_policy: list[Offer]
    distribution: list[Distribution]


class Catalog(_Wire):
    """A catalog; the root one carries `context` and `participant_id`, nested ones need not."""

    context: list[str] | None = Field(None, alias="@context")
    id: str = Field(alias="@id")
    dsp_type: Literal["Catalog"] = Field("Catalog", alias="@type")
    participant_id: str | None = None
    dataset: list[Dataset] | None = None
    catalog: list[Catalog] | None = None
    service: list[DataService] | None = None
    distribution: list[Distribution] | None = None


# --- messages --------------------------------------------------------------------------------------------


class DspMessage(_Wire):
    """Base of every top-level DSP message; `@context` defaults to the DSP 2025-1 context."""

    context: list[str] = Field(default_factory=_context, alias="@context")


class CatalogRequestMessage(DspMessage):
    dsp_type: Literal["CatalogRequestMessage"] = Field("CatalogRequestMessage", alias="@type")
    filter: list[Any] | None = None


class DatasetRequestMessage(DspMessage):
    dsp_type: Literal["DatasetRequestMessage"] = Field("DatasetRequestMessage", alias="@type")
    dataset: str


class CatalogResponse(DspMessage):
    """The root `Catalog` answering a CatalogRequestMessage."""

    id: str = Field(alias="@id")
    dsp_type: Literal["Catalog"] = Field("Catalog", alias="@type")
    participant_id: str
    dataset: list[Dataset] | None = None
    catalog: list[Catalog] | None = None
    service: list[DataService] | None = None
    distribution: list[Distribution] | None = None


class DatasetResponse(DspMessage):
    """The root `Dataset` answering GET /catalog/datasets/{id}."""

    id: str = Field(alias="@id")
    dsp_type: Literal["Dataset"] = Field("Dataset", alias="@type")
    has_policy: list[Offer]
    distribution: list[Distribution]


class CatalogError(DspMessage):
    dsp_type: Literal["CatalogError"] = Field("CatalogError", alias="@type")
    code: str | None = None
    reason: list[Any] | None = None


class _Pids(DspMessage):
    provider_pid: str
    consumer_pid: str


class ContractRequestMessage(DspMessage):
    """Initial request (`callback_address`, no `provider_pid`) or counter-offer (`provider_pid`, no callback).

    The schema requires exactly one of the two.
    """

    dsp_type: Literal["ContractRequestMessage"] = Field("ContractRequestMessage", alias="@type")
    consumer_pid: str
    provider_pid: str | None = None
    offer: Offer
    callback_address: str | None = None


class ContractOfferMessage(DspMessage):
    """Initial offer (`callback_address`, no `consumer_pid`) or answer to a request (`consumer_pid`).

    The schema requires exactly one of the two.
    """

    dsp_type: Literal["ContractOfferMessage"] = Field("ContractOfferMessage", alias="@type")
    provider_pid: str
    consumer_pid: str | None = None
    offer: Offer
    callback_address: str | None = None


class ContractAgreementMessage(_Pids):
    dsp_type: Literal["ContractAgreementMessage"] = Field("ContractAgreementMessage", alias="@type")
    agreement: Agreement


class ContractAgreementVerificationMessage(_Pids):
    dsp_type: Literal["ContractAgreementVerificationMessage"] = Field(
        "ContractAgreementVerificationMessage", alias="@type"
    )


class ContractNegotiationEventMessage(_Pids):
    dsp_type: Literal["ContractNegotiationEventMessage"] = Field(
        "ContractNegotiationEventMessage", alias="@type"
    )
    event_type: Literal["ACCEPTED", "FINALIZED"]


class ContractNegotiationTerminationMessage(_Pids):
    dsp_type: Literal["ContractNegotiationTerminationMessage"] = Field(
        "ContractNegotiationTerminationMessage", alias="@type"
    )
    code: str | None = None
    reason: list[Any] | None = None


class ContractNegotiation(_Pids):
    """The ACK of the negotiation protocol: the process as one side sees it."""

    dsp_type: Literal["ContractNegotiation"] = Field("ContractNegotiation", alias="@type")
    state: NegotiationState


class ContractNegotiationError(_Pids):
    dsp_type: Literal["ContractNegotiationError"] = Field("ContractNegotiationError", alias="@type")
    code: str | None = None
    reason: list[Any] | None = None


class EndpointProperty(_Wire):
    dsp_type: Literal["EndpointProperty"] = Field("EndpointProperty", alias="@type")
    name: str
    # Often a bearer token: kept out of reprs and therefore out of logs.
    value: str = Field(repr=False)


class DataAddress(_Wire):
    dsp_type: Literal["DataAddress"] = Field("DataAddress", alias="@type")
    endpoint_type: str
    endpoint: str | None = None
    endpoint_properties: list[EndpointProperty] | None = None


class TransferRequestMessage(DspMessage):
    dsp_type: Literal["TransferRequestMessage"] = Field("TransferRequestMessage", alias="@type")
    consumer_pid: str
    agreement_id: str
    format: str
    callback_address: str
    data_address: DataAddress | None = None


class TransferStartMessage(_Pids):
    dsp_type: Literal["TransferStartMessage"] = Field("TransferStartMessage", alias="@type")
    data_address: DataAddress | None = None


class TransferSuspensionMessage(_Pids):
    dsp_type: Literal["TransferSuspensionMessage"] = Field("TransferSuspensionMessage", alias="@type")
    code: str | None = None
    reason: list[Any] | None = None


class TransferCompletionMessage(_Pids):
    dsp_type: Literal["TransferCompletionMessage"] = Field("TransferCompletionMessage", alias="@type")


class TransferTerminationMessage(_Pids):
    dsp_type: Literal["TransferTerminationMessage"] = Field("TransferTerminationMessage", alias="@type")
    code: str | None = None
    reason: list[Any] | None = None


class TransferProcess(_Pids):
    """The ACK of the transfer protocol: the process as one side sees it."""

    dsp_type: Literal["TransferProcess"] = Field("TransferProcess", alias="@type")
    state: TransferState


class TransferError(_Pids):
    dsp_type: Literal["TransferError"] = Field("TransferError", alias="@type")
    code: str | None = None
    reason: list[Any] | None = None


# --- version metadata (GET /.well-known/dspace-version): no @context, no @type --------------------------


class Auth(_Wire):
    protocol: str
    version: str
    profile: list[str] | None = None


class ProtocolVersion(_Wire):
    version: str
    path: str
    binding: Literal["HTTPS"] = "HTTPS"
    identifier_type: str | None = None
    service_id: str | None = None
    auth: Auth | None = None


class VersionResponse(_Wire):
    protocol_versions: list[ProtocolVersion]


DataService.model_rebuild()
Catalog.model_rebuild()

# Wire `@type` -> model. `Catalog` and `Dataset` map to their root (response) forms.
MESSAGE_MODELS: Mapping[str, type[DspMessage]] = {
    "CatalogRequestMessage": CatalogRequestMessage,
    "DatasetRequestMessage": DatasetRequestMessage,
    "Catalog": CatalogResponse,
    "Dataset": DatasetResponse,
    "CatalogError": CatalogError,
    "ContractRequestMessage": ContractRequestMessage,
    "ContractOfferMessage": ContractOfferMessage,
    "ContractAgreementMessage": ContractAgreementMessage,
    "ContractAgreementVerificationMessage": ContractAgreementVerificationMessage,
    "ContractNegotiationEventMessage": ContractNegotiationEventMessage,
    "ContractNegotiationTerminationMessage": ContractNegotiationTerminationMessage,
    "ContractNegotiation": ContractNegotiation,
    "ContractNegotiationError": ContractNegotiationError,
    "TransferRequestMessage": TransferRequestMessage,
    "TransferStartMessage": TransferStartMessage,
    "TransferSuspensionMessage": TransferSuspensionMessage,
    "TransferCompletionMessage": TransferCompletionMessage,
    "TransferTerminationMessage": TransferTerminationMessage,
    "TransferProcess": TransferProcess,
    "TransferError": TransferError,
}

_TYPE_OF: dict[type[_Wire], str] = {model: name for name, model in MESSAGE_MODELS.items()}
_TYPE_OF[VersionResponse] = "VersionResponse"

M = TypeVar("M", bound=_Wire)


def _load(data: bytes | str | Mapping[str, Any]) -> Any:
    if isinstance(data, bytes | str):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DspValidationError("the body is not JSON", [Problem("", f"not JSON: {exc}")]) from exc
    return dict(data)


def _build(model: type[M], document: Any) -> M:
    try:
        return model.model_validate(document)
    except PydanticValidationError as exc:
        # The schema passed, so this is a gap between schema and model; still the peer's input: 400.
        problems = [
            Problem("".join(f"/{p}" for p in err["loc"]), err["msg"]) for err in exc.errors(include_url=False)
        ]
        raise DspValidationError(f"not a valid {model.__name__}", problems) from exc


def parse_message(
    data: bytes | str | Mapping[str, Any], registry: SchemaRegistry | None = None
) -> DspMessage:
    """Parse any DSP message, choosing schema and model from its `@type`. Raises `DspValidationError`."""
    document = _load(data)
    type_name = (registry or default_registry()).validate_message(document)
    return _build(MESSAGE_MODELS[type_name], document)


def parse_as(
    data: bytes | str | Mapping[str, Any], model: type[M], registry: SchemaRegistry | None = None
) -> M:
    """Parse a message that must be of `model`'s type (an endpoint knows what it expects).

    A message of another `@type` fails the schema's `@type` constant, so it is refused with 400.
    """
    type_name = _TYPE_OF.get(model)
    if type_name is None:
        raise ValidationError(f"{model.__name__} is not a top-level DSP message")
    document = _load(data)
    (registry or default_registry()).validate_as(document, type_name)
    return _build(model, document)


def to_dict(message: _Wire) -> dict[str, Any]:
    """The message as compact DSP JSON (aliases, absent members omitted)."""
    return message.model_dump(mode="json", exclude_none=True)


def to_json(message: _Wire, registry: SchemaRegistry | None = None, *, check: bool = True) -> bytes:
    """Serialise for the wire. With `check` (the default) the output is validated first, so a message the
    peers' schemas reject is never sent (raises `DspValidationError`, a bug on our side)."""
    document = to_dict(message)
    type_name = _TYPE_OF.get(type(message))
    if check and type_name is not None:
        (registry or default_registry()).validate_as(document, type_name)
    return orjson.dumps(document)


def message_key(message: DspMessage) -> str:
    """The key `states` tables use: the `@type`, with the event type for negotiation events."""
    if isinstance(message, ContractNegotiationEventMessage):
        return f"ContractNegotiationEventMessage:{message.event_type}"
    return _TYPE_OF[type(message)]
