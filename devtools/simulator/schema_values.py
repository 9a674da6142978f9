"""Deterministic values that satisfy a JSON schema: the simulator's tool inputs and
structured outputs.

`value_for_schema(schema, seed)` walks the schema and builds a value of it: objects
with every listed property (required ones always, optional ones too, so answers look
full), the declared types, enums and consts, arrays within minItems/maxItems,
numbers within their bounds and multipleOf, strings within their lengths and of the
common formats (date, date-time, time, email, uri, uuid, ipv4), `$ref` to local
definitions, `allOf` merged, the first workable branch of `anyOf`/`oneOf`. The same
schema and seed give the same value.

Not covered (the value may then not validate): `pattern` (a regex has no general
generator; strings are plain words), `not`, `if`/`then`/`else`, `dependentSchemas`,
`uniqueItems` over enums smaller than minItems, and remote `$ref`s.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Mapping
from typing import Any, Final, TypeGuard

__all__ = ["value_for_schema"]

_WORDS: Final[tuple[str, ...]] = (
    "amber",
    "basalt",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "granite",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lantern",
    "meadow",
    "nimbus",
    "orchard",
    "prairie",
)
_MAX_DEPTH: Final = 12
"""Deeper than this, optional properties and array items are left out (recursive schemas)."""
_FORMATS: Final[dict[str, str]] = {
    "date": "2024-05-17",
    "date-time": "2024-05-17T09:30:00Z",
    "time": "09:30:00Z",
    "email": "sim@example.com",
    "idn-email": "sim@example.com",
    "uri": "https://example.com/sim",
    "iri": "https://example.com/sim",
    "uri-reference": "https://example.com/sim",
    "hostname": "example.com",
    "ipv4": "192.0.2.7",
    "ipv6": "2001:db8::7",
    "duration": "P1D",
}


def value_for_schema(schema: Any, seed: int = 0) -> Any:
    """A value valid against `schema` (see the module doc for what is not covered)."""
    root = schema if isinstance(schema, Mapping) else {}
    return _Builder(root, random.Random(seed)).value(root, 0)


class _Builder:
    def __init__(self, root: Mapping[str, Any], rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """Follow local `$ref`s (`#/$defs/x`, `#/definitions/x`, `#`)."""
        seen = 0
        while isinstance(schema.get("$ref"), str) and seen < 32:
            ref: str = schema["$ref"]
            target: Any = self.root
            if ref.startswith("#"):
                for part in ref[1:].split("/"):
                    if not part:
                        continue
                    part = part.replace("~1", "/").replace("~0", "~")
                    target = target.get(part) if isinstance(target, Mapping) else None
            else:
                target = None
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, Mapping) else rest
            seen += 1
        return schema

    def value(self, schema: Any, depth: int) -> Any:
        if schema is True or not isinstance(schema, Mapping):
            return self.rng.choice(_WORDS)
        schema = self.resolve(schema)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[self.rng.randrange(len(enum))]
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and all_of:
            schema = _merge([schema, *(self.resolve(s) for s in all_of if isinstance(s, Mapping))])
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                rest = {k: v for k, v in schema.items() if k != key}
                # The first branch that is not plain null gives the richer answer.
                chosen = next(
                    (b for b in branches if isinstance(b, Mapping) and b.get("type") != "null"),
                    branches[0],
                )
                return self.value(_merge([rest, self.resolve(chosen)]), depth)
        kind = _type_of(schema)
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, depth)
        if kind == "string":
            return self.string(schema)
        if kind == "integer":
            return self.integer(schema)
        if kind == "number":
            return self.number(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self.rng.choice(_WORDS)

    def object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        required = schema.get("required")
        required_names = (
            [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
        )
        out: dict[str, Any] = {}
        max_props = schema.get("maxProperties")
        for name, sub in props.items():
            optional = name not in required_names
            if optional and (depth >= _MAX_DEPTH or _is_int(max_props) and len(out) >= max_props):
                continue
            out[name] = self.value(sub, depth + 1)
        for name in required_names:
            if name not in out:
                extra = schema.get("additionalProperties")
                out[name] = self.value(extra if isinstance(extra, Mapping) else {}, depth + 1)
        min_props = schema.get("minProperties")
        extra = schema.get("additionalProperties")
        n = 0
        while _is_int(min_props) and len(out) < min_props and extra is not False:
            out[f"extra_{n}"] = self.value(extra if isinstance(extra, Mapping) else {}, depth + 1)
            n += 1
        return out

    def array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        prefix_items = list(prefix) if isinstance(prefix, list) else []
        items = schema.get("items")
        low = schema.get("minItems", 0)
        high = schema.get("maxItems")
        low = low if _is_int(low) else 0
        count = max(low, len(prefix_items) if depth < _MAX_DEPTH else 0)
        if depth < _MAX_DEPTH:
            count = max(count, min(2, high) if _is_int(high) else 2)
        if _is_int(high):
            count = min(count, high)
        if items is False:
            count = min(count, len(prefix_items))
        out: list[Any] = []
        for i in range(count):
            sub = prefix_items[i] if i < len(prefix_items) else items
            value = self.value(sub if sub is not None else {}, depth + 1)
            if schema.get("uniqueItems") and value in out:
                value = self._distinct(sub, out, depth)
            out.append(value)
        return out

    def _distinct(self, sub: Any, taken: list[Any], depth: int) -> Any:
        for _ in range(16):
            value = self.value(sub if sub is not None else {}, depth + 1)
            if value not in taken:
                return value
        return value

    def string(self, schema: Mapping[str, Any]) -> str:
        fmt = schema.get("format")
        if fmt == "uuid":
            return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        text = _FORMATS.get(fmt, "") if isinstance(fmt, str) else ""
        if not text:
            text = " ".join(self.rng.choice(_WORDS) for _ in range(2))
        low = schema.get("minLength", 0)
        high = schema.get("maxLength")
        if _is_int(low) and len(text) < low:
            text = text.ljust(low, "x")
        if _is_int(high) and len(text) > high:
            text = text[:high]
        return text

    def integer(self, schema: Mapping[str, Any]) -> int:
        low, high = _bounds(schema, integer=True)
        step = schema.get("multipleOf")
        start = low if low is not None else (high - 10 if high is not None else 0)
        end = high if high is not None else start + 100
        value = self.rng.randint(int(start), int(max(start, end)))
        if isinstance(step, int | float) and step > 0:
            value = int(math.ceil(value / step) * step)
            if high is not None and value > high:
                value = int(math.floor(high / step) * step)
        return value

    def number(self, schema: Mapping[str, Any]) -> float | int:
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and step > 0:
            return self.integer(schema)
        low, high = _bounds(schema, integer=False)
        start = low if low is not None else (high - 10.0 if high is not None else 0.0)
        end = high if high is not None else start + 100.0
        return round(start + (end - start) * self.rng.random(), 3) if end > start else start


def _type_of(schema: Mapping[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        real = [k for k in kind if k != "null"]
        kind = real[0] if real else (kind[0] if kind else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _bounds(schema: Mapping[str, Any], *, integer: bool) -> tuple[float | None, float | None]:
    """The inclusive bounds of a number schema (exclusive bounds moved inwards)."""
    eps = 1 if integer else 1e-6
    low: float | None = None
    high: float | None = None
    if isinstance(schema.get("minimum"), int | float):
        low = schema["minimum"]
    if isinstance(schema.get("exclusiveMinimum"), int | float):
        low = max(low if low is not None else -math.inf, schema["exclusiveMinimum"] + eps)
    if isinstance(schema.get("maximum"), int | float):
        high = schema["maximum"]
    if isinstance(schema.get("exclusiveMaximum"), int | float):
        high = min(high if high is not None else math.inf, schema["exclusiveMaximum"] - eps)
    if integer:
        low = math.ceil(low) if low is not None else None
        high = math.floor(high) if high is not None else None
    return low, high


def _merge(schemas: list[Mapping[str, Any]]) -> dict[str, Any]:
    """allOf: one schema with the properties and required names of all."""
    out: dict[str, Any] = {}
    for s in schemas:
        for key, value in s.items():
            if key == "allOf":
                continue
            if key == "properties" and isinstance(value, Mapping):
                out["properties"] = {**out.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                out["required"] = [*out.get("required", []), *value]
            else:
                out[key] = value
    return out


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
