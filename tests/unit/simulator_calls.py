"""What the tests of the simulator's Messages API answers share: the model, a question,
two tools, a simulator with the real `anthropic` SDK's client on it, the SDK's stream
helper, real PNG images, and the shape of the API's 400 answer.

The tests: `test_simulator_tools.py` (tools and structured output),
`test_simulator_thinking.py`, `test_simulator_prompt_caching.py`,
`test_simulator_images_and_documents.py` and `test_simulator_refusals.py`.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic

from devtools.simulator import RunningSimulator, start_simulator

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
