"""The client, async and sync, against in-process gRPC servers (real gRPC over 127.0.0.1
on a free port) whose handlers stand in for the gateway and the notifier: errors as
typed exceptions carrying their field violations, the API key as a bearer token,
watches that resume after the last sequence, and a base install (client and CLI)
that imports no server module. No RabbitMQ, Postgres or Conveyor services.
"""

from __future__ import annotations

import gc
import io
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from conveyor.cli import (
    stream_job,
)
from conveyor.client import (
    ConveyorClient,
    ConveyorError,
    InvalidArgument,
    NotFound,
)
from conveyor.client.sync import SyncConveyorClient
from conveyor.v1 import events_pb2, jobs_pb2
from tests.unit.fake_services import JOB_ID, _handlers, events, final_job, invalid_argument_status


@dataclass
class Recorded:
    """What the fake servers saw."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    watch_requests: list[events_pb2.WatchJobRequest] = field(default_factory=list)
    drop_first_watch: bool = False


def _metadata(context: Any) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}


@dataclass
class AsyncFake:
    target: str
    recorded: Recorded


@pytest.fixture
async def fake() -> AsyncIterator[AsyncFake]:
    """A grpc.aio server standing in for both the gateway and the notifier."""
    recorded = Recorded()

    async def get_job(
        request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        recorded.metadata.append(_metadata(context))
        if request.id == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "job missing not found")
        if request.id == "bad":
            await context.abort_with_status(invalid_argument_status())
        return jobs_pb2.GetJobResponse(job=final_job(request.id))

    async def submit_job(
        request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        recorded.metadata.append(_metadata(context))
        return jobs_pb2.SubmitJobResponse(
            job=jobs_pb2.Job(id=JOB_ID, status=jobs_pb2.JOB_STATUS_PENDING, model=request.model)
        )

    async def watch_job(
        request: events_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.JobEvent]:
        recorded.watch_requests.append(request)
        if request.id == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "job missing not found")
        stream = events(request.id)
        if recorded.drop_first_watch and len(recorded.watch_requests) == 1:
            for event in stream[:2]:  # snapshot and the first delta, then the notifier dies
                yield event
            await context.abort(grpc.StatusCode.UNAVAILABLE, "notifier restarting")
        for event in stream:
            if event.WhichOneof("payload") != "snapshot" and (
                event.sequence <= request.after_sequence
            ):
                continue
            yield event

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(_handlers(get_job, submit_job, watch_job))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield AsyncFake(f"127.0.0.1:{port}", recorded)
    finally:
        await server.stop(None)


# --------------------------------------------------------------------------- async client


@pytest.mark.asyncio
async def test_not_found_surfaces_as_not_found(
    fake: AsyncFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVEYOR_API_KEY", raising=False)
    async with ConveyorClient(fake.target, fake.target) as client:
        with pytest.raises(NotFound) as exc:
            await client.get("missing")
    assert isinstance(exc.value, ConveyorError)
    assert exc.value.code == grpc.StatusCode.NOT_FOUND
    assert exc.value.details == "job missing not found"


@pytest.mark.asyncio
async def test_invalid_argument_carries_the_field(fake: AsyncFake) -> None:
    async with ConveyorClient(fake.target, fake.target) as client:
        with pytest.raises(InvalidArgument) as exc:
            await client.get("bad")
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.field_violations == [("id", "is not a UUID")]


@pytest.mark.asyncio
async def test_api_key_is_sent_as_bearer(fake: AsyncFake) -> None:
    async with ConveyorClient(fake.target, fake.target, api_key="test-key") as client:
        job = await client.get(JOB_ID)
    assert job.id == JOB_ID and job.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert fake.recorded.metadata[-1]["authorization"] == "Bearer test-key"
    assert "test-key" not in repr(client)


@pytest.mark.asyncio
async def test_api_key_from_the_environment(
    fake: AsyncFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_API_KEY", "env-key")
    async with ConveyorClient(fake.target, fake.target) as client:
        await client.get(JOB_ID)
    assert fake.recorded.metadata[-1]["authorization"] == "Bearer env-key"


@pytest.mark.asyncio
async def test_no_authorization_without_a_key(
    fake: AsyncFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVEYOR_API_KEY", raising=False)
    async with ConveyorClient(fake.target, fake.target) as client:
        await client.get(JOB_ID)
    assert "authorization" not in fake.recorded.metadata[-1]


@pytest.mark.asyncio
async def test_submit_sends_one_user_message(fake: AsyncFake) -> None:
    async with ConveyorClient(fake.target, fake.target) as client:
        job = await client.submit("claude-sonnet-4-5", "Hi", max_tokens=16)
    assert job.id == JOB_ID and job.model == "claude-sonnet-4-5"


@pytest.mark.asyncio
async def test_wait_returns_the_final_job(fake: AsyncFake) -> None:
    async with ConveyorClient(fake.target, fake.target) as client:
        job = await client.wait(JOB_ID, timeout=10)
    assert job.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert job.result_text == "Hello"


@pytest.mark.asyncio
async def test_watch_resumes_after_the_last_sequence(fake: AsyncFake) -> None:
    fake.recorded.drop_first_watch = True
    async with ConveyorClient(fake.target, fake.target) as client:
        seen = [event async for event in client.watch(JOB_ID)]
    kinds = [e.WhichOneof("payload") for e in seen]
    assert kinds == ["snapshot", "token_delta", "snapshot", "token_delta", "status_changed"]
    assert [e.token_delta.text for e in seen if e.HasField("token_delta")] == ["Hel", "lo"]
    assert [r.after_sequence for r in fake.recorded.watch_requests] == [0, 3]


@pytest.mark.asyncio
async def test_watch_of_an_unknown_job(fake: AsyncFake) -> None:
    async with ConveyorClient(fake.target, fake.target) as client:
        with pytest.raises(NotFound):
            async for _ in client.watch("missing"):
                pass


@pytest.mark.asyncio
async def test_stream_job_prints_tokens_and_returns_the_final_job(fake: AsyncFake) -> None:
    out, err = io.StringIO(), io.StringIO()
    async with ConveyorClient(fake.target, fake.target) as client:
        final = await stream_job(client, JOB_ID, out, err)
    assert out.getvalue() == "Hello\n"
    assert final.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert "[running -> succeeded, attempt 1]" in err.getvalue()
    assert "succeeded" in err.getvalue().splitlines()[-1]


# --------------------------------------------------------------------------- sync client


def test_the_sync_client_has_every_method_of_the_async_client() -> None:
    public = {n for n in dir(ConveyorClient) if not n.startswith("_")}
    assert public - set(dir(SyncConveyorClient)) == set()


def test_the_sync_client_blocks_iterates_and_raises_the_same_errors(sync_fake: str) -> None:
    with SyncConveyorClient(sync_fake, sync_fake) as client:
        assert client.get(JOB_ID).result_text == "Hello"
        kinds = [e.WhichOneof("payload") for e in client.watch(JOB_ID)]
        assert kinds == ["snapshot", "token_delta", "token_delta", "status_changed"]
        assert client.wait(JOB_ID, timeout=10).status == jobs_pb2.JOB_STATUS_SUCCEEDED
        with pytest.raises(NotFound):
            client.get("missing")
    with pytest.raises(RuntimeError):
        client.get(JOB_ID)
    client.close()  # a second close does nothing


async def test_the_sync_client_works_where_an_event_loop_runs(sync_fake: str) -> None:
    """As in a notebook: the caller's thread already runs a loop."""
    with SyncConveyorClient(sync_fake, sync_fake) as client:
        assert client.get(JOB_ID).id == JOB_ID


def test_a_sync_client_dropped_unclosed_stops_its_thread(sync_fake: str) -> None:
    client = SyncConveyorClient(sync_fake, sync_fake)
    client.get(JOB_ID)
    thread = client._thread
    del client
    gc.collect()
    assert not thread.is_alive()


# --------------------------------------------------------------------------- base install


def test_the_client_and_the_cli_import_no_server_module() -> None:
    """The base install (the client and the CLI) has none of the server's dependencies."""
    code = (
        "import sys, conveyor.client, conveyor.client.sync, conveyor.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {"
        "'sqlalchemy', 'aio_pika', 'aiormq', 'asyncpg', 'alembic', 'anthropic', 'pydantic',"
        " 'pydantic_settings', 'orjson', 'opentelemetry', 'aiohttp', 'cryptography',"
        " 'prometheus_client', 'cronsim', 'standardwebhooks'}"
        " or m in {'conveyor.core.config', 'conveyor.db.admin', 'conveyor.db', 'conveyor.server.auth'}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
