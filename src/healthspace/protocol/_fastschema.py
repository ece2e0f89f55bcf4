"""A yes/no JSON Schema checker compiled to closures, for the keyword subset the DSP 2025-1 schemas use.

`jsonschema` interprets a schema on every call (≈0.4 ms for one ContractRequestMessage); the schemas
never change while a connector runs, so they are compiled once here into nested Python closures. This
only answers "valid or not": the error report for an invalid message still comes from `jsonschema`,
and the tests check that both agree on every official example, every invalid message and a set of
systematic mutations. A keyword this compiler does not know makes it refuse the schema
(`UnsupportedSchemaError`); the caller then uses `jsonschema` alone, so nothing is ever checked less.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from referencing._core import Resolver

__all__ = ["Check", "UnsupportedSchemaError", "compile_schema"]

Check = Callable[[Any], bool]

# Keywords that only annotate; they never affect validity.
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "title", "description", "definitions", "$defs"})


class UnsupportedSchemaError(Exception):
    """The schema uses something this compiler does not implement."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_TYPES: dict[str, Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": _is_number,
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
    ),
}


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: unlike Python's, `true` is not `1`."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


class _Compiler:
    def __init__(self) -> None:
        # Keyed by the identity of the subschema object, so recursive $refs compile once and close a loop.
        self._memo: dict[int, list[Check]] = {}

    def compile(self, schema: Any, resolver: Resolver[Any]) -> Check:
        if schema is True:
            return lambda _v: True
        if schema is False:
            return lambda _v: False
        if not isinstance(schema, dict):
            raise UnsupportedSchemaError(f"schema must be an object or boolean, got {type(schema).__name__}")
        key = id(schema)
        known = self._memo.get(key)
        if known is not None:
            return lambda v: known[0](v)
        cell: list[Check] = []
        self._memo[key] = cell
        checks = [self._keyword(name, value, schema, resolver) for name, value in schema.items()]
        live = [c for c in checks if c is not None]
        combined = _all(live)
        cell.append(combined)
        return combined

    def _keyword(
        self, name: str, value: Any, schema: dict[str, Any], resolver: Resolver[Any]
    ) -> Check | None:
        if name in _ANNOTATIONS:
            # A $id changes the base URI of what it holds; only document roots (registered under it) may.
            if name == "$id" and resolver.lookup(value).contents is not schema:
                raise UnsupportedSchemaError(f"$id {value} on a subschema")
            return None
        if name == "$ref":
            resolved = resolver.lookup(value)
            return self.compile(resolved.contents, resolved.resolver)
        if name == "type":
            names = value if isinstance(value, list) else [value]
            preds = [_TYPES[n] for n in names]
            return lambda v: any(p(v) for p in preds)
        if name == "const":
            return lambda v: _json_equal(v, value)
        if name == "enum":
            return lambda v: any(_json_equal(v, option) for option in value)
        if name == "properties":
            props = {prop: self.compile(sub, resolver) for prop, sub in value.items()}
            return lambda v: not isinstance(v, dict) or all(c(v[p]) for p, c in props.items() if p in v)
        if name == "required":
            names_ = tuple(value)
            return lambda v: not isinstance(v, dict) or all(n in v for n in names_)
        if name == "items":
            if not isinstance(value, dict | bool):
                raise UnsupportedSchemaError("tuple-form items")
            item = self.compile(value, resolver)
            return lambda v: not isinstance(v, list) or all(item(x) for x in v)
        if name == "minItems":
            return lambda v: not isinstance(v, list) or len(v) >= value
        if name == "contains":
            member = self.compile(value, resolver)
            return lambda v: not isinstance(v, list) or any(member(x) for x in v)
        if name == "pattern":
            regex = re.compile(value)
            return lambda v: not isinstance(v, str) or regex.search(v) is not None
        if name == "allOf":
            return _all([self.compile(sub, resolver) for sub in value])
        if name == "anyOf":
            alternatives = [self.compile(sub, resolver) for sub in value]
            return lambda v: any(c(v) for c in alternatives)
        if name == "oneOf":
            options = [self.compile(sub, resolver) for sub in value]
            return lambda v: sum(1 for c in options if c(v)) == 1
        if name == "not":
            negated = self.compile(value, resolver)
            return lambda v: not negated(v)
        raise UnsupportedSchemaError(f"keyword {name}")


def _all(checks: list[Check]) -> Check:
    if not checks:
        return lambda _v: True
    if len(checks) == 1:
        return checks[0]
    return lambda v: all(c(v) for c in checks)


def compile_schema(schema: dict[str, Any], resolver: Resolver[Any]) -> Check:
    """Compile `schema` (resolving `$ref`s through `resolver`) into a predicate: True iff valid."""
    return _Compiler().compile(schema, resolver)
