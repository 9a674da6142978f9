"""Validation of a whole Messages API request body against the installed SDK's types.

`validate_body` takes the object that `anthropic.AsyncAnthropic().messages.create(**body)`
takes, as JSON-decoded values, and either returns it normalized (plain dicts and
lists) or raises `InvalidArgument` naming one JSON path, e.g.
`request.messages[2].content[0].source.media_type`. In order:

1. JSON itself: every key a string, no NUL in any string or key (Postgres refuses
   it), no NaN/Infinity, nesting at most MAX_DEPTH deep;
2. what Conveyor owns: `stream` is refused (Conveyor streams the call itself);
   sampling parameters (`SAMPLING_KEYS`: temperature, top_p, top_k), which the
   API takes at the top level but this SDK no longer names, are checked here and
   passed through (the worker sends them with the SDK's `extra_body`);
3. sizes from the settings: the body's JSON bytes, messages, tools;
4. the shape, by the SDK's `MessageCreateParamsNonStreaming` (see `schema`):
   unknown keys are refused at every level, except top-level keys listed in
   `BodyLimits.extra_top_level_keys` (CONVEYOR_REQUEST_EXTRA_KEYS), which pass
   through unchecked so that an API parameter newer than the SDK can be used;
5. what the types cannot say: 1 <= max_tokens <= max_output_tokens, at least one
   message, base64 image and PDF data decodes, an image's bytes are of its
   media_type, and the images and documents per request are bounded.

`estimate_input_tokens` (see `estimate`) gives the input-token estimate the shared
rate-limit budget takes before a call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from conveyor.contract.request_body.estimate import estimate_input_tokens
from conveyor.contract.request_body.media import decode_base64, image_type, media_blocks
from conveyor.contract.request_body.schema import adapter, describe, json_path
from conveyor.core.config import Settings
from conveyor.core.errors import InvalidArgument

__all__ = [
    "MAX_DEPTH",
    "SAMPLING_KEYS",
    "BodyLimits",
    "estimate_input_tokens",
    "validate_body",
    "warm_up",
]

MAX_DEPTH = 100
"""Deepest nesting of objects and arrays accepted (JSON schemas of tools included)."""


@dataclass(frozen=True)
class BodyLimits:
    """Bounds on a request body (defaults: those of the default settings)."""

    max_body_bytes: int = 15 * 1024 * 1024
    max_messages: int = 1000
    max_output_tokens: int = 128_000
    max_images: int = 100
    max_documents: int = 100
    max_tools: int = 512
    extra_top_level_keys: frozenset[str] = frozenset()
    """Top-level keys the SDK does not know that are passed through unchecked."""

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        return cls(
            max_body_bytes=settings.max_request_bytes,
            max_messages=settings.max_messages,
            max_output_tokens=settings.max_output_tokens,
            max_images=settings.max_request_images,
            max_documents=settings.max_request_documents,
            max_tools=settings.max_request_tools,
            extra_top_level_keys=frozenset(settings.request_extra_keys),
        )


SAMPLING_KEYS = frozenset({"temperature", "top_p", "top_k"})
"""Top-level sampling parameters of the Messages API that this SDK does not name."""


def _check_sampling(body: dict[str, Any], path: str) -> None:
    """temperature and top_p: numbers 0..1; top_k: a positive integer (as the API says)."""
    for key in ("temperature", "top_p"):
        value: Any = body.get(key)
        if key in body and (type(value) not in (int, float) or not 0 <= value <= 1):
            raise _fail(f"{path}.{key}", "must be a number between 0 and 1")
    top_k = body.get("top_k")
    if "top_k" in body and (type(top_k) is not int or top_k < 1):
        raise _fail(f"{path}.top_k", "must be a positive integer")


def warm_up() -> None:
    """Build the validator now (about a second) rather than on the first request."""
    adapter()


def _fail(path: str, description: str) -> InvalidArgument:
    return InvalidArgument(path, description)


def _clean(value: Any, depth: int = 0) -> bool:
    """Whether `_scan` would find nothing (the fast path: no paths are built)."""
    t = type(value)
    if t is dict or t is list:
        if depth > MAX_DEPTH:
            return False
        if t is dict:
            for key in value:
                if type(key) is not str or "\x00" in key:
                    return False
        for item in value.values() if t is dict else value:
            ti = type(item)
            if ti is str:
                if "\x00" in item:
                    return False
            elif ti is dict or ti is list or ti is float or ti is int:
                if not _clean(item, depth + 1):
                    return False
            elif item is not None and ti is not bool:
                return False
        return True
    if t is float:
        return math.isfinite(value)
    if t is int:
        return bool(-(1 << 63) <= value < 1 << 64)
    return (t is str and "\x00" not in value) or value is None or t is bool


def _scan(value: Any, path: str, depth: int = 0) -> None:
    """Refuse what JSON or Postgres jsonb cannot hold, naming where it is."""
    if depth > MAX_DEPTH:
        raise _fail(path, f"nested deeper than {MAX_DEPTH} levels")
    items: Any
    if type(value) is dict:
        items = value.items()
        for key in value:
            if type(key) is not str:
                raise _fail(path, f"has a key that is not a string: {key!r}")
            if "\x00" in key:
                raise _fail(f"{path}[{key!r}]", "key contains a NUL character (\\u0000)")
    elif type(value) is list:
        items = enumerate(value)
    else:
        _scan_leaf(value, path)
        return
    for key, item in items:
        t = type(item)
        if t is str:
            if "\x00" in item:
                raise _fail(_child(path, key), "contains a NUL character (\\u0000)")
        elif t is bool or item is None:
            continue
        elif t is dict or t is list:
            _scan(item, _child(path, key), depth + 1)
        else:
            _scan_leaf(item, _child(path, key))


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return json_path(path, [key])


def _scan_leaf(value: Any, path: str) -> None:
    if type(value) is float:
        if not math.isfinite(value):
            raise _fail(path, "must be a finite number")
    elif type(value) is int:
        if not -(1 << 63) <= value < 1 << 64:
            raise _fail(path, "is out of the 64-bit range")
    elif type(value) is str:
        if "\x00" in value:
            raise _fail(path, "contains a NUL character (\\u0000)")
    elif value is not None and type(value) is not bool:
        raise _fail(path, f"is not a JSON value ({type(value).__name__})")


def validate_body(body: object, limits: BodyLimits, *, path: str = "request") -> dict[str, Any]:
    """Check a Messages API request body; return it normalized, or raise InvalidArgument."""
    if not isinstance(body, dict):
        raise _fail(path, "must be a JSON object")
    if not _clean(body):
        _scan(body, path)
    if "stream" in body:
        raise _fail(f"{path}.stream", "is set by Conveyor, which streams every call; leave it out")
    size = len(orjson.dumps(body))
    if size > limits.max_body_bytes:
        raise _fail(path, f"is {size} bytes of JSON, at most {limits.max_body_bytes}")
    _check_count(body, "messages", limits.max_messages, path)
    _check_count(body, "tools", limits.max_tools, path)

    if not SAMPLING_KEYS.isdisjoint(body):  # a key the setting lists passes unchecked
        _check_sampling(
            {k: v for k, v in body.items() if k not in limits.extra_top_level_keys}, path
        )
    extra = {k: body[k] for k in SAMPLING_KEYS | limits.extra_top_level_keys if k in body}
    checked = {k: v for k, v in body.items() if k not in extra} if extra else body
    try:
        out: dict[str, Any] = adapter().validate_python(checked)
    except ValidationError as e:
        first = _first_error(e)
        field, description = describe(first, path)
        unknown = [
            x["loc"][-1]
            for x in e.errors(include_url=False)
            if x["type"] == "extra_forbidden" and x["loc"][:-1] == first["loc"][:-1]
        ]
        if first["type"] == "missing" and unknown:  # e.g. "txt" for "text"
            description += f" (the object has an unknown field {unknown[0]!r} instead)"
        if len(first["loc"]) == 1 and first["type"] == "extra_forbidden":
            description = (
                "is not a parameter of the Messages API known to this Conveyor "
                "(CONVEYOR_REQUEST_EXTRA_KEYS lets a new one through)"
            )
        raise _fail(field, description) from None

    max_tokens = out["max_tokens"]
    if not 1 <= max_tokens <= limits.max_output_tokens:
        raise _fail(f"{path}.max_tokens", f"must be between 1 and {limits.max_output_tokens}")
    if not out["messages"]:
        raise _fail(f"{path}.messages", "at least one message is required")
    _check_media(out, limits, path)
    out.update(extra)
    return out


def _first_error(error: ValidationError) -> ErrorDetails:
    """The first error, unless its object's own `type` is wrong: that one says more
    (a system block of type image lacks `text` only because it is not text)."""
    errors = error.errors(include_url=False)
    first = errors[0]
    for other in errors[1:]:
        loc = other["loc"]
        if (
            other["type"] == "literal_error"
            and loc[:-1] == first["loc"][:-1]
            and loc[-1] in ("type", "role")
        ):
            return other
    return first


def _check_count(body: dict[str, Any], key: str, most: int, path: str) -> None:
    items = body.get(key)
    if isinstance(items, list) and len(items) > most:
        raise _fail(f"{path}.{key}", f"has {len(items)} items, at most {most}")


def _check_media(body: dict[str, Any], limits: BodyLimits, path: str) -> None:
    """Count images and documents; base64 data must decode and match its media_type."""
    images = documents = 0
    for block, where in media_blocks(body):
        source = block["source"]
        if block["type"] == "image":
            images += 1
            if images > limits.max_images:
                raise _fail(f"{path}{where}", f"more than {limits.max_images} images in a request")
        else:
            documents += 1
            if documents > limits.max_documents:
                raise _fail(
                    f"{path}{where}", f"more than {limits.max_documents} documents in a request"
                )
        if source["type"] != "base64":
            continue
        data = decode_base64(source["data"])
        if not data:
            raise _fail(f"{path}{where}.source.data", "is not valid base64")
        if block["type"] == "image":
            actual = image_type(data)
            if actual is None:
                raise _fail(f"{path}{where}.source.data", "is not a JPEG, PNG, GIF or WebP image")
            if actual != source["media_type"]:
                raise _fail(
                    f"{path}{where}.source.media_type",
                    f"is {source['media_type']} but the data is {actual}",
                )
        elif not data.startswith(b"%PDF-"):
            raise _fail(f"{path}{where}.source.data", "is not a PDF (no %PDF- header)")
