"""Token deltas go on the bus only while someone watches: a job nobody watches publishes
none, and every watch still gets every piece exactly once, in order, whenever it
starts (mid-run, while the job waits, second, tenant-wide) — what was not published
is caught up from the worker, and the bus stream of a watched attempt has no hole."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import timedelta

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, ExchangeType

from conveyor.bus.broker import EVENTS_EXCHANGE, event_routing_key
from conveyor.client import ConveyorClient
from conveyor.v1 import events_pb2, jobs_pb2
from services.notifier.interest import RELEASE_AFTER_S, TICK_S
from tests.conftest import TenantClient, eventually, finished
from tests.integration.test_notifier import (
    assert_in_order,
    assert_whole_attempt,
    kind,
    read_until,
    slow,
    text_of,
)
from tests.stack import Backing

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
Tap = dict[str, list[events_pb2.JobEvent]]


@contextlib.asynccontextmanager
async def delta_tap(backing: Backing) -> AsyncIterator[Tap]:
    """Every token delta published on the events exchange meanwhile, by job id."""
    connection = await aio_pika.connect(backing.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, event_routing_key("delta", "#"))
        seen: Tap = defaultdict(list)

        async def on_delta(message: AbstractIncomingMessage) -> None:
            event = events_pb2.JobEvent.FromString(message.body)
            seen[event.job_id].append(event)

        await queue.consume(on_delta, no_ack=True)
        yield seen
    finally:
        await connection.close()


def assert_bus_stream_whole(published: list[events_pb2.JobEvent], done: jobs_pb2.Job) -> None:
    """The attempt's deltas on the bus: each once, in order, from its first piece on."""
    seqs = [e.sequence for e in published]
    assert seqs == sorted(set(seqs)), "each delta published once, in order"
    assert text_of(published, done.attempts) == done.result_text, "no hole on the bus"


async def running(client: ConveyorClient, job_id: str) -> None:
    async def streaming() -> bool:
        return (await client.get(job_id)).status == jobs_pb2.JOB_STATUS_RUNNING

    await eventually(streaming, within_s=20, every_s=0.05)


def tenant() -> str:
    """A tenant of its own: no other test's tenant-wide watch holds a lease on it."""
    return f"interest-{uuid.uuid4().hex[:8]}"


async def test_a_job_nobody_watches_publishes_no_token_delta(
    tenant_client: TenantClient, backing: Backing
) -> None:
    async with tenant_client(tenant()) as client, delta_tap(backing) as published:
        alone = await client.submit(MODEL, "alone", max_tokens=100, labels=slow(40, 200))
        done = await finished(client, alone.id)  # by GetJob: no watch
        watched = await client.submit(MODEL, "watched", max_tokens=100, labels=slow(40, 200))
        events = [e async for e in client.watch(watched.id)]
        await asyncio.sleep(0.3)  # the tap's last messages

    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.usage.output_tokens == 40
    assert published[alone.id] == [], "no delta of a job nobody watched"
    final = await client.get(watched.id)
    assert text_of(events) == final.result_text
    assert_bus_stream_whole(published[watched.id], final)


async def test_a_watch_started_mid_run_gets_every_piece_once_in_order(
    tenant_client: TenantClient, backing: Backing
) -> None:
    async with tenant_client(tenant()) as client, delta_tap(backing) as published:
        job = await client.submit(MODEL, "join late", max_tokens=200, labels=slow(80, 80))
        await running(client, job.id)
        await asyncio.sleep(0.4)  # pieces that nobody watched, never published
        events = [e async for e in client.watch(job.id)]
        done = await client.get(job.id)
        await asyncio.sleep(0.3)

    snapshot = events[0]
    assert snapshot.snapshot.status == jobs_pb2.JOB_STATUS_RUNNING
    deltas = [e for e in events if kind(e) == "token_delta"]
    assert deltas[0].sequence - deltas[0].token_delta.output_tokens == snapshot.sequence
    assert all(e.sequence - e.token_delta.output_tokens == snapshot.sequence for e in deltas)
    assert_in_order(events, after=snapshot.sequence)
    assert text_of(events) == done.result_text
    assert deltas[-1].token_delta.output_tokens == done.usage.output_tokens == 80
    assert_bus_stream_whole(published[job.id], done)


async def test_a_watch_opened_while_the_job_waits_gets_every_piece(
    tenant_client: TenantClient, backing: Backing
) -> None:
    async with tenant_client(tenant()) as client, delta_tap(backing) as published:
        job = await client.submit(
            MODEL,
            "wait first",
            max_tokens=100,
            labels=slow(40, 100, latency_ms=0),
            delay=timedelta(seconds=1),
        )
        events = [e async for e in client.watch(job.id, after_sequence=1)]
        done = await client.get(job.id)
        await asyncio.sleep(0.3)

    assert events[0].snapshot.status == jobs_pb2.JOB_STATUS_SCHEDULED
    assert_whole_attempt(events, done)
    assert_bus_stream_whole(published[job.id], done)


async def test_a_watch_of_a_job_that_ends_before_the_watch_reaches_its_worker_gets_every_piece(
    tenant_client: TenantClient,
) -> None:
    # Watched from before they run; then tokens at once and no model latency: an attempt
    # can end before the watch's registration (sent when the stream sees RUNNING) reaches
    # the worker, so it published its deltas nowhere; the worker keeps an ended attempt's
    # pieces for a while and the notifier asks for them.
    fast = {"x-sim-latency-ms": "0", "x-sim-tokens": "12", "x-sim-tokens-per-second": "0"}
    async with tenant_client(tenant()) as client:
        jobs, watches = [], []
        for i in range(8):
            job = await client.submit(
                MODEL, f"fast {i}", max_tokens=16, labels=fast, delay=timedelta(seconds=2)
            )
            jobs.append(job)
            watches.append(asyncio.create_task(_collect(client.watch(job.id))))
        streams = await asyncio.gather(*watches)
        for job, events in zip(jobs, streams, strict=True):
            done = await client.get(job.id)
            assert events[0].snapshot.status == jobs_pb2.JOB_STATUS_SCHEDULED
            assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED
            assert_whole_attempt(events, done)


async def test_a_second_watcher_gets_every_piece_and_nothing_is_published_twice(
    tenant_client: TenantClient, backing: Backing
) -> None:
    async with tenant_client(tenant()) as client, delta_tap(backing) as published:
        job = await client.submit(MODEL, "two watchers", max_tokens=200, labels=slow(100, 80))
        first = asyncio.create_task(_collect(client.watch(job.id)))
        await running(client, job.id)
        await asyncio.sleep(0.4)
        second = [e async for e in client.watch(job.id)]
        done = await client.get(job.id)
        await asyncio.sleep(0.3)

    assert text_of(await first) == text_of(second) == done.result_text
    assert_in_order(second, after=second[0].sequence)
    assert_bus_stream_whole(published[job.id], done)


async def test_a_watcher_that_leaves_stops_the_deltas_and_a_resume_gets_the_rest(
    tenant_client: TenantClient, backing: Backing
) -> None:
    released_s = RELEASE_AFTER_S + 2 * TICK_S + 0.5
    async with tenant_client(tenant()) as client, delta_tap(backing) as published:
        # 600 pieces at 40 a second: streaming long after the watcher leaves.
        job = await client.submit(MODEL, "leaving", max_tokens=800, labels=slow(600, 40))
        first = await read_until(client.watch(job.id, resume=False), deltas=5)
        last = max(e.sequence for e in first if kind(e) in ("status_changed", "token_delta"))
        await asyncio.sleep(released_s)
        quiet_from = len(published[job.id])
        await asyncio.sleep(1.5)
        assert (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_RUNNING, "the premise"
        assert len(published[job.id]) == quiet_from, "no delta once the watch is released"

        rest = [e async for e in client.watch(job.id, after_sequence=last)]
        done = await client.get(job.id)
        await asyncio.sleep(0.3)

    assert_in_order(rest, after=last)
    assert text_of(first) + text_of(rest) == done.result_text
    assert_bus_stream_whole(published[job.id], done)


async def test_a_tenant_wide_watch_gets_every_piece_of_running_and_new_jobs(
    tenant_client: TenantClient, backing: Backing
) -> None:
    board = uuid.uuid4().hex
    labels = {"board": board}
    async with tenant_client(tenant()) as client, delta_tap(backing) as published:
        early = await client.submit(
            MODEL, "already running", max_tokens=200, labels={**labels, **slow(100, 60)}
        )
        await running(client, early.id)
        await asyncio.sleep(0.4)  # unwatched so far: nothing published
        assert published[early.id] == []
        seen: list[events_pb2.JobEvent] = []
        ours = {early.id}
        ended: set[str] = set()

        async def follow() -> None:
            async for event in client.watch_jobs(labels=labels, token_deltas=True):
                seen.append(event)
                change = event.status_changed
                if (
                    kind(event) == "status_changed"
                    and change.status == jobs_pb2.JOB_STATUS_SUCCEEDED
                ):
                    ended.add(event.job_id)
                    if len(ours) == 2 and ended >= ours:
                        return

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        late = await client.submit(MODEL, "new", max_tokens=100, labels={**labels, **slow(40, 80)})
        ours.add(late.id)
        await asyncio.wait_for(task, 30)
        await asyncio.sleep(0.3)
        for job_id in ours:
            done = await client.get(job_id)
            mine = [e for e in seen if e.job_id == job_id]
            assert kind(mine[0]) == "snapshot"
            assert_in_order(mine, after=mine[0].sequence)
            assert text_of(mine) == done.result_text
            assert_bus_stream_whole(published[job_id], done)


async def _collect(events: AsyncIterator[events_pb2.JobEvent]) -> list[events_pb2.JobEvent]:
    return [e async for e in events]
