"""The simulator thinks like the Messages API: a signed thinking block before the answer,
taken back in the next turn, a budget the API would refuse refused, and every kind of
delta (thinking, signature, text, citations, tool input) reaching the SDK's stream
helper. Driven by the real `anthropic` SDK, streamed and not."""

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
    simulator_and_client,
    streamed,
)


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
