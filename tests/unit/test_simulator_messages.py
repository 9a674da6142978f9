"""The simulator answers like the Messages API beyond plain text: tools, structured
output, thinking, prompt caching, images, documents and citations, and refuses what
the API refuses. Driven by the real `anthropic` SDK, streamed and not."""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import jsonschema
import pytest

from devtools.simulator import RunningSimulator, start_simulator
from devtools.simulator.caching import PromptCache
from devtools.simulator.schema_values import value_for_schema
from devtools.simulator.tokens import PDF_PAGE_TOKENS, Segment, estimate_input_tokens

MODEL = "claude-sim-1"
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]

WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "when": {"type": "string", "format": "date"},
        "at": {
            "type": "object",
            "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}},
            "required": ["lat"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "id": {"$ref": "#/$defs/ident"},
    },
    "required": ["city", "unit", "at", "id"],
    "additionalProperties": False,
    "$defs": {"ident": {"type": "string", "format": "uuid"}},
}
WEATHER: Any = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": WEATHER_SCHEMA,
}
TIME: Any = {
    "name": "get_time",
    "description": "Local time of a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "tz": {"type": "string"}},
        "required": ["city"],
    },
}


@asynccontextmanager
async def simulator_and_client() -> AsyncIterator[
    tuple[RunningSimulator, anthropic.AsyncAnthropic]
]:
    async with start_simulator() as sim:
        client = anthropic.AsyncAnthropic(api_key="x", base_url=sim.base_url, max_retries=0)
        try:
            yield sim, client
        finally:
            await client.close()


async def streamed(
    client: anthropic.AsyncAnthropic, **params: Any
) -> tuple[anthropic.types.Message, list[str]]:
    """The final message of the SDK's stream helper and the event (and delta) types seen."""
    seen: list[str] = []
    async with client.messages.stream(**params) as stream:
        async for event in stream:
            if event.type == "content_block_delta":
                seen.append(event.delta.type)
            elif event.type in ("message_start", "content_block_start", "content_block_stop"):
                seen.append(event.type)
        final = await stream.get_final_message()
    return final, seen


def png(width: int, height: int) -> str:
    """A real (1-bit grey) PNG of the size, base64."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    raw = zlib.compress(row * height)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


def pdf(pages: int) -> str:
    """A PDF with `pages` page objects, base64."""
    objects = [b"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj"]
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages)).encode()
    objects.append(b"2 0 obj << /Type /Pages /Kids [" + kids + b"] /Count %d >> endobj" % pages)
    for i in range(pages):
        objects.append(b"%d 0 obj << /Type /Page /Parent 2 0 R >> endobj" % (3 + i))
    return base64.b64encode(b"%PDF-1.4\n" + b"\n".join(objects) + b"\n%%EOF").decode()


# ------------------------------------------------------------------------ tools


@pytest.mark.asyncio
async def test_a_tool_call_has_an_input_valid_against_the_tools_schema() -> None:
    params: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 1000,
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": {"type": "any"},
    }
    async with simulator_and_client() as (_, client):
        whole = await client.messages.create(**params)
        final, seen = await streamed(client, **params)
    assert whole.stop_reason == "tool_use"
    assert [b.type for b in whole.content] == ["tool_use"]
    call = whole.content[0]
    assert call.type == "tool_use"
    assert call.name == "get_weather"
    assert call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER_SCHEMA, format_checker=jsonschema.FormatChecker())
    assert set(call.input) == set(WEATHER_SCHEMA["properties"])
    # Streamed: the same block, built by the SDK from input_json_delta chunks.
    assert final.stop_reason == "tool_use"
    assert [b.to_dict() for b in final.content] == [b.to_dict() for b in whole.content]
    assert seen[:2] == ["message_start", "content_block_start"]
    assert seen.count("input_json_delta") >= 2
    assert set(seen) == {
        "message_start",
        "content_block_start",
        "input_json_delta",
        "content_block_stop",
    }
    assert whole.usage.output_tokens == final.usage.output_tokens > 0


@pytest.mark.asyncio
async def test_tool_choice_decides_which_tools_are_called() -> None:
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 1000, "messages": ASK}
    async with simulator_and_client() as (_, client):
        auto = await client.messages.create(**base, tools=[WEATHER])
        parallel = await client.messages.create(**base, tools=[WEATHER, TIME])
        single = await client.messages.create(
            **base,
            tools=[WEATHER, TIME],
            tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        )
        named = await client.messages.create(
            **base, tools=[WEATHER, TIME], tool_choice={"type": "tool", "name": "get_time"}
        )
        none = await client.messages.create(**base, tools=[WEATHER], tool_choice={"type": "none"})
        call = auto.content[0]
        assert call.type == "tool_use"
        answered = await client.messages.create(
            **{
                **base,
                "messages": [
                    *ASK,
                    {"role": "assistant", "content": [call.to_dict()]},
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}
                        ],
                    },
                ],
            },
            tools=[WEATHER],
        )
    assert auto.stop_reason == "tool_use" and [b.type for b in auto.content] == ["tool_use"]
    # Parallel use allowed, two tools: both called at once; disabled: one.
    assert parallel.stop_reason == "tool_use"
    names = sorted(b.name for b in parallel.content if b.type == "tool_use")
    assert names == ["get_time", "get_weather"]
    assert len({b.id for b in parallel.content if b.type == "tool_use"}) == 2
    assert [b.type for b in single.content] == ["tool_use"]
    assert [b.name for b in named.content if b.type == "tool_use"] == ["get_time"]
    jsonschema.validate(named.content[0].to_dict()["input"], TIME["input_schema"])
    # none, and auto once the tool has answered: text.
    for msg in (none, answered):
        assert msg.stop_reason == "end_turn"
        assert [b.type for b in msg.content] == ["text"]


def test_schema_values_are_deterministic_and_valid_for_varied_schemas() -> None:
    schemas: list[dict[str, Any]] = [
        WEATHER_SCHEMA,
        {
            "type": "object",
            "properties": {"n": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
        },
        {"type": "object", "properties": {"k": {"type": "integer", "multipleOf": 5, "minimum": 3}}},
        {"type": "object", "properties": {"v": {"const": "fixed"}, "b": {"type": "boolean"}}},
        {
            "type": "object",
            "properties": {"s": {"type": "string", "minLength": 30, "maxLength": 31}},
        },
        {
            "type": "object",
            "allOf": [
                {"properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "array", "items": {"type": "integer"}}}},
            ],
        },
        {
            "type": "object",
            "properties": {"tree": {"$ref": "#/definitions/node"}},
            "definitions": {
                "node": {
                    "type": "object",
                    "properties": {
                        "kids": {"type": "array", "items": {"$ref": "#/definitions/node"}}
                    },
                }
            },
        },
        {"type": "object", "properties": {"x": {"type": ["null", "integer"]}}, "required": ["x"]},
        {"type": "object", "properties": {"e": {"type": "string", "format": "email"}}},
    ]
    for seed, schema in enumerate(schemas):
        value = value_for_schema(schema, seed)
        jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
        assert value == value_for_schema(schema, seed)


# ------------------------------------------------------------ structured output


@pytest.mark.asyncio
async def test_an_output_schema_gets_json_text_that_validates() -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0},
            "emails": {"type": "array", "items": {"type": "string", "format": "email"}},
        },
        "required": ["name", "age", "emails"],
        "additionalProperties": False,
    }
    params: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 500,
        "messages": [{"role": "user", "content": "Extract the person."}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    }
    async with simulator_and_client() as (_, client):
        whole = await client.messages.create(**params)
        final, seen = await streamed(client, **params)
    for msg in (whole, final):
        assert msg.stop_reason == "end_turn"
        assert [b.type for b in msg.content] == ["text"]
        block = msg.content[0]
        assert isinstance(block, anthropic.types.TextBlock)
        jsonschema.validate(json.loads(block.text), schema)
    assert final.content[0].to_dict()["text"] == whole.content[0].to_dict()["text"]
    assert "text_delta" in seen


# --------------------------------------------------------------------- thinking


@pytest.mark.asyncio
async def test_thinking_comes_first_with_a_signature_then_the_answer() -> None:
    params: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 2048,
        "messages": ASK,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    async with simulator_and_client() as (_, client):
        whole = await client.messages.create(**params)
        final, seen = await streamed(client, **params)
        # The thinking block goes back in the next turn, with a redacted one.
        thought = whole.content[0]
        follow_up = await client.messages.create(
            **{
                **params,
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "content": [
                            thought.to_dict(),
                            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
                            {"type": "text", "text": "Sunny."},
                        ],
                    },
                    {"role": "user", "content": "And tomorrow?"},
                ],
            }
        )
    for msg in (whole, final):
        assert [b.type for b in msg.content] == ["thinking", "text"]
        block = msg.content[0]
        assert isinstance(block, anthropic.types.ThinkingBlock)
        assert block.thinking.strip() and block.signature
        assert msg.stop_reason == "end_turn"
    assert final.content[0].to_dict() == whole.content[0].to_dict()
    # Thinking deltas, then one signature delta, then the text.
    thinking_at = [i for i, t in enumerate(seen) if t == "thinking_delta"]
    assert thinking_at and seen.count("signature_delta") == 1
    assert max(thinking_at) < seen.index("signature_delta") < seen.index("text_delta")
    # Output tokens count the thinking too.
    assert whole.usage.output_tokens == 2 * 24
    assert [b.type for b in follow_up.content] == ["thinking", "text"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("thinking", "max_tokens", "message"),
    [
        ({"type": "enabled", "budget_tokens": 1023}, 4000, "thinking.enabled.budget_tokens"),
        ({"type": "enabled", "budget_tokens": 2000}, 2000, "`max_tokens` must be greater"),
        ({"type": "enabled"}, 4000, "thinking.enabled.budget_tokens: Field required"),
        ({"type": "sometimes"}, 4000, "thinking: Input tag"),
    ],
)
async def test_a_bad_thinking_budget_is_a_400(thinking: Any, max_tokens: int, message: str) -> None:
    async with simulator_and_client() as (sim, client):
        with pytest.raises(anthropic.BadRequestError) as info:
            await client.messages.create(
                model=MODEL, max_tokens=max_tokens, messages=ASK, thinking=thinking
            )
    assert_invalid_request(info.value, message)
    assert sim.stats.invalid_requests == 1 and sim.stats.completed == 0


# ---------------------------------------------------------------------- caching

LONG_SYSTEM = "You answer questions about the weather. " * 120  # 4,800 chars: 1,200 tokens


@pytest.mark.asyncio
@pytest.mark.parametrize("ttl", ["5m", "1h"])
async def test_a_cache_breakpoint_writes_the_prefix_then_a_repeat_reads_it(ttl: str) -> None:
    params: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 100,
        "system": [
            {
                "type": "text",
                "text": LONG_SYSTEM,
                "cache_control": {"type": "ephemeral", "ttl": ttl},
            }
        ],
        "messages": ASK,
    }
    async with simulator_and_client() as (_, client):
        first = await client.messages.create(**params)
        second, _ = await streamed(client, **params)
        other_model = await client.messages.create(**{**params, "model": "claude-sim-2"})
    prefix = 1200
    question = 8  # ceil((4800 + 29) / 4) - 1200
    assert first.usage.cache_creation_input_tokens == prefix
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.input_tokens == question
    assert first.usage.cache_creation is not None
    written = {
        "5m": first.usage.cache_creation.ephemeral_5m_input_tokens,
        "1h": first.usage.cache_creation.ephemeral_1h_input_tokens,
    }
    assert written == {ttl: prefix, ("1h" if ttl == "5m" else "5m"): 0}
    assert second.usage.cache_read_input_tokens == prefix
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.input_tokens == question
    # Caches are per model.
    assert other_model.usage.cache_creation_input_tokens == prefix


@pytest.mark.asyncio
async def test_a_growing_conversation_reads_the_earlier_prefix_and_writes_the_rest() -> None:
    turn1: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}
            ],
        }
    ]
    turn2: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": LONG_SYSTEM}]},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "x" * 400},
    ]
    async with simulator_and_client() as (_, client):
        first = await client.messages.create(model=MODEL, max_tokens=10, messages=turn1)
        # Automatic caching (top-level cache_control) puts the breakpoint on the last block.
        second = await client.messages.create(
            model=MODEL, max_tokens=10, messages=turn2, cache_control={"type": "ephemeral"}
        )
        short = await client.messages.create(
            model=MODEL,
            max_tokens=10,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "short", "cache_control": {"type": "ephemeral"}}
                    ],
                }
            ],
        )
    assert first.usage.cache_creation_input_tokens == 1200
    assert second.usage.cache_read_input_tokens == 1200
    # "Noted." and 400 x: ceil((4800 + 6 + 400) / 4) - 1200
    assert second.usage.cache_creation_input_tokens == 1302 - 1200
    assert second.usage.input_tokens == 0
    # Below the minimum cacheable length (1024 tokens) nothing is cached.
    assert short.usage.cache_creation_input_tokens == 0
    assert short.usage.cache_read_input_tokens == 0
    assert short.usage.input_tokens == 2


def test_cache_entries_expire_with_their_ttl_and_memory_is_bounded() -> None:
    now = [0.0]
    cache = PromptCache(max_entries=3, clock=lambda: now[0])

    def units(key: bytes, ttl: str) -> list[Segment]:
        return [Segment(key, 8000, 0, ttl)]

    assert cache.apply("m", units(b"a", "5m")).write_5m == 2000
    now[0] = 299.0
    assert cache.apply("m", units(b"a", "5m")).read == 2000  # a read restarts the TTL
    now[0] = 598.0
    assert cache.apply("m", units(b"a", "5m")).read == 2000
    now[0] = 898.1
    assert cache.apply("m", units(b"a", "5m")).write_5m == 2000  # expired: written again
    assert cache.apply("m", units(b"h", "1h")).write_1h == 2000
    now[0] += 3000
    assert cache.apply("m", units(b"h", "1h")).read == 2000
    for key in (b"1", b"2", b"3", b"4"):
        cache.apply("m", units(key, "5m"))
    assert len(cache) == 3
    assert cache.apply("m", units(b"4", "5m")).read == 2000
    assert cache.apply("m", units(b"1", "5m")).read == 0  # the oldest went first


# -------------------------------------------------------- images and documents


@pytest.mark.asyncio
async def test_images_and_documents_are_counted_as_input_tokens() -> None:
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": png(1000, 750)},
    }
    big = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": png(3136, 1568)},
    }
    by_url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}
    document = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": pdf(3)},
    }
    text_doc = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "y" * 400},
    }
    cases: list[tuple[dict[str, Any], int]] = [
        (image, 1000),  # 1000 * 750 / 750
        (big, 1640),  # downscaled to 1568 x 784
        (by_url, 1600),
        (document, 3 * PDF_PAGE_TOKENS),
        (text_doc, 100),
    ]
    async with simulator_and_client() as (_, client):
        for block, tokens in cases:
            messages: list[Any] = [
                {"role": "user", "content": [block, {"type": "text", "text": "Describe it."}]}
            ]
            msg = await client.messages.create(model=MODEL, max_tokens=10, messages=messages)
            counted = await client.messages.count_tokens(model=MODEL, messages=messages)
            assert msg.usage.input_tokens == tokens + 3, block["source"]["type"]  # + ceil(12 / 4)
            assert counted.input_tokens == msg.usage.input_tokens
        # Tools count too (their definitions as JSON); a text-only request as always.
        with_tool = await client.messages.count_tokens(model=MODEL, messages=ASK, tools=[WEATHER])
        plain = await client.messages.count_tokens(model=MODEL, messages=ASK)
    assert plain.input_tokens == estimate_input_tokens(None, ASK) == 8
    tool_chars = len(json.dumps(WEATHER, separators=(",", ":")))
    assert with_tool.input_tokens == math.ceil((len(ASK[0]["content"]) + tool_chars) / 4)


@pytest.mark.asyncio
async def test_a_document_with_citations_gets_a_cited_answer() -> None:
    doc_text = "The grass is green. The sky is blue."
    messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": doc_text},
                    "title": "Colours",
                    "citations": {"enabled": True},
                },
                {"type": "text", "text": "What colour is the grass?"},
            ],
        }
    ]
    params: dict[str, Any] = {"model": MODEL, "max_tokens": 100, "messages": messages}
    async with simulator_and_client() as (_, client):
        whole = await client.messages.create(**params)
        final, seen = await streamed(client, **params)
    for msg in (whole, final):
        block = msg.content[0]
        assert isinstance(block, anthropic.types.TextBlock)
        assert block.citations is not None and len(block.citations) == 1
        citation = block.citations[0]
        assert isinstance(citation, anthropic.types.CitationCharLocation)
        assert citation.cited_text == doc_text
        assert citation.document_index == 0 and citation.document_title == "Colours"
    assert seen.count("citations_delta") == 1
    assert final.content[0].to_dict() == whole.content[0].to_dict()


# --------------------------------------------------------------------- refusals


def assert_invalid_request(exc: anthropic.BadRequestError, message: str) -> None:
    assert exc.status_code == 400
    body = exc.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["request_id"] == exc.response.headers["request-id"]
    assert body["error"]["message"].startswith(message), body["error"]["message"]


def _user(*blocks: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


_USE = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
_RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}
_CACHE = {"type": "ephemeral"}
_CACHE_1H = {"type": "ephemeral", "ttl": "1h"}

REFUSED: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown block type",
        {"messages": [_user({"type": "video", "url": "x"})]},
        "messages.0.content.0: Input tag 'video'",
    ),
    (
        "tool_use in a user turn",
        {"messages": [_user(_USE)], "tools": [WEATHER]},
        "messages.0.content.0: Input tag 'tool_use'",
    ),
    (
        "tool_result answering nothing",
        {"messages": [_user(_RESULT)], "tools": [WEATHER]},
        "messages.0.content.0: unexpected `tool_use_id`",
    ),
    (
        "tool_result answering another id",
        {
            "messages": [
                *ASK,
                {"role": "assistant", "content": [_USE]},
                _user({**_RESULT, "tool_use_id": "toolu_2"}),
            ],
            "tools": [WEATHER],
        },
        "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_2",
    ),
    (
        "tool_use left unanswered",
        {
            "messages": [
                *ASK,
                {"role": "assistant", "content": [_USE]},
                _user({"type": "text", "text": "hm"}),
            ],
            "tools": [WEATHER],
        },
        "messages.1: `tool_use` ids were found without `tool_result` blocks",
    ),
    (
        "tool blocks without tools",
        {"messages": [*ASK, {"role": "assistant", "content": [_USE]}, _user(_RESULT)]},
        "Requests which include `tool_use` or `tool_result` blocks must define tools.",
    ),
    (
        "unknown tool in tool_choice",
        {"messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
        "tool_choice.tool.name: Tool 'nope' not found",
    ),
    (
        "tool_choice any without tools",
        {"messages": ASK, "tool_choice": {"type": "any"}},
        "tool_choice:",
    ),
    (
        "tool without input_schema",
        {"messages": ASK, "tools": [{"name": "t"}]},
        "tools.0.custom.input_schema: Field required",
    ),
    (
        "duplicate tool names",
        {"messages": ASK, "tools": [WEATHER, WEATHER]},
        "tools: Tool names must be unique.",
    ),
    (
        "forced tool with thinking",
        {
            "messages": ASK,
            "tools": [WEATHER],
            "tool_choice": {"type": "any"},
            "thinking": {"type": "enabled", "budget_tokens": 1024},
        },
        "Thinking may not be enabled when tool_choice forces tool use.",
    ),
    (
        "image with an unknown source type",
        {"messages": [_user({"type": "image", "source": {"type": "path", "path": "/a.png"}})]},
        "messages.0.content.0.source: Input tag 'path'",
    ),
    (
        "image with a wrong media type",
        {
            "messages": [
                _user(
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/jpeg", "data": png(2, 2)},
                    }
                )
            ]
        },
        "messages.0.content.0.source.data: Image does not match the provided media type image/jpeg",
    ),
    (
        "image with bad base64",
        {
            "messages": [
                _user(
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "!!"},
                    }
                )
            ]
        },
        "messages.0.content.0.source.data",
    ),
    (
        "pdf that is not a PDF",
        {
            "messages": [
                _user(
                    {
                        "type": "document",
                        "source": {
                            "type": "base64",
                            "media_type": "application/pdf",
                            "data": png(2, 2),
                        },
                    }
                )
            ]
        },
        "messages.0.content.0.source.data: The PDF specified was not valid.",
    ),
    (
        "thinking block without signature",
        {
            "messages": [
                *ASK,
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"}]},
            ]
        },
        "messages.1.content.0.signature: Field required",
    ),
    (
        "five cache breakpoints",
        {
            "messages": [
                _user(
                    *({"type": "text", "text": str(i), "cache_control": _CACHE} for i in range(5))
                )
            ],
        },
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
    ),
    (
        "a 1h breakpoint after a 5m one",
        {
            "system": [{"type": "text", "text": "s", "cache_control": _CACHE}],
            "messages": [_user({"type": "text", "text": "m", "cache_control": _CACHE_1H})],
        },
        "messages.0.content.0.cache_control: a ttl='1h' cache_control block must not come after",
    ),
    (
        "an unknown TTL",
        {
            "messages": [
                _user(
                    {
                        "type": "text",
                        "text": "m",
                        "cache_control": {"type": "ephemeral", "ttl": "2h"},
                    }
                )
            ]
        },
        "messages.0.content.0.cache_control.ttl",
    ),
    (
        "an output format that is not json_schema",
        {"messages": ASK, "output_config": {"format": {"type": "xml"}}},
        "output_config.format.type",
    ),
    (
        "a system block that is not text",
        {"messages": ASK, "system": [{"type": "image", "source": {}}]},
        "system.0.type: Input should be 'text'",
    ),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("case", "fields", "message"), REFUSED, ids=[c[0] for c in REFUSED])
async def test_what_the_api_refuses_is_a_400_invalid_request_error(
    case: str, fields: dict[str, Any], message: str
) -> None:
    async with simulator_and_client() as (sim, client):
        with pytest.raises(anthropic.BadRequestError) as info:
            await client.messages.create(model=MODEL, max_tokens=2000, **fields)
        with pytest.raises(anthropic.BadRequestError):
            async with client.messages.stream(model=MODEL, max_tokens=2000, **fields) as stream:
                await stream.get_final_message()
    assert_invalid_request(info.value, message)
    # Refused before anything was generated or cached.
    assert sim.stats.invalid_requests == 2
    assert sim.stats.completed == 0 and sim.stats.tokens_emitted == 0
    assert len(sim.simulator.cache) == 0


# ------------------------------------------------------------------ everything


@pytest.mark.asyncio
async def test_every_delta_kind_reaches_the_sdk_stream_helper() -> None:
    """Thinking, text with a citation, and tool calls in one run of streams."""
    doc = {
        "type": "document",
        "source": {"type": "content", "content": [{"type": "text", "text": "Rain all week."}]},
        "citations": {"enabled": True},
    }
    async with simulator_and_client() as (_, client):
        _, cited = await streamed(
            client,
            model=MODEL,
            max_tokens=2000,
            messages=[_user(doc, {"type": "text", "text": "Weather?"})],
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
        tool_final, tools = await streamed(
            client,
            model=MODEL,
            max_tokens=2000,
            messages=ASK,
            tools=[WEATHER],
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    assert {"thinking_delta", "signature_delta", "text_delta", "citations_delta"} <= set(cited)
    assert {"thinking_delta", "signature_delta", "input_json_delta"} <= set(tools)
    assert [b.type for b in tool_final.content] == ["thinking", "tool_use"]
    assert tool_final.stop_reason == "tool_use"
