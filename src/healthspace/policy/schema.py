"""The profile's JSON Schema, "odrl:" prefix normalisation and conformance problems as JSON pointers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaError

from healthspace.core.errors import ValidationError

__all__ = [
    "PolicyError",
    "Problem",
    "normalise",
    "profile_schema",
    "schema_problems",
]

_ODRL_PREFIXES = ("odrl:", "http://www.w3.org/ns/odrl/2/", "https://www.w3.org/ns/odrl/2/")
# Values that name ODRL terms and may therefore carry a prefix, by the key they sit under.
_TERM_KEYS = frozenset({"@type", "action", "leftOperand", "operator"})


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong (`message`) and where (`pointer`, an RFC 6901 JSON pointer into the policy as given)."""

    pointer: str
    message: str

    def __str__(self) -> str:
        return f"{self.pointer or '/'}: {self.message}"


class PolicyError(ValidationError):
    """A policy does not conform to the health ODRL profile. `problems` lists every pointer and message."""

    code = "policy-invalid"
    title = "The policy does not conform to the health ODRL profile"

    def __init__(self, problems: list[Problem]) -> None:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(
            f"policy does not conform to the health ODRL profile at {first}{more}",
            problems=[{"pointer": p.pointer, "message": p.message} for p in problems],
        )
        self.problems = tuple(problems)


@cache
def profile_schema() -> dict[str, Any]:
    """The profile's JSON Schema (draft 2020-12); `docs/policy/` publishes the same document."""
    text = resources.files("healthspace.policy").joinpath("profile.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(profile_schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)


def _strip(term: str) -> str:
    for prefix in _ODRL_PREFIXES:
        if term.startswith(prefix):
            return term[len(prefix) :]
    return term


def _escape(segment: str | int) -> str:
    return str(segment).replace("~", "~0").replace("/", "~1")


def normalise(doc: Any) -> tuple[Any, list[Problem]]:
    """Remove ODRL prefixes from keys and term values; `{"@id": term}` term values become the term.

    Returns the normalised copy and problems (a key given both with and without prefix)."""
    problems: list[Problem] = []

    def walk(node: Any, key: str | None, pointer: str) -> Any:
        if isinstance(node, dict):
            if key in _TERM_KEYS and set(node) == {"@id"} and isinstance(node["@id"], str):
                return _strip(node["@id"])
            out: dict[str, Any] = {}
            for k, v in node.items():
                nk = _strip(k) if isinstance(k, str) else k
                if nk in out:
                    problems.append(Problem(f"{pointer}/{_escape(k)}", f"'{nk}' is given twice"))
                    continue
                out[nk] = walk(v, nk, f"{pointer}/{_escape(k)}")
            return out
        if isinstance(node, list):
            return [walk(v, key, f"{pointer}/{i}") for i, v in enumerate(node)]
        if isinstance(node, str) and key in _TERM_KEYS:
            return _strip(node)
        return node

    return walk(doc, None, ""), problems


def original_pointer(doc: Any, path: list[str | int]) -> str:
    """Map a path in the normalised document back to a JSON pointer into `doc` as the author wrote it."""
    parts: list[str] = []
    node = doc
    for seg in path:
        if isinstance(node, dict) and isinstance(seg, str):
            key = seg
            if seg not in node:
                key = next((k for k in node if isinstance(k, str) and _strip(k) == seg), seg)
            parts.append(_escape(key))
            node = node.get(key)
        elif isinstance(node, list) and isinstance(seg, int):
            parts.append(str(seg))
            node = node[seg] if seg < len(node) else None
        else:
            parts.append(_escape(seg))
            node = None
    return "".join("/" + p for p in parts)


def _deepest(error: SchemaError) -> SchemaError:
    """For if/then and oneOf failures, the most specific sub-error says what is actually wrong."""
    while error.context:
        # The sub-error that got furthest into the document; ties go to the first branch tried.
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


_RIGHT_OPERAND_HELP = (
    'is not a valid right operand: use a string (numbers too, e.g. "10"), '
    '{"@value": "...", "@type": "..."}, {"@id": "..."} or a non-empty array of these'
)


def _message(error: SchemaError) -> str:
    if error.validator == "additionalProperties":
        return f"unexpected member: {error.message.split('(', 1)[-1].rstrip(')')}"
    if error.validator == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)
        return f"{error.instance!r} is not a term of the profile; expected one of: {allowed}"
    return str(error.message)


def schema_problems(doc: Any) -> list[Problem]:
    """Every place where `doc` (as the author wrote it) breaks the profile schema, in document order."""
    normalised, problems = normalise(doc)
    for error in sorted(_validator().iter_errors(normalised), key=lambda e: list(map(str, e.absolute_path))):
        path = list(error.absolute_path)
        if "rightOperand" in path:
            # Report the whole right operand: the branches of its oneOf say little one by one.
            cut = path.index("rightOperand") + 1
            path = path[:cut]
            message = f"{_instance_at(normalised, path)!r} {_RIGHT_OPERAND_HELP}"
        else:
            specific = _deepest(error)
            path = list(specific.absolute_path)
            message = _message(specific)
        problems.append(Problem(original_pointer(doc, path), message))
    return problems


def _instance_at(doc: Any, path: list[str | int]) -> Any:
    node = doc
    for seg in path:
        node = node[seg]
    return node
