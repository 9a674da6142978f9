"""Tests of the Messages API simulator, driven by the real `anthropic` SDK."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import anthropic
import pytest

from conveyor.llm.provider import classify
from devtools.simulator import RunningSimulator, SimulatorConfig, start_simulator
from devtools.simulator.__main__ import parse_config
from devtools.simulator.app import plan_generation

MODEL = "claude-sim-1"
MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Say something."}]


@asynccontextmanager
async def simulator_and_client(
    config: SimulatorConfig | None = None,
) -> AsyncIterator[tuple[RunningSimulator, anthropic.AsyncAnthropic]]:
    async with start_simulator(config) as sim:
        client = anthropic.AsyncAnthropic(api_key="sim", base_url=sim.base_url, max_retries=0)
        try:
            yield sim, client
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_create_returns_text_and_usage() -> None:
    async with simulator_and_client() as (sim, client):
        msg = await client.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=MESSAGES,
            system="Be brief.",
            metadata={"user_id": "u1"},
            extra_body={"temperature": 0.5},
        )
        again = await client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    assert msg.id.startswith("msg_sim_")
    assert msg.model == MODEL
    assert msg.role == "assistant"
    assert msg.content[0].type == "text"
    text = msg.content[0].text
    assert len(text.split()) == 24
    assert msg.stop_reason == "end_turn"
    assert msg.stop_sequence is None
    assert msg.usage.output_tokens == 24
    # ceil(len("Be brief.") + len("Say something.")) / 4)
    assert msg.usage.input_tokens == 6
    assert msg.usage.cache_read_input_tokens == 0
    # Deterministic for the same messages.
    assert again.content[0].type == "text"
    assert again.content[0].text == text
    assert sim.stats.requests == 2
    assert sim.stats.tokens_emitted == 48


@pytest.mark.asyncio
async def test_stream_deltas_add_up_to_final_message() -> None:
    async with simulator_and_client() as (sim, client):
        async with client.messages.stream(
            model=MODEL, max_tokens=100, messages=MESSAGES, extra_headers={"x-sim-tokens": "10"}
        ) as stream:
            deltas = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        # Same messages, streamed or not: same text.
        whole = await client.messages.create(
            model=MODEL, max_tokens=100, messages=MESSAGES, extra_headers={"x-sim-tokens": "10"}
        )
    assert len(deltas) == 10
    assert final.content[0].type == "text"
    assert "".join(deltas) == final.content[0].text
    assert whole.content[0].type == "text"
    assert whole.content[0].text == final.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 10
    assert final.usage.input_tokens >= 1
    assert sim.stats.streams == 1
    assert sim.stats.requests == 2
    assert sim.stats.completed == 2


@pytest.mark.asyncio
async def test_max_tokens_truncates() -> None:
    async with simulator_and_client() as (_, client):
        msg = await client.messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
        async with client.messages.stream(model=MODEL, max_tokens=5, messages=MESSAGES) as stream:
            final = await stream.get_final_message()
    for m in (msg, final):
        assert m.stop_reason == "max_tokens"
        assert m.usage.output_tokens == 5
        assert m.content[0].type == "text"
        assert len(m.content[0].text.split()) == 5


@pytest.mark.asyncio
async def test_stop_sequence() -> None:
    gen = plan_generation(MESSAGES, 100, 24, None)
    third = gen.deltas[2].strip()  # a word the text is known to contain
    cut = gen.text.index(third)
    async with simulator_and_client() as (_, client):
        msg = await client.messages.create(
            model=MODEL, max_tokens=100, messages=MESSAGES, stop_sequences=["\n\nHuman:", third]
        )
        async with client.messages.stream(
            model=MODEL, max_tokens=100, messages=MESSAGES, stop_sequences=[third]
        ) as stream:
            final = await stream.get_final_message()
    for m in (msg, final):
        assert m.stop_reason == "stop_sequence"
        assert m.stop_sequence == third
        assert m.content[0].type == "text"
        assert m.content[0].text == gen.text[:cut]
        assert 1 <= m.usage.output_tokens <= 3


@pytest.mark.asyncio
async def test_rate_limit_error_with_retry_after() -> None:
    async with simulator_and_client(SimulatorConfig(port=0, retry_after_s=7)) as (sim, client):
        with pytest.raises(anthropic.RateLimitError) as info:
            await client.messages.create(
                model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers={"x-sim-fail": "429"}
            )
        # Also before a stream starts.
        with pytest.raises(anthropic.RateLimitError):
            async with client.messages.stream(
                model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers={"x-sim-fail": "429"}
            ) as stream:
                await stream.get_final_message()
    exc = info.value
    assert exc.status_code == 429
    assert exc.response.headers["retry-after"] == "7"
    assert exc.response.headers["request-id"].startswith("req_sim_")
    assert isinstance(exc.body, dict)
    assert exc.body["error"]["type"] == "rate_limit_error"
    assert sim.stats.failures_injected_by_kind == {"429": 2}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kind", "exc_type", "error_type"),
    [
        ("500", anthropic.InternalServerError, "api_error"),
        ("529", anthropic.APIStatusError, "overloaded_error"),
        ("400", anthropic.BadRequestError, "invalid_request_error"),
        ("401", anthropic.AuthenticationError, "authentication_error"),
    ],
)
async def test_injected_http_errors(
    kind: str, exc_type: type[anthropic.APIStatusError], error_type: str
) -> None:
    async with simulator_and_client() as (_, client):
        with pytest.raises(exc_type) as info:
            await client.messages.create(
                model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers={"x-sim-fail": kind}
            )
    assert info.value.status_code == int(kind)
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == error_type
    if kind == "529":
        assert info.value.response.headers["retry-after"] == "1"


@pytest.mark.asyncio
async def test_drop_mid_stream() -> None:
    """A stream dropped half way fails the call with an error the worker retries.

    Which exception the SDK raises for it changes between releases (2.12 let the
    transport's error through; 2.17 wraps it in APIConnectionError), so this checks
    the behaviour the worker relies on: the call fails, and `classify` calls it transient.
    """
    async with simulator_and_client() as (sim, client):
        deltas: list[str] = []
        with pytest.raises(Exception) as streamed:
            async with client.messages.stream(
                model=MODEL, max_tokens=100, messages=MESSAGES, extra_headers={"x-sim-fail": "drop"}
            ) as stream:
                async for text in stream.text_stream:
                    deltas.append(text)
        # Half the answer came before the drop.
        assert len(deltas) == 12
        # Dropped before the answer of a whole message.
        with pytest.raises(Exception) as created:
            await client.messages.create(
                model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers={"x-sim-fail": "drop"}
            )
        # The simulator still serves afterwards.
        ok = await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    for failure in (streamed.value, created.value):
        error = classify(failure)
        assert (error.code, error.retryable) == ("connection_error", True), failure
    assert ok.stop_reason == "max_tokens"
    assert sim.stats.failures_injected_by_kind == {"drop": 2}


@pytest.mark.asyncio
async def test_error_event_mid_stream() -> None:
    async with simulator_and_client() as (sim, client):
        deltas: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as info:
            async with client.messages.stream(
                model=MODEL,
                max_tokens=100,
                messages=MESSAGES,
                extra_headers={"x-sim-fail": "error-event", "x-sim-tokens": "6"},
            ) as stream:
                async for text in stream.text_stream:
                    deltas.append(text)
    assert len(deltas) == 3
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "overloaded_error"
    assert sim.stats.failures_injected_by_kind == {"error-event": 1}
    assert sim.stats.tokens_emitted == 3


@pytest.mark.asyncio
async def test_latency_pace_and_timestamps() -> None:
    config = SimulatorConfig(port=0, latency_ms=100, tokens_per_second=200, output_tokens=5)
    async with start_simulator(config) as sim, aiohttp.ClientSession() as http:
        body = {"model": MODEL, "max_tokens": 50, "messages": MESSAGES, "stream": True}
        start = time.monotonic()
        async with http.post(
            f"{sim.base_url}/v1/messages", json=body, headers={"x-sim-timestamps": "1"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert "anthropic-ratelimit-requests-limit" in resp.headers
            raw = (await resp.read()).decode()
        elapsed = time.monotonic() - start
    assert elapsed >= 0.1 + 4 / 200 - 0.01
    events = [line.split(": ", 1)[1] for line in raw.splitlines() if line.startswith("event:")]
    assert events == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    stamps = [int(line[4:]) for line in raw.splitlines() if line.startswith(": t=")]
    assert len(stamps) == 5
    assert stamps == sorted(stamps)
    assert stamps[-1] - stamps[0] >= 4 * 5_000_000 * 0.8  # 5 ms apart, give or take


@pytest.mark.asyncio
async def test_validation_errors() -> None:
    async with start_simulator() as sim, aiohttp.ClientSession() as http:
        url = f"{sim.base_url}/v1/messages"
        cases = [
            ({"max_tokens": 5, "messages": MESSAGES}, "model"),
            ({"model": MODEL, "messages": MESSAGES}, "max_tokens"),
            ({"model": MODEL, "max_tokens": 5}, "messages"),
            ({"model": MODEL, "max_tokens": 5, "messages": []}, "messages"),
            (
                {"model": MODEL, "max_tokens": 5, "messages": MESSAGES, "metadata": {"x": 1}},
                "metadata.x",
            ),
        ]
        for body, field in cases:
            async with http.post(url, json=body) as resp:
                assert resp.status == 400
                data = await resp.json()
                assert data["type"] == "error"
                assert data["error"]["type"] == "invalid_request_error"
                assert data["error"]["message"].startswith(field)
        async with http.post(url, data=b"{not json") as resp:
            assert resp.status == 400
        async with http.get(f"{sim.base_url}/healthz") as resp:
            assert resp.status == 200
            assert await resp.text() == "ok"
    assert sim.stats.invalid_requests == 6


@pytest.mark.asyncio
async def test_stats_and_control() -> None:
    async with simulator_and_client() as (sim, client), aiohttp.ClientSession() as http:
        await client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
        async with http.get(f"{sim.base_url}/stats") as resp:
            stats = await resp.json()
        assert stats["requests"] == 1
        assert stats["streams"] == 0
        assert stats["tokens_emitted"] == 24
        assert stats["failures_injected_by_kind"] == {}

        async with http.post(
            f"{sim.base_url}/control", json={"output_tokens": 3, "rate_429": 1.0}
        ) as resp:
            assert resp.status == 200
            config = await resp.json()
        assert config["output_tokens"] == 3
        assert config["rate_429"] == 1.0
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)

        sim.update(rate_429=0.0)
        msg = await client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)
        assert msg.usage.output_tokens == 3

        async with http.post(f"{sim.base_url}/control", json={"port": 1}) as resp:
            assert resp.status == 400
        async with http.post(f"{sim.base_url}/control", json={"rate_500": 2}) as resp:
            assert resp.status == 400
        async with http.post(f"{sim.base_url}/control", json={"reset_stats": True}) as resp:
            assert resp.status == 200
        async with http.get(f"{sim.base_url}/stats") as resp:
            assert (await resp.json())["requests"] == 0


@pytest.mark.asyncio
async def test_failure_rates_are_seeded() -> None:
    async def outcomes() -> list[str]:
        config = SimulatorConfig(port=0, rate_429=0.3, rate_500=0.3, seed=42)
        results: list[str] = []
        async with simulator_and_client(config) as (_, client):
            for _ in range(20):
                try:
                    await client.messages.create(model=MODEL, max_tokens=5, messages=MESSAGES)
                    results.append("ok")
                except anthropic.APIStatusError as exc:
                    results.append(str(exc.status_code))
        return results

    first = await outcomes()
    assert first == await outcomes()
    assert set(first) == {"ok", "429", "500"}


def test_config_from_env_and_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_PORT", "9999")
    monkeypatch.setenv("SIM_RATE_529", "0.25")
    monkeypatch.setenv("SIM_SEED", "7")
    config, _ = parse_config(["--latency-ms", "12", "--tps", "50", "--rate-429", "0.1"])
    assert config.port == 9999
    assert config.rate_529 == 0.25
    assert config.seed == 7
    assert config.latency_ms == 12
    assert config.tokens_per_second == 50
    assert config.rate_429 == 0.1
    assert config.access_log is False
    with pytest.raises(ValueError):
        SimulatorConfig(rate_429=0.8, rate_500=0.8)
    monkeypatch.setenv("SIM_OUTPUT_TOKENS", "many")
    with pytest.raises(ValueError, match="SIM_OUTPUT_TOKENS"):
        SimulatorConfig.from_env()
