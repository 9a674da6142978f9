"""Bad requests get INVALID_ARGUMENT naming the field, and nothing is written."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient, FailedPrecondition, InvalidArgument, error_from_rpc
from conveyor.v1 import events_pb2, events_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from tests.conftest import count_jobs, job_history
from tests.stack import Stack

pytestmark = pytest.mark.integration


def _request(**overrides: object) -> jobs_pb2.SubmitJobRequest:
    req = jobs_pb2.SubmitJobRequest(
        model="claude-sonnet-4-5",
        max_tokens=16,
        messages=[jobs_pb2.Message(role="user", content="Hello")],
    )
    for name, value in overrides.items():
        if name == "messages":
            del req.messages[:]
            req.messages.extend(value)  # type: ignore[arg-type]
        elif name in ("labels", "metadata"):
            getattr(req, name).update(value)
        elif name == "stop_sequences":
            req.stop_sequences.extend(value)  # type: ignore[arg-type]
        elif name == "delay_s":
            req.delay.FromSeconds(int(value))  # type: ignore[call-overload]
        elif name in ("run_at", "delay", "timeout"):  # (seconds, nanos), unchecked
            assert isinstance(value, tuple)
            getattr(req, name).seconds, getattr(req, name).nanos = value
        else:
            setattr(req, name, value)
    return req


BAD_REQUESTS = [
    ("model", {"model": ""}),
    ("model", {"model": "no spaces allowed"}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": 1_000_000}),
    ("messages", {"messages": []}),
    ("messages[0].role", {"messages": [jobs_pb2.Message(role="robot", content="x")]}),
    ("messages[0].role", {"messages": [jobs_pb2.Message(role="assistant", content="x")]}),
    (
        "messages[1].content",
        {
            "messages": [
                jobs_pb2.Message(role="user", content="a"),
                jobs_pb2.Message(role="assistant", content=""),
            ]
        },
    ),
    ("temperature", {"temperature": 1.5}),
    ("priority", {"priority": 10}),
    ("priority", {"priority": -1}),
    ("lane", {"lane": "express"}),
    ("max_attempts", {"max_attempts": 99}),
    ("idempotency_key", {"idempotency_key": "k" * 300}),
    ("webhook_url", {"webhook_url": "ftp://example.com/hook"}),
    ("delay", {"delay_s": -5}),
    ("labels", {"labels": {f"k{i}": "v" for i in range(40)}}),
    ("stop_sequences[0]", {"stop_sequences": ["   "]}),
    # A NUL: Postgres stores none, so it is refused before anything is written.
    ("system", {"system": "be\x00brief"}),
    ("messages[0].content", {"messages": [jobs_pb2.Message(role="user", content="a\x00b")]}),
    ("labels['team']", {"labels": {"team": "x\x00"}}),
    ("labels['t\\x00']", {"labels": {"t\x00": "x"}}),
    ("metadata['user_id']", {"metadata": {"user_id": "\x00"}}),
    ("idempotency_key", {"idempotency_key": "key\x00"}),
    ("webhook_url", {"webhook_url": "https://example.com/\x00"}),
    ("stop_sequences[0]", {"stop_sequences": ["END\x00"]}),
    ("model", {"model": "claude\x00"}),
    # A long key is cut short in the field name (it travels in the status's trailers).
    (f"labels[{'k' * 64!r}...]", {"labels": {"k" * 70_000: "v"}}),
    (f"metadata[{'m' * 64!r}...]", {"metadata": {"m" * 70_000: "v"}}),
    # `$` matched before a trailing newline.
    ("model", {"model": "claude-sonnet-4-5\n"}),
    # Timestamps and durations outside their types' own ranges.
    ("run_at", {"run_at": (-62_135_596_801, 0)}),
    ("run_at", {"run_at": (253_402_300_800, 0)}),
    ("run_at", {"run_at": (1_700_000_000, 1_000_000_000)}),
    ("run_at", {"run_at": (1_700_000_000, -1)}),
    ("delay", {"delay": (2**62, 0)}),
    ("timeout", {"timeout": (2**62, 0)}),
    ("delay", {"delay": (5, -5)}),
    ("timeout", {"timeout": (-5, 5)}),
    ("delay", {"delay": (0, 1_000_000_000)}),
    ("timeout", {"timeout": (1, 1_000_000_000)}),
]


@pytest.mark.parametrize(
    ("field", "overrides"), BAD_REQUESTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_REQUESTS)]
)
async def test_a_bad_field_is_named_and_nothing_is_written(
    client: ConveyorClient, db: AsyncEngine, field: str, overrides: dict[str, object]
) -> None:
    before = await count_jobs(db)
    with pytest.raises(InvalidArgument) as err:
        await client.submit_request(_request(**overrides))
    assert [f for f, _ in err.value.field_violations] == [field]
    assert field in err.value.details
    assert await count_jobs(db) == before


async def test_one_bad_job_rejects_the_whole_batch(client: ConveyorClient, db: AsyncEngine) -> None:
    before = await count_jobs(db)
    with pytest.raises(InvalidArgument) as err:
        await client.submit_many([_request(), _request(), _request(max_tokens=0)])
    assert [f for f, _ in err.value.field_violations] == ["jobs[2].max_tokens"]
    assert await count_jobs(db) == before


async def test_a_malformed_job_id_is_invalid(client: ConveyorClient) -> None:
    with pytest.raises(InvalidArgument) as err:
        await client.get("not-a-uuid")
    assert [f for f, _ in err.value.field_violations] == ["id"]


async def test_a_finished_job_cannot_be_cancelled(client: ConveyorClient) -> None:
    job = await client.wait((await client.submit("claude-sonnet-4-5", "x", max_tokens=8)).id, 30)
    with pytest.raises(FailedPrecondition):
        await client.cancel(job.id)
    assert (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def test_only_failed_or_dead_jobs_can_be_retried(client: ConveyorClient) -> None:
    job = await client.wait((await client.submit("claude-sonnet-4-5", "x", max_tokens=8)).id, 30)
    with pytest.raises(FailedPrecondition):
        await client.retry(job.id)
    after = await client.get(job.id)
    assert after.status == jobs_pb2.JOB_STATUS_SUCCEEDED and after.attempts == 1


# --------------------------------------------------------------------------- other RPCs


def _stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def _page_token(created: str) -> str:
    return base64.urlsafe_b64encode(f"{created}|{uuid.uuid4()}".encode()).decode()


BAD_LISTS: list[tuple[str, str, jobs_pb2.ListJobsRequest]] = [
    (
        "created_after before the year 1",
        "created_after",
        jobs_pb2.ListJobsRequest(created_after=_stamp(-62_135_596_801)),
    ),
    (
        "created_after after the year 9999",
        "created_after",
        jobs_pb2.ListJobsRequest(created_after=_stamp(2**62)),
    ),
    (
        "created_before with nanos of a second",
        "created_before",
        jobs_pb2.ListJobsRequest(created_before=_stamp(0, 10**9)),
    ),
    (
        "created_before with negative nanos",
        "created_before",
        jobs_pb2.ListJobsRequest(created_before=_stamp(0, -1)),
    ),
    (
        "a NUL in a label filter",
        "labels['team']",
        jobs_pb2.ListJobsRequest(labels={"team": "a\x00"}),
    ),
    (
        "a NUL in a label filter's key",
        "labels['t\\x00']",
        jobs_pb2.ListJobsRequest(labels={"t\x00": "a"}),
    ),
    (
        "a page token before the year 1 in UTC",
        "page_token",
        jobs_pb2.ListJobsRequest(page_token=_page_token("0001-01-01T00:00:00+14:00")),
    ),
    (
        "a page token after the year 9999 in UTC",
        "page_token",
        jobs_pb2.ListJobsRequest(page_token=_page_token("9999-12-31T23:00:00-14:00")),
    ),
    (
        "a page token without a time zone",
        "page_token",
        jobs_pb2.ListJobsRequest(page_token=_page_token("2026-01-01T00:00:00")),
    ),
    (
        "a page token that is not base64",
        "page_token",
        jobs_pb2.ListJobsRequest(page_token="%%%\x00"),
    ),
]


def _auth(api_key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")]


async def _status_of(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


@pytest.mark.parametrize(
    ("field", "request_"), [(f, r) for _, f, r in BAD_LISTS], ids=[c for c, _, _ in BAD_LISTS]
)
async def test_a_bad_list_filter_is_named_and_nothing_is_written(
    stack: Stack, db: AsyncEngine, api_key: str, field: str, request_: jobs_pb2.ListJobsRequest
) -> None:
    before = await count_jobs(db)
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        err = error_from_rpc(await _status_of(stub.ListJobs(request_, metadata=_auth(api_key))))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in err.field_violations] == [field]
    assert await count_jobs(db) == before


async def test_a_cancel_reason_with_a_nul_is_refused_and_the_job_stays_as_it_was(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    job = (await client.submit_request(_request(delay_s=3600))).job
    history = await job_history(db, job.id)
    for reason, field in (("because\x00", "reason"), ("r" * 1025, "reason")):
        with pytest.raises(InvalidArgument) as err:
            await client.cancel(job.id, reason)
        assert [f for f, _ in err.value.field_violations] == [field]
    assert (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_SCHEDULED
    assert await job_history(db, job.id) == history
    await client.cancel(job.id, "tidy up")


async def test_bad_watch_requests_are_named_and_leave_the_job_as_it_was(
    stack: Stack, client: ConveyorClient, db: AsyncEngine, api_key: str
) -> None:
    job = (await client.submit_request(_request(delay_s=3600))).job
    before, history = await count_jobs(db), await job_history(db, job.id)
    huge = Duration(seconds=2**62)
    mixed = Duration(seconds=5, nanos=-5)
    cases: list[tuple[str, events_pb2.WatchJobRequest | events_pb2.WatchJobsRequest]] = [
        ("progress_interval", events_pb2.WatchJobRequest(id=job.id, progress_interval=huge)),
        ("progress_interval", events_pb2.WatchJobRequest(id=job.id, progress_interval=mixed)),
        ("progress_interval", events_pb2.WatchJobsRequest(ids=[job.id], progress_interval=huge)),
        ("labels['team']", events_pb2.WatchJobsRequest(labels={"team": "a\x00"})),
        ("labels['t\\x00']", events_pb2.WatchJobsRequest(labels={"t\x00": "a"})),
    ]
    async with grpc.aio.insecure_channel(stack.notifier) as channel:
        stub = events_pb2_grpc.JobEventsStub(channel)
        for field, request_ in cases:
            method = (
                stub.WatchJob
                if isinstance(request_, events_pb2.WatchJobRequest)
                else stub.WatchJobs
            )
            call = method(request_, metadata=_auth(api_key), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in call:
                    pass
            err = error_from_rpc(raised.value)
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (field, err)
            assert [f for f, _ in err.field_violations] == [field]
    assert await count_jobs(db) == before
    assert await job_history(db, job.id) == history
    await client.cancel(job.id)


def _methods(service: ServiceDescriptor) -> list[tuple[str, bool]]:
    return [(f"/{service.full_name}/{m.name}", m.server_streaming) for m in service.methods]


RAW_TARGETS = [
    ("gateway", path, streaming)
    for path, streaming in _methods(jobs_pb2.DESCRIPTOR.services_by_name["JobService"])
] + [
    ("notifier", path, streaming)
    for path, streaming in _methods(events_pb2.DESCRIPTOR.services_by_name["JobEvents"])
]


@pytest.mark.parametrize(
    ("service", "path", "streaming"), RAW_TARGETS, ids=[p for _, p, _ in RAW_TARGETS]
)
async def test_a_body_that_is_not_protobuf_is_invalid_argument(
    stack: Stack, db: AsyncEngine, api_key: str, service: str, path: str, streaming: bool
) -> None:
    before = await count_jobs(db)
    target = stack.gateway if service == "gateway" else stack.notifier
    async with grpc.aio.insecure_channel(target) as channel:
        for body in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x0a\x05ab"):
            if streaming:
                call = channel.unary_stream(path)(body, metadata=_auth(api_key), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in call:
                        pass
            else:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await channel.unary_unary(path)(body, metadata=_auth(api_key), timeout=10)
            err = error_from_rpc(raised.value)
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (body, err)
            assert [f for f, _ in err.field_violations] == ["request"]
    assert await count_jobs(db) == before
