"""The rules behind tenants and limits: keys and bearer tokens, tenant names, the
provider's rate-limit headers, the input-token estimate, and the simulator's
enforcement of limits through the real `anthropic` SDK."""

from __future__ import annotations

import anthropic
import pytest
from google.rpc import error_details_pb2, status_pb2

from conveyor.contract.validation import validate_submit
from conveyor.core.config import Settings
from conveyor.core.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from conveyor.llm.provider import classify
from conveyor.server.auth import (
    KEY_PREFIX,
    bearer_key,
    check_tenant_name,
    generate_key,
    hash_key,
)
from conveyor.v1 import jobs_pb2
from devtools.simulator import SimulatorConfig, start_simulator
from devtools.simulator.app import estimate_input_tokens as simulator_estimate
from services.worker.limiter import estimate_input_tokens, exhausted, parse_limits


def test_keys_are_random_and_stored_as_their_sha256() -> None:
    key = generate_key()
    assert key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 43
    assert key != generate_key()
    assert hash_key(key) == hash_key(key) and len(hash_key(key)) == 64 and key not in hash_key(key)


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ([("authorization", "Bearer cvk_abc")], "cvk_abc"),
        ([("authorization", "bearer   cvk_abc ")], "cvk_abc"),
        ([("x-other", "1")], None),
        ([], None),
    ],
)
def test_the_key_is_read_from_a_bearer_authorization(
    metadata: list[tuple[str, str]], key: str | None
) -> None:
    assert bearer_key(metadata) == key


@pytest.mark.parametrize("value", ["Basic Zm9v", "Bearer", "cvk_abc"])
def test_an_authorization_that_is_not_bearer_is_refused(value: str) -> None:
    with pytest.raises(Unauthenticated):
        bearer_key([("authorization", value)])


@pytest.mark.parametrize("name", ["acme", "team-b", "t_1", "0"])
def test_tenant_names_fit_queue_names_and_routing_keys(name: str) -> None:
    assert check_tenant_name(name) == name


@pytest.mark.parametrize("name", ["", "Acme", "a.b", "a b", "-a", "x" * 64, "a*"])
def test_tenant_names_that_would_break_routing_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_tenant_name(name)


def test_the_providers_rate_limit_headers_are_read_per_dimension() -> None:
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-input-tokens-limit": "30000",
        "anthropic-ratelimit-input-tokens-remaining": "29000",
        "Anthropic-RateLimit-Output-Tokens-Limit": "8000",
        "anthropic-ratelimit-tokens-limit": "38000",
    }
    assert parse_limits(headers) == {
        "requests": (50.0, 0.0),
        "input_tokens": (30000.0, 29000.0),
        "output_tokens": (8000.0, None),
    }
    assert exhausted(headers) == ["requests"]
    assert parse_limits({"anthropic-ratelimit-requests-limit": "lots"}) == {}


def test_the_input_estimate_is_the_simulators_count() -> None:
    messages = [{"role": "user", "content": "x" * 401}, {"role": "assistant", "content": "y" * 3}]
    body = {"system": "Be brief.", "messages": messages}
    assert estimate_input_tokens(body) == 104
    assert estimate_input_tokens(body) == simulator_estimate("Be brief.", messages)


def _req(**fields: object) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(
        max_tokens=16,
        messages=[jobs_pb2.Message(role="user", content="Hello")],
        **fields,  # type: ignore[arg-type]
    )


def test_a_configured_model_list_accepts_patterns_and_refuses_the_rest() -> None:
    settings = Settings(allowed_models=("claude-*", "my-proxy/model"))
    assert validate_submit(_req(model="claude-opus-4-1"), settings, "t").model == "claude-opus-4-1"
    assert validate_submit(_req(model="my-proxy/model"), settings, "t")
    with pytest.raises(InvalidArgument) as err:
        validate_submit(_req(model="gpt-4o"), settings, "t")
    assert err.value.field == "model"
    assert validate_submit(_req(model="gpt-4o"), Settings(), "t"), "no list: any model"


def test_a_quota_refusal_says_when_to_retry() -> None:
    status = ResourceExhausted("over quota; retry in 1.5 s", retry_after_s=1.5).to_status()
    (detail,) = status_pb2.Status.FromString(
        dict(status.trailing_metadata)["grpc-status-details-bin"]
    ).details
    info = error_details_pb2.RetryInfo()
    assert detail.Unpack(info) and info.retry_delay.ToMilliseconds() == 1500


async def test_the_simulator_enforces_limits_with_the_real_headers() -> None:
    config = SimulatorConfig(port=0, limit_requests_per_minute=120, limit_burst_s=1)
    async with start_simulator(config) as sim:  # capacity: 2 requests
        client = anthropic.AsyncAnthropic(api_key="sim", base_url=sim.base_url, max_retries=0)
        try:
            messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hi"}]
            first = await client.messages.with_raw_response.create(
                model="m", max_tokens=8, messages=messages
            )
            assert first.headers["anthropic-ratelimit-requests-limit"] == "120"
            assert first.headers["anthropic-ratelimit-requests-remaining"] == "1"
            assert first.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
            await client.messages.create(model="m", max_tokens=8, messages=messages)
            with pytest.raises(anthropic.RateLimitError) as refused:
                await client.messages.create(model="m", max_tokens=8, messages=messages)
        finally:
            await client.close()
        error = classify(refused.value)
        assert error.http_status == 429 and error.retryable
        assert error.retry_after_s == 1.0
        assert error.headers is not None
        assert error.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert sim.stats.rate_limited == 1 and sim.stats.completed == 2
