"""The simulator refuses what the Messages API refuses (bad blocks, tool ids that do not
pair up, bad tool choices, images and PDFs that are not what they say, cache
breakpoints out of bounds, ...) with a 400 `invalid_request_error` naming the field,
before anything is generated or cached. Driven by the real `anthropic` SDK, streamed
and not."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.unit.simulator_calls import (
    ASK,
    MODEL,
    WEATHER,
    _user,
    assert_invalid_request,
    png,
    simulator_and_client,
)

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
