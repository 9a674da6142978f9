"""The simulator caches prompts like the Messages API: a breakpoint writes the prefix
(5-minute or 1-hour TTL, per model) and a repeat reads it, a growing conversation
reads the earlier prefix, short prefixes are not cached, entries expire and memory
is bounded. Driven by the real `anthropic` SDK, streamed and not."""

from __future__ import annotations

from typing import Any

import pytest

from devtools.simulator.caching import PromptCache
from devtools.simulator.tokens import Segment
from tests.unit.simulator_calls import (
    ASK,
    MODEL,
    simulator_and_client,
    streamed,
)

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
