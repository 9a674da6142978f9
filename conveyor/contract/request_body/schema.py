"""The installed SDK's request type, made strict for pydantic.

`anthropic.types.MessageCreateParamsNonStreaming` and the TypedDicts it refers to
are read (not copied) and rewritten once into equivalent types that pydantic
checks completely:

- `Iterable[...]` / `Sequence[...]` become `list[...]` (pydantic checks an
  `Iterable` lazily, only when it is iterated);
- every TypedDict refuses unknown keys (`extra="forbid"`, unless the SDK itself
  sets `extra="allow"`, as for a tool's `input_schema`) and is strict (no `"5"`
  for 5, no `true` for 1);
- every union picks its member by the JSON kind of the value (string, number,
  object, array...) and, among objects, by their `type` (or `role`) literal, so a
  bad block yields one error naming one field, not one per union member;
- members that cannot come from JSON (the SDK's response models, file handles,
  `bytes`) are dropped.

Union members are tagged `"\\x00<kind>"` or `"\\x00<key>=<value>"`: pydantic puts
the tag in an error's location, and NUL never appears in a body's own keys (it is
refused before validation), so `json_path` can tell tags from keys.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import IO, Annotated, Any, Literal, Union, get_args, get_origin

import typing_extensions as te
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter
from pydantic_core import ErrorDetails

TAG = "\x00"
"""First character of a union tag in an error location."""

_LIST_ORIGINS = (list, Iterable, Sequence)
_REQUIRED = (te.Required, te.NotRequired, typing.Required, typing.NotRequired)
_SCALARS: dict[type, str] = {str: "string", bool: "boolean", int: "integer", float: "number"}


class _NotJson(Exception):
    """A type no JSON value can have (a file handle, a response model)."""


def json_kind(value: object) -> str:
    """The JSON kind of a decoded value: string, integer, number, boolean, null, object, array."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _strip_required(hint: Any) -> Any:
    while get_origin(hint) in _REQUIRED:
        hint = get_args(hint)[0]
    return hint


def required_keys(td: type) -> frozenset[str]:
    """Keys marked Required (the SDK's `from __future__ import annotations` leaves
    `__required_keys__` empty, so the resolved hints are read)."""
    total = getattr(td, "__total__", True)
    out = set()
    for key, hint in typing.get_type_hints(td, include_extras=True).items():
        origin = get_origin(hint)
        if origin in (te.Required, typing.Required) or (
            total and origin not in (te.NotRequired, typing.NotRequired)
        ):
            out.add(key)
    return frozenset(out)


def _literal_kinds(values: tuple[Any, ...]) -> set[str]:
    return {json_kind(v) for v in values}


class _Rewriter:
    """Rewrites SDK param types into strict, discriminated ones (memoized per TypedDict)."""

    def __init__(self) -> None:
        self._done: dict[type, Any] = {}

    def kinds(self, hint: Any) -> set[str]:
        """The JSON kinds a value of this (original SDK) type can have; `any` for Any/object."""
        hint = _strip_required(hint)
        origin = get_origin(hint)
        if hint is type(None) or hint is None:
            return {"null"}
        if hint in _SCALARS:
            return {_SCALARS[hint]}
        if hint is object or hint is Any:
            return {"any"}
        if te.is_typeddict(hint) or origin is dict or hint is dict:
            return {"object"}
        if origin in _LIST_ORIGINS or hint is list:
            return {"array"}
        if origin is Literal:
            return _literal_kinds(get_args(hint))
        if origin is Annotated:
            return self.kinds(get_args(hint)[0])
        if origin in (Union, types.UnionType):
            out: set[str] = set()
            for arg in get_args(hint):
                if self.json_able(arg):
                    out |= self.kinds(arg)
            return out
        raise _NotJson(repr(hint))

    def json_able(self, hint: Any) -> bool:
        try:
            self.kinds(hint)
        except _NotJson:
            return False
        if get_origin(hint) is Annotated:
            return self.json_able(get_args(hint)[0])
        if get_origin(hint) in (Union, types.UnionType):
            return any(self.json_able(a) for a in get_args(hint))
        return True

    def convert(self, hint: Any) -> Any:
        hint = _strip_required(hint)
        origin = get_origin(hint)
        if hint is type(None) or hint is None or hint in _SCALARS or origin is Literal:
            return hint
        if hint is object or hint is Any:
            return Any
        if te.is_typeddict(hint):
            return self._typeddict(hint)
        if origin is dict or hint is dict:
            args = get_args(hint)
            return dict[str, self.convert(args[1]) if args else Any]  # type: ignore[misc]
        if origin in _LIST_ORIGINS or hint is list:
            args = get_args(hint)
            return list[self.convert(args[0]) if args else Any]  # type: ignore[misc]
        if origin is Annotated:
            return self.convert(get_args(hint)[0])
        if origin in (Union, types.UnionType):
            return self._union([a for a in get_args(hint) if self.json_able(a)])
        if isinstance(hint, type) and issubclass(hint, BaseModel | bytes | os.PathLike):
            raise _NotJson(repr(hint))
        if origin is IO or hint is IO:
            raise _NotJson(repr(hint))
        raise TypeError(f"request_body: no JSON rewrite for SDK type {hint!r}")

    def _typeddict(self, td: type) -> Any:
        if td in self._done:
            return self._done[td]
        hints = typing.get_type_hints(td, include_extras=True)
        required = required_keys(td)
        fields: dict[str, Any] = {}
        for key, hint in hints.items():
            inner = self.convert(hint)
            fields[key] = te.Required[inner] if key in required else te.NotRequired[inner]
        make_typeddict: Any = te.TypedDict  # the functional form, with computed fields
        new: Any = make_typeddict(td.__name__, fields, total=False)
        sdk_config: Mapping[str, Any] = getattr(td, "__pydantic_config__", None) or {}
        extra: Literal["allow", "forbid"] = (
            "allow" if sdk_config.get("extra") == "allow" else "forbid"
        )
        new.__pydantic_config__ = ConfigDict(extra=extra, strict=True, allow_inf_nan=False)
        self._done[td] = new
        return new

    def _union(self, members: list[Any]) -> Any:
        if len(members) == 1:
            return self.convert(members[0])
        groups: dict[str, list[Any]] = {}
        for m in members:
            ks = self.kinds(m)
            if "any" in ks:
                return Union[tuple(self.convert(a) for a in members)]  # noqa: UP007
            for k in ks:
                groups.setdefault(k, []).append(m)
        for kind, group in groups.items():
            base = next((t for t, k in _SCALARS.items() if k == kind and t in group), None)
            if base is not None:  # `str` next to string literals (e.g. model): plain str
                groups[kind] = [base]
        if len(groups) == 1 and not (
            "object" in groups and all(te.is_typeddict(g) for g in groups["object"])
        ):
            return self._plain(next(iter(groups.values())))
        choices: list[Any] = []
        object_key: str | None = None
        default_tag: str | None = None
        for kind, group in groups.items():
            if kind == "object" and len(group) > 1 and all(te.is_typeddict(g) for g in group):
                object_key, default_tag, tagged = self._by_literal(group)
                choices.extend(tagged)
                continue
            if len(group) > 1:
                raise TypeError(f"request_body: cannot tell apart {group} (all {kind})")
            one = self.convert(group[0])
            choices.append(Annotated[one, Tag(TAG + kind)])
        kinds = frozenset(groups)
        return Annotated[
            Union[tuple(choices)],  # noqa: UP007
            Discriminator(_discriminator(kinds, object_key, default_tag)),
        ]

    def _plain(self, group: list[Any]) -> Any:
        if len(group) == 1:
            return self.convert(group[0])
        # union_mode keeps pydantic from merging this union into the tagged one around it.
        return Annotated[
            Union[tuple(self.convert(g) for g in group)],  # noqa: UP007
            Field(union_mode="left_to_right"),
        ]

    def _by_literal(self, group: list[type]) -> tuple[str, str | None, list[Any]]:
        """Tag TypedDicts by the literal key they all have (`type`, else `role`)."""
        hints = [typing.get_type_hints(g, include_extras=True) for g in group]
        for key in ("type", "role"):
            values: list[tuple[Any, ...]] = []
            for h in hints:
                hint = _strip_required(h.get(key))
                lits = [a for a in get_args(hint) if get_origin(a) is Literal]
                if get_origin(hint) is Literal:
                    lits = [hint]
                values.append(tuple(v for lit in lits for v in get_args(lit)))
            if all(values):
                break
        else:
            raise TypeError(f"request_body: union of {group} has no literal discriminator")
        tagged: list[Any] = []
        default: str | None = None
        for td, vals in zip(group, values, strict=True):
            converted = self.convert(td)
            for v in vals:
                tagged.append(Annotated[converted, Tag(f"{TAG}{key}={v}")])
            if key not in required_keys(td):
                default = f"{TAG}{key}={vals[0]}"  # e.g. a custom tool without "type"
        return key, default, tagged


def _discriminator(
    kinds: frozenset[str], key: str | None, default: str | None
) -> Callable[[Any], str | None]:
    number_only = "number" in kinds and "integer" not in kinds

    def pick(value: Any) -> str | None:
        kind = json_kind(value)
        if kind == "integer" and number_only:
            kind = "number"
        if kind == "object" and key is not None:
            tag = value.get(key)
            if tag is None:
                return default or f"{TAG}{key}=<missing>"
            return f"{TAG}{key}={tag}" if isinstance(tag, str) else f"{TAG}{key}=<{json_kind(tag)}>"
        return TAG + kind

    return pick


@lru_cache(maxsize=1)
def adapter() -> TypeAdapter[Any]:
    """The TypeAdapter of the rewritten request type (built once, ~1 s)."""
    # Imported here: the SDK takes seconds to import, and every service imports this
    # package (through conveyor.contract.validation) while only the gateway checks bodies.
    from anthropic.types.message_create_params import MessageCreateParamsNonStreaming

    root = _Rewriter().convert(MessageCreateParamsNonStreaming)
    return TypeAdapter(root)


# ---------------------------------------------------------------- errors to paths

_EXPECTED_TAG = re.compile(r"\\x00([^']*)'")


def json_path(base: str, loc: Sequence[int | str]) -> str:
    """`request.messages[2].content[0].source` from a pydantic location (tags dropped)."""
    out = [base]
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part.startswith(TAG):
            continue
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out.append(f".{part}")
        else:
            out.append(f"[{part!r}]")
    return "".join(out)


_KIND_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "null": "null",
    "object": "an object",
    "array": "an array",
}


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "a boolean",
    "dict_type": "an object",
    "typed_dict_type": "an object",
    "list_type": "an array",
    "none_required": "null",
}


def describe(error: ErrorDetails, base: str) -> tuple[str, str]:
    """(JSON path, description) of one pydantic error."""
    loc = list(error["loc"])
    kind = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = str(ctx.get("tag", ""))[1:]
        expected = _EXPECTED_TAG.findall(str(ctx.get("expected_tags", "")))
        if "=" in tag:  # an object whose type/role is unknown
            key, value = tag.split("=", 1)
            allowed = sorted({e.split("=", 1)[1] for e in expected if e.startswith(key + "=")})
            if value == "<missing>":
                return json_path(base, [*loc, key]), f"is required: one of {', '.join(allowed)}"
            return (
                json_path(base, [*loc, key]),
                f"unknown {key} {value!r}; expected one of: {', '.join(allowed)}",
            )
        if kind == "union_tag_not_found" or not tag:
            return json_path(base, loc), "is missing its type"
        wanted = sorted({e.split("=", 1)[0] for e in expected})
        words = " or ".join(_KIND_WORDS.get(w, w) for w in wanted)
        return json_path(base, loc), f"must be {words}, not {_KIND_WORDS.get(tag, tag)}"
    path = json_path(base, loc)
    if kind == "missing":
        return path, "is required"
    if kind == "extra_forbidden":
        return path, "is not a field of this object"
    if kind in _TYPE_WORDS:
        return path, f"must be {_TYPE_WORDS[kind]}"
    if kind == "literal_error":
        return path, f"must be {ctx.get('expected')}"
    return path, error["msg"][:1].lower() + error["msg"][1:]
