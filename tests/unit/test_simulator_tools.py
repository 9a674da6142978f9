"""The simulator answers tool calls like the Messages API: inputs valid against the
tool's schema, `tool_choice` deciding which tools are called (in parallel or not),
and an output schema answered with JSON text that validates. Driven by the real
`anthropic` SDK, streamed and not."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import jsonschema
import pytest

from devtools.simulator.schema_values import value_for_schema
from tests.unit.simulator_calls import (
    ASK,
    MODEL,
    TIME,
    WEATHER,
    WEATHER_SCHEMA,
    simulator_and_client,
    streamed,
)

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
