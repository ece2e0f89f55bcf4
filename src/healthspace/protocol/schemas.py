"""The official DSP 2025-1 JSON Schemas, loaded from local files, compiled once, used to check messages.

Where the schemas live is decided at run time (they are data, not code):

1. an explicit directory passed to `load_registry(path)`;
2. otherwise `find_schema_dir()`: the directory named by `HEALTHSPACE_DSP_SCHEMA_DIR`, else
   `../shared/conformance/dsp-2025-1` relative to the working directory.

The directory holds `catalog/`, `common/`, `negotiation/` and `transfer/` with the `*-schema.json` files
of the DSP artifacts. Every `$ref` is resolved from those files (their `$id`s under
`https://w3id.org/dspace/2025/1/` are mapped to the local copies); nothing is ever fetched, and a
reference that does not resolve locally is a configuration error at load time, not a failure mid-request.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
from jsonschema import Draft201909Validator
from jsonschema.exceptions import ValidationError as SchemaError
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT201909

from healthspace.core.errors import ConfigurationError
from healthspace.protocol.errors import DspValidationError, Problem

__all__ = [
    "DSP_CONTEXT",
    "MESSAGE_SCHEMAS",
    "SCHEMA_BASE",
    "SCHEMA_DIR_ENV",
    "UNTYPED_SCHEMAS",
    "SchemaRegistry",
    "default_registry",
    "find_schema_dir",
    "load_registry",
    "validate_as",
    "validate_message",
]

SCHEMA_BASE = "https://w3id.org/dspace/2025/1/"
DSP_CONTEXT = "https://w3id.org/dspace/2025/1/context.jsonld"
SCHEMA_DIR_ENV = "HEALTHSPACE_DSP_SCHEMA_DIR"
_DEFAULT_RELATIVE = Path("..") / "shared" / "conformance" / "dsp-2025-1"
_FOLDERS = ("catalog", "common", "negotiation", "transfer")

# Wire `@type` -> schema file (relative to the schema directory). Names as in the 2025-1 schemas.
MESSAGE_SCHEMAS: Mapping[str, str] = {
    "CatalogRequestMessage": "catalog/catalog-request-message-schema.json",
    "DatasetRequestMessage": "catalog/dataset-request-message-schema.json",
    "Catalog": "catalog/catalog-schema.json",
    "Dataset": "catalog/dataset-schema.json",
    "CatalogError": "catalog/catalog-error-schema.json",
    "ContractRequestMessage": "negotiation/contract-request-message-schema.json",
    "ContractOfferMessage": "negotiation/contract-offer-message-schema.json",
    "ContractAgreementMessage": "negotiation/contract-agreement-message-schema.json",
    "ContractAgreementVerificationMessage": "negotiation/contract-agreement-verification-message-schema.json",
    "ContractNegotiationEventMessage": "negotiation/contract-negotiation-event-message-schema.json",
    "ContractNegotiationTerminationMessage": (
        "negotiation/contract-negotiation-termination-message-schema.json"
    ),
    "ContractNegotiation": "negotiation/contract-negotiation-schema.json",
    "ContractNegotiationError": "negotiation/contract-negotiation-error-schema.json",
    "TransferRequestMessage": "transfer/transfer-request-message-schema.json",
    "TransferStartMessage": "transfer/transfer-start-message-schema.json",
    "TransferSuspensionMessage": "transfer/transfer-suspension-message-schema.json",
    "TransferCompletionMessage": "transfer/transfer-completion-message-schema.json",
    "TransferTerminationMessage": "transfer/transfer-termination-message-schema.json",
    "TransferProcess": "transfer/transfer-process-schema.json",
    "TransferError": "transfer/transfer-error-schema.json",
}

# Documents DSP defines without an `@type` on the wire: only `validate_as` can pick their schema.
UNTYPED_SCHEMAS: Mapping[str, str] = {
    "VersionResponse": "common/protocol-version-schema.json",
    "DidService": "common/did-service-schema.json",
}

# Longest quoted value kept in an error message; the rest of a peer's input is not echoed back.
_MAX_VALUE_CHARS = 60


def find_schema_dir(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """Locate the DSP 2025-1 schema directory: `$HEALTHSPACE_DSP_SCHEMA_DIR`, else `../shared/...` from cwd.

    Raises `ConfigurationError` naming every place tried when none holds the schemas (fail closed: a
    connector never runs without schema checks).
    """
    env = os.environ if environ is None else environ
    base = Path.cwd() if cwd is None else cwd
    tried: list[Path] = []
    configured = env.get(SCHEMA_DIR_ENV)
    if configured:
        candidate = Path(configured)
        if _looks_like_schema_dir(candidate):
            return candidate
        # An explicit setting that is wrong must not silently fall back to another copy.
        raise ConfigurationError(
            f"{SCHEMA_DIR_ENV}={configured} does not hold the DSP 2025-1 schemas"
            f" (expected {', '.join(_FOLDERS)})"
        )
    candidate = base / _DEFAULT_RELATIVE
    tried.append(candidate)
    if _looks_like_schema_dir(candidate):
        return candidate
    raise ConfigurationError(
        f"DSP 2025-1 schemas not found; set {SCHEMA_DIR_ENV} (tried: {', '.join(str(p) for p in tried)})"
    )


def _looks_like_schema_dir(path: Path) -> bool:
    return all((path / folder).is_dir() for folder in _FOLDERS)


def _patch_refs(node: Any, fixes: list[str], where: str) -> Any:
    """Rewrite `...#definitions/X` to `...#/definitions/X` everywhere in a schema document.

    Three 2025-1 transfer schemas carry the fragment without its leading slash, which is not a JSON
    pointer; the protocol's own tests patch it the same way.
    """
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and "#definitions/" in value:
                fixed = value.replace("#definitions/", "#/definitions/", 1)
                fixes.append(f"{where}: {value} -> {fixed}")
                out[key] = fixed
            else:
                out[key] = _patch_refs(value, fixes, where)
        return out
    if isinstance(node, list):
        return [_patch_refs(item, fixes, where) for item in node]
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _refuse_retrieval(uri: str) -> Resource[Any]:
    # Schemas are never fetched over the network: everything must come from the local directory.
    raise NoSuchResource(uri)


def _refuse_rs_retrieval(uri: str) -> Any:
    raise ConfigurationError(f"DSP schema reference {uri} is not a local schema")  # never fetched


def _pointer(path: Iterable[str | int]) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _explain(error: SchemaError) -> list[Problem]:
    """Turn one jsonschema error into problems that name the offending member by JSON pointer."""
    where = _pointer(error.absolute_path)
    keyword = error.validator
    value = error.validator_value
    instance = error.instance
    if keyword == "required" and isinstance(instance, dict):
        return [
            Problem(f"{where}/{_pointer([name])[1:]}", "required property is missing")
            for name in value
            if name not in instance
        ]
    if keyword in ("oneOf", "anyOf") and error.context:
        return _explain_alternatives(where, error.context)
    if keyword == "oneOf":
        return [Problem(where, "matches more than one of the alternatives the schema allows (exactly one)")]
    if keyword == "type":
        return [Problem(where, f"must be of type {value}")]
    if keyword == "const":
        return [Problem(where, f"must be {_short(value)}")]
    if keyword == "enum":
        return [Problem(where, f"must be one of {', '.join(_short(v) for v in value)}")]
    if keyword == "minItems":
        return [Problem(where, f"must have at least {value} item(s)")]
    if keyword == "contains":
        return [Problem(where, f"must contain an item matching {_short(value)}")]
    if keyword == "pattern":
        return [Problem(where, "does not match the required pattern")]
    if keyword == "not" and isinstance(value, dict) and set(value) == {"required"}:
        names = ", ".join(repr(n) for n in value["required"])
        return [Problem(where, f"must not contain {names}")]
    return [Problem(where, f"fails '{keyword}': {_short(error.message)}")]


def _explain_alternatives(where: str, context: list[SchemaError]) -> list[Problem]:
    """Explain a failed oneOf/anyOf by its nearest alternatives (fewest problems), not all of them."""
    branches: dict[Any, list[Problem]] = {}
    for sub in context:
        branches.setdefault(sub.relative_schema_path[0], []).extend(_explain(sub))
    fewest = min(len(problems) for problems in branches.values())
    nearest = [_dedupe(p) for p in branches.values() if len(p) == fewest]
    if len(nearest) == 1:
        return nearest[0]
    options = " or ".join("(" + "; ".join(str(p) for p in problems) + ")" for problems in nearest)
    return [Problem(where, f"satisfies none of the alternatives; nearest fixes: {options}")]


def _dedupe(problems: Iterable[Problem]) -> list[Problem]:
    seen: dict[Problem, None] = {}
    for problem in problems:
        seen.setdefault(problem, None)
    return list(seen)


class SchemaRegistry:
    """Compiled validators for every DSP 2025-1 schema found in one directory. Immutable once built.

    Look-ups by wire type name (`MESSAGE_SCHEMAS`, `UNTYPED_SCHEMAS`) or by schema file stem
    (`"contract-schema"`, `"data-address-schema"`, ...) for fragments that are not messages.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        fixes: list[str] = []
        documents: dict[str, dict[str, Any]] = {}
        stems: dict[str, str] = {}
        for folder in _FOLDERS:
            for path in sorted((directory / folder).glob("*-schema.json")):
                rel = f"{folder}/{path.name}"
                try:
                    raw = orjson.loads(path.read_bytes())
                except (OSError, orjson.JSONDecodeError) as exc:
                    raise ConfigurationError(f"cannot read DSP schema {rel}: {exc}") from exc
                if not isinstance(raw, dict) or raw.get("$id") != SCHEMA_BASE + rel:
                    # The $id is what other schemas reference; a mismatch would resolve to the wrong file.
                    raise ConfigurationError(f"DSP schema {rel} does not declare $id {SCHEMA_BASE + rel}")
                documents[rel] = _patch_refs(raw, fixes, rel)
                stems[path.name.removesuffix(".json")] = rel
        missing = sorted((set(MESSAGE_SCHEMAS.values()) | set(UNTYPED_SCHEMAS.values())) - set(documents))
        if missing:
            raise ConfigurationError(f"DSP schema directory {directory} lacks {', '.join(missing)}")
        registry: Registry[Any] = Registry(retrieve=_refuse_retrieval).with_resources(  # type: ignore[call-arg]
            (doc["$id"], Resource.from_contents(doc, default_specification=DRAFT201909))
            for doc in documents.values()
        )
        registry = registry.crawl()
        for rel, doc in documents.items():
            resolver = registry.resolver(base_uri=doc["$id"])
            for ref in _refs(doc):
                try:
                    resolver.lookup(ref)
                except Unresolvable as exc:
                    raise ConfigurationError(
                        f"DSP schema {rel}: $ref {ref} does not resolve locally"
                    ) from exc
        self.patches: tuple[str, ...] = tuple(fixes)
        self._by_file = {rel: Draft201909Validator(doc, registry=registry) for rel, doc in documents.items()}
        # The yes/no check on the hot path: jsonschema-rs (Rust), 20-40 times faster than a Python
        # check here (docs/protocol.md). `jsonschema` above stays the reference: it explains every
        # invalid message, and the two must agree (a tie is refused, see `_problems`).
        rs_registry = jsonschema_rs.Registry(
            [(doc["$id"], doc) for doc in documents.values()], retriever=_refuse_rs_retrieval
        )
        self._fast: dict[str, Callable[[Any], bool]] = {
            rel: jsonschema_rs.Draft201909Validator(
                doc, registry=rs_registry, validate_formats=False
            ).is_valid
            for rel, doc in documents.items()
        }
        self._stems = stems

    @property
    def type_names(self) -> frozenset[str]:
        """Every name `validate_as` accepts as a type: wire `@type`s plus the untyped documents."""
        return frozenset(MESSAGE_SCHEMAS) | frozenset(UNTYPED_SCHEMAS)

    @property
    def schema_names(self) -> frozenset[str]:
        """Every schema file stem loaded, e.g. `contract-request-message-schema`."""
        return frozenset(self._stems)

    def problems_as(self, message: Any, type_name: str) -> list[Problem]:
        """Every problem of `message` read as `type_name` (empty when valid). Unknown type: error."""
        rel = MESSAGE_SCHEMAS.get(type_name) or UNTYPED_SCHEMAS.get(type_name)
        if rel is None:
            raise DspValidationError(
                f"unknown DSP type {_short(type_name)}", [Problem("/@type", "not a DSP 2025-1 type")]
            )
        return self._problems(rel, message)

    def validate_as(self, message: Any, type_name: str) -> None:
        """Raise `DspValidationError` unless `message` is a valid `type_name` (wire `@type` or untyped)."""
        problems = self.problems_as(message, type_name)
        if problems:
            raise _invalid(type_name, problems)

    def validate_message(self, message: Any) -> str:
        """Check a message against the schema its `@type` names; return that type.

        Raises `DspValidationError` when the message is not an object, has no or an unknown `@type`,
        or violates the schema (every violation listed).
        """
        if not isinstance(message, dict):
            raise DspValidationError(
                "a DSP message must be a JSON object", [Problem("", "must be of type object")]
            )
        type_name = message.get("@type")
        if type_name is None:
            raise DspValidationError(
                "the message has no @type", [Problem("/@type", "required property is missing")]
            )
        if not isinstance(type_name, str) or type_name not in MESSAGE_SCHEMAS:
            raise DspValidationError(
                f"unknown DSP message type {_short(type_name)}",
                [Problem("/@type", f"{_short(type_name)} is not a DSP 2025-1 message type")],
            )
        self.validate_as(message, type_name)
        return type_name

    def validate_schema(self, document: Any, schema_name: str) -> None:
        """Check `document` against one schema file by stem (`"contract-schema"`, `"data-address-schema"`)."""
        rel = self._stems.get(schema_name)
        if rel is None:
            raise ConfigurationError(f"no DSP schema named {schema_name}")
        problems = self._problems(rel, document)
        if problems:
            raise _invalid(schema_name, problems)

    def _problems(self, rel: str, document: Any) -> list[Problem]:
        if self._fast_verdict(rel, document):
            return []
        # Invalid: jsonschema, the reference implementation, explains why.
        problems: list[Problem] = []
        for error in self._by_file[rel].iter_errors(document):
            problems.extend(_explain(error))
        if not problems:
            # The two checkers disagree; refuse rather than let a message through on a tie.
            problems.append(Problem("", "rejected by the fast schema check (jsonschema-rs)"))
        return _dedupe(problems)

    def _fast_verdict(self, rel: str, document: Any) -> bool:
        try:
            return self._fast[rel](document)
        except (ValueError, OverflowError, TypeError, RecursionError):
            return False  # a value it cannot take (a number beyond 64 bits ...): jsonschema decides

    def reference_is_valid(self, document: Any, type_name: str) -> bool:
        """The verdict of `jsonschema` alone (no fast check), for benchmarks and differential tests."""
        rel = MESSAGE_SCHEMAS.get(type_name) or UNTYPED_SCHEMAS.get(type_name) or self._stems[type_name]
        return bool(self._by_file[rel].is_valid(document))

    def fast_check_agrees(self, document: Any, schema_name: str) -> bool:
        """Whether jsonschema-rs and jsonschema give the same verdict (for differential tests)."""
        rel = self._stems[schema_name]
        return self._fast_verdict(rel, document) == bool(self._by_file[rel].is_valid(document))


def _invalid(what: str, problems: list[Problem]) -> DspValidationError:
    shown = "; ".join(str(p) for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return DspValidationError(f"not a valid {what}: {shown}{more}", problems, dsp_type=what)


def load_registry(directory: Path) -> SchemaRegistry:
    """Load and compile every schema under `directory`; `ConfigurationError` if any is missing or broken."""
    if not _looks_like_schema_dir(directory):
        raise ConfigurationError(
            f"{directory} does not hold the DSP 2025-1 schemas (expected {', '.join(_FOLDERS)})"
        )
    return SchemaRegistry(directory)


@lru_cache(maxsize=1)
def default_registry() -> SchemaRegistry:
    """The process-wide registry from `find_schema_dir()`, loaded on first use and then reused."""
    return load_registry(find_schema_dir())


def validate_message(message: Any, registry: SchemaRegistry | None = None) -> str:
    """`SchemaRegistry.validate_message` on `registry` (default: `default_registry()`)."""
    return (registry or default_registry()).validate_message(message)


def validate_as(message: Any, type_name: str, registry: SchemaRegistry | None = None) -> None:
    """`SchemaRegistry.validate_as` on `registry` (default: `default_registry()`)."""
    (registry or default_registry()).validate_as(message, type_name)
