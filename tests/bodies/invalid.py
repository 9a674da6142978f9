"""`INVALID`: malformed bodies, each a `Bad` case with the JSON path its refusal must name
(and the settings it needs, if any)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from tests.bodies.parts import (
    _ASK,
    _CALL,
    MODEL,
    PDF_BLOCK,
    PNG_B64,
    WEATHER_TOOL,
    Body,
    assistant,
    body,
    image,
    text,
    tool_use,
    user,
)


@dataclass(frozen=True)
class Bad:
    """A body that must be refused naming `path` (with these settings, if any)."""

    name: str
    body: Body
    path: str
    settings: dict[str, Any] = field(default_factory=dict)


def _with(base: Body, **changes: Any) -> Body:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


_TOOLS = body(_ASK, tools=[WEATHER_TOOL])

INVALID: list[Bad] = [
    Bad(
        "unknown block type",
        body(user({"type": "video", "url": "x"})),
        "request.messages[0].content[0].type",
    ),
    Bad("block without type", body(user({"text": "hi"})), "request.messages[0].content[0].type"),
    Bad("content is a number", body({"role": "user", "content": 5}), "request.messages[0].content"),
    Bad(
        "tool without input_schema",
        body(_ASK, tools=[{"name": "get_weather", "description": "x"}]),
        "request.tools[0].input_schema",
    ),
    Bad(
        "tool with unknown type",
        body(_ASK, tools=[{**WEATHER_TOOL, "type": "magic"}]),
        "request.tools[0].type",
    ),
    Bad(
        "image source without data",
        body(
            user(
                text("see"),
                {"type": "image", "source": {"type": "base64", "media_type": "image/png"}},
            )
        ),
        "request.messages[0].content[1].source.data",
    ),
    Bad(
        "image source of unknown type",
        body(user({"type": "image", "source": {"type": "ftp", "url": "ftp://x"}})),
        "request.messages[0].content[0].source.type",
    ),
    Bad(
        "bad image media_type",
        body(user(image("image/bmp", PNG_B64))),
        "request.messages[0].content[0].source.media_type",
    ),
    Bad(
        "media_type not the image's",
        body("look", user(text("see"), image("image/jpeg", PNG_B64))),
        "request.messages[1].content[1].source.media_type",
    ),
    Bad(
        "image data not base64",
        body(user(image("image/png", "not base64!!"))),
        "request.messages[0].content[0].source.data",
    ),
    Bad(
        "pdf data not a pdf",
        body(user({**PDF_BLOCK, "source": {**PDF_BLOCK["source"], "data": PNG_B64}})),
        "request.messages[0].content[0].source.data",
    ),
    Bad(
        "tool_result without tool_use_id",
        body(
            _ASK,
            assistant(_CALL),
            user({"type": "tool_result", "content": "18C"}),
            tools=[WEATHER_TOOL],
        ),
        "request.messages[2].content[0].tool_use_id",
    ),
    Bad(
        "tool_use input not an object",
        body(_ASK, assistant(tool_use("toolu_01", "get_weather", "Paris")), tools=[WEATHER_TOOL]),  # type: ignore[arg-type]
        "request.messages[1].content[0].input",
    ),
    Bad("unknown top-level key", _with(_TOOLS, temprature=0.5), "request.temprature"),
    Bad(
        "typo'd key inside a block",
        body(user({"type": "text", "txt": "hi"})),
        "request.messages[0].content[0].text",
    ),
    Bad(
        "extra key inside a block",
        body(user({"type": "text", "text": "hi", "colour": "red"})),
        "request.messages[0].content[0].colour",
    ),
    Bad("stream set", _with(_TOOLS, stream=True), "request.stream"),
    Bad("stream false set", _with(_TOOLS, stream=False), "request.stream"),
    Bad(
        "NUL in a nested string",
        body(
            _ASK,
            assistant(tool_use("toolu_01", "get_weather", {"city": "Par\x00is"})),
            tools=[WEATHER_TOOL],
        ),
        "request.messages[1].content[0].input.city",
    ),
    Bad(
        "NUL in a key",
        body(user({"type": "text", "text": "hi", "a\x00b": 1})),
        "request.messages[0].content[0]['a\\x00b']",
    ),
    Bad("max_tokens a string", _with(_TOOLS, max_tokens="1024"), "request.max_tokens"),
    Bad("max_tokens a float", _with(_TOOLS, max_tokens=1024.5), "request.max_tokens"),
    Bad("max_tokens zero", _with(_TOOLS, max_tokens=0), "request.max_tokens"),
    Bad("max_tokens above the bound", _with(_TOOLS, max_tokens=10**6), "request.max_tokens"),
    Bad(
        "model missing",
        {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
        "request.model",
    ),
    Bad(
        "max_tokens missing",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        "request.max_tokens",
    ),
    Bad("no messages", body(), "request.messages"),
    Bad(
        "too many tools",
        body(_ASK, tools=[{**WEATHER_TOOL, "name": f"t{i}"} for i in range(3)]),
        "request.tools",
        {"max_request_tools": 2},
    ),
    Bad(
        "too many images",
        body(user(*[image("image/png", PNG_B64) for _ in range(3)])),
        "request.messages[0].content[2]",
        {"max_request_images": 2},
    ),
    Bad(
        "too many documents",
        body(user(PDF_BLOCK, PDF_BLOCK)),
        "request.messages[0].content[1]",
        {"max_request_documents": 1},
    ),
    Bad("body too large", body("x" * 5000), "request", {"max_request_bytes": 4096}),
    Bad("too many messages", body("a", "b", "c"), "request.messages", {"max_messages": 2}),
    Bad(
        "bad cache_control ttl",
        body("Hi", system=[text("rules", cache_control={"type": "ephemeral", "ttl": "10m"})]),
        "request.system[0].cache_control.ttl",
    ),
    Bad(
        "cache_control of unknown type",
        body(user(text("hi", cache_control={"type": "persistent"}))),
        "request.messages[0].content[0].cache_control.type",
    ),
    Bad(
        "thinking budget not an int",
        _with(_TOOLS, thinking={"type": "enabled", "budget_tokens": "2048"}),
        "request.thinking.budget_tokens",
    ),
    Bad(
        "thinking without budget",
        _with(_TOOLS, thinking={"type": "enabled"}),
        "request.thinking.budget_tokens",
    ),
    Bad(
        "role not user/assistant",
        body({"role": "bot", "content": "hi"}),
        "request.messages[0].role",
    ),
    Bad(
        "tool_choice of unknown type",
        _with(_TOOLS, tool_choice={"type": "some"}),
        "request.tool_choice.type",
    ),
    Bad(
        "tool_choice tool without name",
        _with(_TOOLS, tool_choice={"type": "tool"}),
        "request.tool_choice.name",
    ),
    Bad(
        "metadata with an unknown key",
        _with(_TOOLS, metadata={"user": "x"}),
        "request.metadata.user",
    ),
    Bad("stop_sequences a string", _with(_TOOLS, stop_sequences="STOP"), "request.stop_sequences"),
    Bad("service_tier unknown", _with(_TOOLS, service_tier="priority"), "request.service_tier"),
    Bad(
        "output format without schema",
        _with(_TOOLS, output_config={"format": {"type": "json_schema"}}),
        "request.output_config.format.schema",
    ),
    Bad("system a number", _with(_TOOLS, system=7), "request.system"),
    Bad(
        "system block not text",
        _with(_TOOLS, system=[image("image/png", PNG_B64)]),
        "request.system[0].type",
    ),
    Bad(
        "thinking block without signature",
        body(_ASK, assistant({"type": "thinking", "thinking": "hmm"})),
        "request.messages[1].content[0].signature",
    ),
    Bad(
        "NaN in a tool input",
        body(_ASK, assistant(tool_use("t", "get_weather", {"n": float("nan")}))),
        "request.messages[1].content[0].input.n",
    ),
    Bad("body not an object", [1, 2], "request"),  # type: ignore[arg-type]
]
