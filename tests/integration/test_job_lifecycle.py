"""A job travels gateway → RabbitMQ → worker → model → notifier, for real."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conveyor.client import ConveyorClient, NotFound, job_status_name
from conveyor.v1 import events_pb2, jobs_pb2
from tests.stack import Stack

pytestmark = pytest.mark.integration


async def test_a_submitted_job_streams_its_tokens_and_succeeds(client: ConveyorClient) -> None:
    job = await client.submit("claude-sonnet-4-5", "Hello", max_tokens=64, labels={"suite": "e2e"})
    assert job.id and job.status == jobs_pb2.JOB_STATUS_PENDING

    tokens: list[str] = []
    statuses: list[str] = []
    sequences: list[int] = []
    async for event in client.watch(job.id):
        sequences.append(event.sequence)
        kind = event.WhichOneof("payload")
        if kind == "token_delta":
            tokens.append(event.token_delta.text)
        elif kind == "status_changed":
            statuses.append(job_status_name(event.status_changed.status))
        else:
            statuses.append(job_status_name(event.snapshot.status))

    assert statuses[-1] == "succeeded"
    assert sequences == sorted(sequences), "events arrive in sequence order"
    done = await client.get(job.id)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert done.result_text and done.stop_reason == "end_turn"
    if statuses[0] == "pending":
        # The watch began before the job was claimed: every token came live.
        assert "".join(tokens) == done.result_text
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.attempts == 1
    created = done.created_at.ToDatetime()
    started = done.started_at.ToDatetime()
    finished = done.finished_at.ToDatetime()
    assert created <= started <= finished
    assert done.labels["suite"] == "e2e"


async def test_watching_a_slow_job_from_the_start_gets_every_token_live(
    client: ConveyorClient,
) -> None:
    job = await client.submit(
        "claude-sonnet-4-5",
        "Stream slowly",
        max_tokens=64,
        labels={"x-sim-latency-ms": "300", "x-sim-tokens-per-second": "100"},
    )
    first = None
    deltas: list[events_pb2.TokenDelta] = []
    async for event in client.watch(job.id):
        if first is None:
            first = event
            assert event.WhichOneof("payload") == "snapshot"
        elif event.WhichOneof("payload") == "token_delta":
            deltas.append(event.token_delta)
    done = await client.get(job.id)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert "".join(d.text for d in deltas) == done.result_text
    # Pieces that reach the worker together travel as one delta (on a busy machine,
    # often): each delta counts the pieces so far, and the last one counts them all.
    counts = [d.output_tokens for d in deltas]
    assert counts == sorted(set(counts)) and counts[-1] == done.usage.output_tokens


async def test_a_finished_job_is_watched_as_its_snapshot(client: ConveyorClient) -> None:
    job = await client.wait((await client.submit("claude-sonnet-4-5", "Hi", max_tokens=8)).id, 30)
    events = [e async for e in client.watch(job.id, resume=False)]
    assert len(events) == 1 and events[0].snapshot.status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def test_jobs_are_listed_newest_first_and_paged(client: ConveyorClient) -> None:
    ids = [
        (await client.submit("claude-sonnet-4-5", f"n{i}", max_tokens=8, labels={"page": "t"})).id
        for i in range(3)
    ]
    first, token = await client.list(labels={"page": "t"}, page_size=2)
    second, last = await client.list(labels={"page": "t"}, page_size=2, page_token=token)
    assert [j.id for j in first + second] == list(reversed(ids))
    assert token and not last


async def test_unknown_jobs_are_not_found(client: ConveyorClient) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(NotFound):
        await client.get(missing)
    with pytest.raises(NotFound):
        async for _ in client.watch(missing, resume=False):
            pass


async def test_stats_count_jobs_by_status_and_lane(client: ConveyorClient) -> None:
    await client.wait((await client.submit("claude-sonnet-4-5", "s", max_tokens=8)).id, 30)
    stats = await client.stats()
    assert stats.counts["succeeded"] >= 1
    assert {lane.lane for lane in stats.lanes} >= {"interactive", "default", "bulk"}
    assert stats.tokens.output_tokens > 0


@pytest.mark.parametrize("which", ["gateway", "notifier"])
async def test_every_server_offers_health_and_reflection(stack: Stack, which: str) -> None:
    """Both stay open without an API key, so probes and grpcurl's discovery work."""
    target = stack.gateway if which == "gateway" else stack.notifier
    async with grpc.aio.insecure_channel(target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        services = set()
        async for response in stub.ServerReflectionInfo(iter([request])):
            services |= {s.name for s in response.list_services_response.service}
    expected = "conveyor.v1.JobService" if which == "gateway" else "conveyor.v1.JobEvents"
    assert {expected, "grpc.health.v1.Health"} <= services
