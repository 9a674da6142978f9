"""A corpus of Messages API request bodies: real shapes that must pass, malformed ones that must not.

`VALID` holds (name, body) pairs that `messages.create(**body)` takes and that
Conveyor must accept and carry unchanged; `INVALID` holds `Bad` cases, each with the
JSON path its refusal must name. The unit tests of `conveyor.contract.request_body` use both;
end-to-end tests reuse them (a case with `settings` needs those settings, as
CONVEYOR_<NAME> environment variables, in the gateway under test).

Images are real PNG, GIF and WebP files of a few pixels; the JPEG is its header
(SOI, JFIF, start-of-frame) only, enough for the size and type checks; the PDF is a
small real two-page file.
"""

from __future__ import annotations

import base64
import copy
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

MODEL = "claude-sonnet-4-6"
Body = dict[str, Any]


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _jpeg_header(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


GIF_1X1 = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
WEBP_1X1 = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")


def _pdf(pages: int) -> bytes:
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objs = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>",
        *["<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"] * pages,
    ]
    out = b"%PDF-1.4\n"
    for i, obj in enumerate(objs, start=1):
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode()
    return out + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG_B64 = b64(_png(40, 30))
BIG_PNG_B64 = b64(_png(3000, 2000))  # estimated as downscaled to 1568 x 1045
JPEG_B64 = b64(_jpeg_header(800, 600))
GIF_B64 = b64(GIF_1X1)
WEBP_B64 = b64(WEBP_1X1)
PDF_B64 = b64(_pdf(2))

WEATHER_TOOL: Body = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
TIME_TOOL: Body = {
    "name": "get_time",
    "description": "Local time of a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def body(*messages: Body | str, **extra: Any) -> Body:
    """A body with max_tokens 1024; a str message is a user turn."""
    msgs = [{"role": "user", "content": m} if isinstance(m, str) else m for m in messages]
    return {"model": MODEL, "max_tokens": 1024, "messages": msgs, **extra}


def user(*content: Any) -> Body:
    return {"role": "user", "content": list(content)}


def assistant(*content: Any) -> Body:
    return {"role": "assistant", "content": list(content)}


def text(t: str, **extra: Any) -> Body:
    return {"type": "text", "text": t, **extra}


def image(media_type: str, data: str, **extra: Any) -> Body:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": data},
        **extra,
    }


def tool_use(tid: str, name: str, args: Body) -> Body:
    return {"type": "tool_use", "id": tid, "name": name, "input": args}


def tool_result(tid: str, content: Any, **extra: Any) -> Body:
    return {"type": "tool_result", "tool_use_id": tid, "content": content, **extra}


PDF_BLOCK: Body = {
    "type": "document",
    "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
}
EPHEMERAL_5M: Body = {"type": "ephemeral", "ttl": "5m"}
EPHEMERAL_1H: Body = {"type": "ephemeral", "ttl": "1h"}
THINKING: Body = {"type": "enabled", "budget_tokens": 2048}
_ASK = "What is the weather in Paris?"
_CALL = tool_use("toolu_01", "get_weather", {"city": "Paris"})

VALID: list[tuple[str, Body]] = [
    ("text string", body("Hello, Claude")),
    ("text blocks", body(user(text("Hello"), text("again")))),
    ("multi-turn text", body("Hi", {"role": "assistant", "content": "Hello!"}, "How are you?")),
    (
        "assistant prefill",
        body("Answer (A) or (B)?", {"role": "assistant", "content": "The answer is ("}),
    ),
    ("system string", body("Hi", system="You are terse.")),
    ("system blocks", body("Hi", system=[text("You are terse."), text("Answer in French.")])),
    ("image base64 png", body(user(image("image/png", PNG_B64), text("Describe it.")))),
    ("image base64 jpeg", body(user(image("image/jpeg", JPEG_B64), text("What is this?")))),
    ("image base64 gif", body(user(image("image/gif", GIF_B64)))),
    ("image base64 webp", body(user(image("image/webp", WEBP_B64)))),
    (
        "image url",
        body(
            user({"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}})
        ),
    ),
    ("pdf base64", body(user(PDF_BLOCK, text("Summarise this.")))),
    (
        "pdf url with citations",
        body(
            user(
                {
                    "type": "document",
                    "source": {"type": "url", "url": "https://example.com/paper.pdf"},
                    "citations": {"enabled": True},
                    "title": "Paper",
                },
                text("Quote the abstract."),
            )
        ),
    ),
    (
        "plain text document",
        body(
            user(
                {
                    "type": "document",
                    "source": {
                        "type": "text",
                        "media_type": "text/plain",
                        "data": "The sky is blue.",
                    },
                    "context": "A fact sheet",
                },
                text("What colour is the sky?"),
            )
        ),
    ),
    ("single tool", body(_ASK, tools=[WEATHER_TOOL])),
    (
        "multi-turn tool use with tool_result",
        body(
            _ASK,
            assistant(text("Checking."), _CALL),
            user(tool_result("toolu_01", "18C, sunny")),
            tools=[WEATHER_TOOL],
        ),
    ),
    (
        "tool_result with blocks and is_error",
        body(
            _ASK,
            assistant(_CALL),
            user(tool_result("toolu_01", [text("service down")], is_error=True)),
            tools=[WEATHER_TOOL],
        ),
    ),
    (
        "tool_result with an image",
        body(
            _ASK,
            assistant(_CALL),
            user(tool_result("toolu_01", [image("image/png", PNG_B64)])),
            tools=[WEATHER_TOOL],
        ),
    ),
    (
        "parallel tools",
        body(
            "Weather and time in Paris?",
            assistant(_CALL, tool_use("toolu_02", "get_time", {"city": "Paris"})),
            user(tool_result("toolu_01", "18C"), tool_result("toolu_02", "14:05")),
            tools=[WEATHER_TOOL, TIME_TOOL],
        ),
    ),
    ("tool_choice auto", body(_ASK, tools=[WEATHER_TOOL], tool_choice={"type": "auto"})),
    (
        "tool_choice any, no parallel",
        body(
            _ASK,
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
        ),
    ),
    (
        "tool_choice tool",
        body(_ASK, tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"}),
    ),
    ("tool_choice none", body(_ASK, tools=[WEATHER_TOOL], tool_choice={"type": "none"})),
    ("strict tool", body(_ASK, tools=[{**WEATHER_TOOL, "strict": True}])),
    ("thinking enabled", body("Prove it.", thinking=THINKING, max_tokens=4096)),
    ("thinking adaptive", body("Prove it.", thinking={"type": "adaptive"})),
    ("thinking disabled", body("Hi", thinking={"type": "disabled"})),
    (
        "multi-turn thinking with signatures",
        body(
            _ASK,
            assistant(
                {
                    "type": "thinking",
                    "thinking": "I should call the tool.",
                    "signature": "EqQBCgIYAhIM1gbcDa9",
                },
                _CALL,
            ),
            user(tool_result("toolu_01", "18C")),
            tools=[WEATHER_TOOL],
            thinking=THINKING,
            max_tokens=4096,
        ),
    ),
    (
        "redacted thinking",
        body(
            _ASK,
            assistant({"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"}, _CALL),
            user(tool_result("toolu_01", "18C")),
            tools=[WEATHER_TOOL],
            thinking=THINKING,
            max_tokens=4096,
        ),
    ),
    (
        "cache_control on system 5m",
        body("Hi", system=[text("Long instructions.", cache_control=EPHEMERAL_5M)]),
    ),
    (
        "cache_control on system 1h",
        body("Hi", system=[text("Long instructions.", cache_control=EPHEMERAL_1H)]),
    ),
    ("cache_control on tools", body(_ASK, tools=[{**WEATHER_TOOL, "cache_control": EPHEMERAL_1H}])),
    (
        "cache_control on a message",
        body(user(text("A long document.", cache_control={"type": "ephemeral"}))),
    ),
    (
        "cache_control on image and pdf, both ttls",
        body(
            user(
                image("image/png", PNG_B64, cache_control=EPHEMERAL_1H),
                {**PDF_BLOCK, "cache_control": EPHEMERAL_5M},
            )
        ),
    ),
    ("top-level cache_control", body("Hi", cache_control=EPHEMERAL_5M)),
    (
        "output schema",
        body(
            "Extract the name.",
            output_config={
                "format": {
                    "type": "json_schema",
                    "schema": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}},
                        "required": ["name"],
                        "additionalProperties": False,
                    },
                }
            },
        ),
    ),
    ("output effort", body("Hi", output_config={"effort": "low"})),
    ("stop sequences", body("Count to ten.", stop_sequences=["5", "\n\nHuman:"])),
    ("metadata", body("Hi", metadata={"user_id": "user-1234"})),
    ("service tier", body("Hi", service_tier="standard_only")),
    # Not named by this SDK's create(): at the body's top level, as the API takes them.
    ("sampling parameters", body("Hi", temperature=0.7, top_p=0.9, top_k=40)),
    (
        "server tool web search",
        body(
            "News today?",
            tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        ),
    ),
    (
        "search result block",
        body(
            user(
                {
                    "type": "search_result",
                    "source": "https://example.com/doc",
                    "title": "Doc",
                    "content": [text("Paris is the capital of France.")],
                    "citations": {"enabled": True},
                },
                text("What is the capital?"),
            )
        ),
    ),
    ("container id", body("Run it.", container="container_011")),
    ("inference geo and speed", body("Hi", inference_geo="us", speed="standard")),
]

# --------------------------------------------------------------------- malformed


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
_IMG = body(user(text("see"), image("image/png", PNG_B64)))

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
