"""The simulator's Message Batches endpoints, read through the anthropic SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
from anthropic.types.messages import MessageBatchErroredResult, MessageBatchSucceededResult

from devtools.simulator.app import RunningSimulator, SimulatorConfig, start_simulator

MODEL = "claude-sonnet-4-5"


def requests(n: int) -> list[Any]:
    return [
        {
            "custom_id": f"job-{i}",
            "params": {
                "model": MODEL,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": f"hello {i}"}],
            },
        }
        for i in range(n)
    ]


def error_type(result: Any) -> str:
    assert isinstance(result, MessageBatchErroredResult)
    return result.error.error.type


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with start_simulator(SimulatorConfig(port=0, batch_processing_s=0.2)) as s:
        yield s


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = anthropic.AsyncAnthropic(api_key="x", base_url=sim.base_url, max_retries=0)
    yield c
    await c.close()


async def test_a_batch_ends_after_its_processing_time_with_batch_tier_messages(
    client: anthropic.AsyncAnthropic,
) -> None:
    batch = await client.messages.batches.create(requests=requests(3))
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 3
    assert batch.results_url is None
    with pytest.raises(anthropic.BadRequestError):
        await client.get(f"/v1/messages/batches/{batch.id}/results", cast_to=object)
    await asyncio.sleep(0.3)
    ended = await client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.request_counts.succeeded == 3
    assert ended.ended_at is not None and ended.expires_at > ended.created_at
    results = [r async for r in await client.messages.batches.results(batch.id)]
    assert sorted(r.custom_id for r in results) == ["job-0", "job-1", "job-2"]
    for r in results:
        assert isinstance(r.result, MessageBatchSucceededResult)
        assert r.result.message.usage.service_tier == "batch"
        assert r.result.message.content[0].type == "text"


async def test_results_can_be_forced_per_request_and_invalid_params_error(
    client: anthropic.AsyncAnthropic,
) -> None:
    reqs = requests(4)
    reqs[3]["params"].pop("max_tokens")
    forced = {"job-0": "errored-529", "job-1": "expired", "job-2": "errored-400"}
    batch = await client.messages.batches.create(
        requests=reqs, extra_headers={"x-sim-batch-results": json.dumps(forced)}
    )
    await asyncio.sleep(0.3)
    got = {r.custom_id: r.result async for r in await client.messages.batches.results(batch.id)}
    assert error_type(got["job-0"]) == "overloaded_error"
    assert got["job-1"].type == "expired"
    assert error_type(got["job-2"]) == "invalid_request_error"
    assert error_type(got["job-3"]) == "invalid_request_error"


async def test_a_batch_past_its_expiry_ends_with_every_request_expired(
    sim: RunningSimulator, client: anthropic.AsyncAnthropic
) -> None:
    sim.update(batch_expire_s=0.1, batch_processing_s=10)
    batch = await client.messages.batches.create(requests=requests(2))
    await asyncio.sleep(0.2)
    ended = await client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.request_counts.expired == 2


async def test_cancel_ends_the_batch_with_its_requests_canceled(
    client: anthropic.AsyncAnthropic,
) -> None:
    batch = await client.messages.batches.create(
        requests=requests(2), extra_headers={"x-sim-batch-processing-ms": "60000"}
    )
    cancelled = await client.messages.batches.cancel(batch.id)
    assert cancelled.cancel_initiated_at is not None
    ended = await client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.request_counts.canceled == 2


async def test_list_pages_newest_first(client: anthropic.AsyncAnthropic) -> None:
    made = [(await client.messages.batches.create(requests=requests(1))).id for _ in range(3)]
    first = await client.messages.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    every = [b.id async for b in await client.messages.batches.list(limit=2)]
    assert every == made[::-1]


async def test_bad_batches_are_refused_naming_the_field(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="requests"):
        await client.messages.batches.create(requests=[])
    reqs = requests(2)
    reqs[1]["custom_id"] = "job-0"
    with pytest.raises(anthropic.BadRequestError, match=r"requests\.1\.custom_id"):
        await client.messages.batches.create(requests=reqs)
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.retrieve("msgbatch_nope")
