"""A bounded gateway and notifier: a flood of unknown keys writes nothing, a message
larger than the largest allowed body is refused before it is decoded, a server takes a
bounded number of calls at once, one tenant cannot hold every watch stream, a worker
set to the real API without a key does not start, and invented model names are
counted as `other`."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.core.errors import Unauthenticated
from conveyor.db.admin import create_api_key
from conveyor.db.engine import create_engine
from conveyor.server.auth import Authenticator, generate_key
from conveyor.server.runtime import max_request_bytes
from conveyor.v1 import events_pb2, events_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from devtools import devstack
from tests.conftest import count_jobs, eventually, finished
from tests.stack import Backing, Stack, free_port

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"


# --------------------------------------------------------------------------- API keys


@contextlib.asynccontextmanager
async def statements(backing: Backing) -> AsyncIterator[tuple[AsyncEngine, list[str]]]:
    """An engine of the test database that records every statement it sends."""
    engine = create_engine(backing.database_url, pool_size=1, pre_ping=False)
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement.strip().split()[0].upper())

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield engine, sent
    finally:
        await engine.dispose()


async def test_a_flood_of_unknown_keys_writes_nothing_and_stays_bounded(
    backing: Backing, db: AsyncEngine
) -> None:
    async with statements(backing) as (engine, sent):
        authenticator = Authenticator(engine, cache_s=60, cache_size=100)
        for _ in range(300):
            with pytest.raises(Unauthenticated):
                await authenticator.resolve([("authorization", f"Bearer {generate_key()}")])
        assert sent and set(sent) == {"SELECT"}, f"only reads: {sorted(set(sent))}"
        assert len(authenticator.refused) == 100 and len(authenticator.valid) == 0


async def test_a_valid_key_is_stamped_as_used_at_most_once_a_minute(
    backing: Backing, db: AsyncEngine
) -> None:
    key, row = await create_api_key(db, "stamp-t", "ci", "member")
    async with statements(backing) as (engine, sent):
        for _ in range(3):  # a fresh process each time: nothing cached
            who = await Authenticator(engine, cache_s=60).resolve(
                [("authorization", f"Bearer {key}")]
            )
            assert who.tenant == "stamp-t"
        assert sent.count("UPDATE") == 1
    async with db.connect() as conn:
        used = (
            await conn.execute(
                sa.text("SELECT last_used_at FROM api_keys WHERE id = :id"), {"id": row["id"]}
            )
        ).scalar_one()
    assert used is not None


# --------------------------------------------------------------------------- message size


async def test_a_message_larger_than_the_largest_allowed_body_is_refused_unread(
    stack: Stack, db: AsyncEngine, api_key: str
) -> None:
    limit = max_request_bytes(stack.settings)
    request = jobs_pb2.SubmitJobRequest(
        model=MODEL,
        max_tokens=8,
        messages=[jobs_pb2.Message(role="user", content="x" * (limit + 1))],
    )
    before = await count_jobs(db)
    async with grpc.aio.insecure_channel(
        stack.gateway, options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SubmitJob(request, metadata=(("authorization", f"Bearer {api_key}"),))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert await count_jobs(db) == before, "nothing was written"


# --------------------------------------------------------------------------- notifier caps


@contextlib.contextmanager
def extra_notifier(stack: Stack, **env: str) -> Any:
    """A notifier of its own with these settings; yields its address."""
    port = free_port()
    name = f"notifier-{uuid.uuid4().hex[:6]}"
    address = f"127.0.0.1:{port}"
    stack.start_extra(
        devstack.Service(name, "services.notifier", "grpc", address, "JobEvents"),
        CONVEYOR_NOTIFIER_PORT=str(port),
        CONVEYOR_NOTIFIER_METRICS_PORT="0",
        **env,
    )
    try:
        yield address
    finally:
        stack.stop(name)


async def _open_watch(
    channel: grpc.aio.Channel, key: str, job_id: str
) -> grpc.aio.UnaryStreamCall[Any, events_pb2.JobEvent]:
    """A WatchJob stream whose first event (the snapshot) has arrived: it is open."""
    call = events_pb2_grpc.JobEventsStub(channel).WatchJob(
        events_pb2.WatchJobRequest(id=job_id), metadata=(("authorization", f"Bearer {key}"),)
    )
    await call.read()
    return call


async def _key(db: AsyncEngine, tenant: str) -> str:
    key, _ = await create_api_key(db, tenant, f"w-{uuid.uuid4().hex[:8]}", "member")
    return key


async def _later(stack: Stack, key: str) -> str:
    """A job that waits a minute (watches of it stay open meanwhile)."""
    async with ConveyorClient(stack.gateway, stack.notifier, api_key=key) as c:
        return (await c.submit(MODEL, "later", max_tokens=8, delay=timedelta(minutes=1))).id


async def _cancel(stack: Stack, key: str, job_id: str) -> jobs_pb2.Job:
    async with ConveyorClient(stack.gateway, stack.notifier, api_key=key) as c:
        await c.cancel(job_id)
        return await finished(c, job_id)


async def test_one_tenant_cannot_hold_more_watch_streams_than_its_cap(
    stack: Stack, db: AsyncEngine
) -> None:
    greedy, other = await _key(db, "watch-greedy"), await _key(db, "watch-other")
    greedy_job, other_job = await _later(stack, greedy), await _later(stack, other)
    with extra_notifier(stack, CONVEYOR_NOTIFIER_MAX_WATCHES_PER_TENANT="2") as address:
        async with grpc.aio.insecure_channel(address) as channel:
            held = [await _open_watch(channel, greedy, greedy_job) for _ in range(2)]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _open_watch(channel, greedy, greedy_job)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "your tenant" in (err.value.details() or "")
            # Another tenant is not held up by the first one's streams.
            theirs = await _open_watch(channel, other, other_job)
            theirs.cancel()
            # A closed stream frees its place.
            held.pop().cancel()

            async def reopened() -> bool:
                try:
                    held.append(await _open_watch(channel, greedy, greedy_job))
                except grpc.aio.AioRpcError:
                    return False
                return True

            await eventually(reopened, within_s=10, every_s=0.2)
            for call in held:
                call.cancel()
    for key, job_id in ((greedy, greedy_job), (other, other_job)):
        assert (await _cancel(stack, key, job_id)).status == jobs_pb2.JOB_STATUS_CANCELLED


async def test_a_server_takes_at_most_its_maximum_of_concurrent_calls(
    stack: Stack, db: AsyncEngine
) -> None:
    key = await _key(db, "rpc-cap")
    job_id = await _later(stack, key)
    with extra_notifier(stack, CONVEYOR_GRPC_MAX_CONCURRENT_RPCS="2") as address:
        async with grpc.aio.insecure_channel(address) as channel:
            held = [await _open_watch(channel, key, job_id) for _ in range(2)]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _open_watch(channel, key, job_id)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in held:
                call.cancel()
    assert (await _cancel(stack, key, job_id)).status == jobs_pb2.JOB_STATUS_CANCELLED


# --------------------------------------------------------------------------- worker


async def test_a_worker_set_to_the_real_api_without_a_key_does_not_start(
    stack: Stack, db: AsyncEngine
) -> None:
    name = "worker-no-key"
    service = devstack.Service(name, "services.worker", "log")
    with pytest.raises(RuntimeError, match="exited with status 2"):
        stack.start_extra(service, CONVEYOR_PROVIDER="anthropic", CONVEYOR_WORKER_METRICS_PORT="0")
    stack.procs.pop(name, None)
    logged = stack.run.log_file(service).read_text()
    assert "refusing to start" in logged and "ANTHROPIC_API_KEY" in logged


async def test_an_invented_model_name_is_counted_as_other(
    stack: Stack, db: AsyncEngine, client: ConveyorClient
) -> None:
    invented = f"claude-invented-{uuid.uuid4().hex[:8]}"
    job = await client.submit(invented, "Hello", max_tokens=8)
    assert (await finished(client, job.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
    url = f"http://127.0.0.1:{stack.settings.worker_metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        metrics = await answer.text()
    tokens = [line for line in metrics.splitlines() if line.startswith("conveyor_tokens_total")]
    assert any('model="other"' in line for line in tokens), tokens
    assert invented not in metrics
    async with db.connect() as conn:
        buckets = (
            await conn.execute(
                sa.text("SELECT count(*) FROM rate_buckets WHERE bucket LIKE :b"),
                {"b": f"%{invented}%"},
            )
        ).scalar_one()
    assert buckets == 0
