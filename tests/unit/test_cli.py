"""Unit tests of the client and the CLI that need no RabbitMQ, Postgres or Conveyor services.

Argument parsing and request building are pure; the client and the CLI's
commands run against tiny in-process gRPC servers (real gRPC over 127.0.0.1 on a
free port) whose handlers stand in for the gateway and the notifier.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from conveyor.cli import (
    build_parser,
    build_submit_request,
    exit_code_for,
    format_table,
    main,
    parse_key_value,
    stream_job,
)
from conveyor.client import (
    TERMINAL_STATUSES,
    ConveyorClient,
    ConveyorError,
    InvalidArgument,
    NotFound,
    job_status_name,
    job_status_value,
)
from conveyor.v1 import events_pb2, jobs_pb2

JOB_ID = "0b9f6a4e-8d4c-4d59-9a55-1f0f5b7e1a01"


# --------------------------------------------------------------------------- pure helpers


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_parse_key_value() -> None:
    assert parse_key_value("a=b") == ("a", "b")
    assert parse_key_value("url=http://x/?q=1") == ("url", "http://x/?q=1")
    assert parse_key_value("empty=") == ("empty", "")
    for bad in ("novalue", "=b", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_key_value(bad)


def test_label_flag_is_repeatable_and_validated(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("submit", "hi", "--label", "a=b", "--label", "team=search")
    assert dict(args.label) == {"a": "b", "team": "search"}
    with pytest.raises(SystemExit) as exc:
        parse("submit", "hi", "--label", "oops")
    assert exc.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_submit_defaults() -> None:
    req = build_submit_request(parse("submit", "Hello"))
    assert req.model == "claude-sonnet-4-5"
    assert req.max_tokens == 256
    assert [(m.role, m.content) for m in req.messages] == [("user", "Hello")]
    assert not req.HasField("temperature")
    assert not req.HasField("delay")
    assert not req.HasField("timeout")
    assert req.priority == 0 and req.lane == "" and req.max_attempts == 0
    assert dict(req.labels) == {}


def test_submit_builds_the_full_request() -> None:
    args = parse(
        "submit",
        "Summarise this",
        "--model",
        "claude-haiku-4-5",
        "--max-tokens",
        "512",
        "--system",
        "Be brief.",
        "--temperature",
        "0.2",
        "--stop",
        "END",
        "--priority",
        "7",
        "--lane",
        "interactive",
        "--idempotency-key",
        "order-42",
        "--delay",
        "1.5",
        "--timeout",
        "30",
        "--max-attempts",
        "5",
        "--label",
        "a=b",
        "--label",
        "team=search",
        "--meta",
        "user_id=u1",
        "--webhook",
        "https://example.com/hook",
        "--watch",
    )
    req = build_submit_request(args)
    assert req.model == "claude-haiku-4-5"
    assert req.max_tokens == 512
    assert req.system == "Be brief."
    assert req.HasField("temperature") and req.temperature == pytest.approx(0.2)
    assert list(req.stop_sequences) == ["END"]
    assert req.priority == 7
    assert req.lane == "interactive"
    assert req.idempotency_key == "order-42"
    assert req.delay.ToMilliseconds() == 1500
    assert req.timeout.seconds == 30
    assert req.max_attempts == 5
    assert dict(req.labels) == {"a": "b", "team": "search"}
    assert dict(req.metadata) == {"user_id": "u1"}
    assert req.webhook_url == "https://example.com/hook"
    assert args.watch is True


def test_submit_reads_the_prompt_from_stdin() -> None:
    req = build_submit_request(parse("submit", "-"), io.StringIO("from stdin\n"))
    assert req.messages[0].content == "from stdin\n"


def test_negative_delay_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse("submit", "hi", "--delay", "-1")


def test_connection_flags_before_or_after_the_command() -> None:
    assert parse("--gateway", "h:1", "get", "x").gateway == "h:1"
    assert parse("get", "x", "--gateway", "h:2").gateway == "h:2"
    args = parse("get", "x")
    assert args.gateway is None and args.notifier is None and args.tls is False


def test_list_status_filters() -> None:
    args = parse("list", "--status", "failed,dead", "--status", "running", "--limit", "5")
    assert [s for group in args.status for s in group] == [
        jobs_pb2.JOB_STATUS_FAILED,
        jobs_pb2.JOB_STATUS_DEAD,
        jobs_pb2.JOB_STATUS_RUNNING,
    ]
    with pytest.raises(SystemExit):
        parse("list", "--status", "bogus")


def test_no_command_prints_help() -> None:
    assert main([]) == 2


def test_job_status_names() -> None:
    assert job_status_name(jobs_pb2.JOB_STATUS_SUCCEEDED) == "succeeded"
    assert job_status_name(jobs_pb2.JOB_STATUS_DEAD) == "dead"
    assert job_status_name(jobs_pb2.JOB_STATUS_UNSPECIFIED) == "unspecified"
    assert job_status_name(99) == "99"
    assert job_status_value("running") == jobs_pb2.JOB_STATUS_RUNNING
    assert job_status_value("JOB_STATUS_FAILED") == jobs_pb2.JOB_STATUS_FAILED
    assert job_status_value(" Cancelled ") == jobs_pb2.JOB_STATUS_CANCELLED
    with pytest.raises(ValueError):
        job_status_value("finished")
    assert {job_status_name(s) for s in TERMINAL_STATUSES} == {
        "succeeded",
        "failed",
        "cancelled",
        "dead",
    }


def test_exit_codes() -> None:
    assert exit_code_for(jobs_pb2.JOB_STATUS_SUCCEEDED) == 0
    assert exit_code_for(jobs_pb2.JOB_STATUS_FAILED) == 1
    assert exit_code_for(jobs_pb2.JOB_STATUS_DEAD) == 1
    assert exit_code_for(jobs_pb2.JOB_STATUS_CANCELLED) == 2


def test_format_table() -> None:
    created = Timestamp(seconds=1_700_000_000)
    job = jobs_pb2.Job(
        id=JOB_ID,
        status=jobs_pb2.JOB_STATUS_RUNNING,
        lane="bulk",
        priority=3,
        model="claude-sonnet-4-5",
        created_at=created,
        attempts=1,
        max_attempts=3,
    )
    lines = format_table([job]).splitlines()
    assert lines[0].split()[:2] == ["ID", "STATUS"]
    assert lines[1].split() == [
        JOB_ID,
        "running",
        "bulk",
        "3",
        "claude-sonnet-4-5",
        "2023-11-14",
        "22:13:20",
        "1/3",
    ]


# --------------------------------------------------------------------------- fake servers


def final_job(job_id: str = JOB_ID) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id=job_id,
        status=jobs_pb2.JOB_STATUS_SUCCEEDED,
        model="claude-sonnet-4-5",
        result_text="Hello",
        stop_reason="end_turn",
        attempts=1,
        max_attempts=3,
        usage=jobs_pb2.Usage(input_tokens=12, output_tokens=2),
        created_at=Timestamp(seconds=1_700_000_000),
    )


def events(job_id: str = JOB_ID) -> list[events_pb2.JobEvent]:
    """A run: snapshot (running), two deltas, the terminal transition."""
    return [
        events_pb2.JobEvent(
            job_id=job_id,
            sequence=2,
            snapshot=jobs_pb2.Job(id=job_id, status=jobs_pb2.JOB_STATUS_RUNNING),
        ),
        events_pb2.JobEvent(
            job_id=job_id, sequence=3, token_delta=events_pb2.TokenDelta(text="Hel", attempt=1)
        ),
        events_pb2.JobEvent(
            job_id=job_id, sequence=4, token_delta=events_pb2.TokenDelta(text="lo", attempt=1)
        ),
        events_pb2.JobEvent(
            job_id=job_id,
            sequence=5,
            status_changed=events_pb2.StatusChanged(
                status=jobs_pb2.JOB_STATUS_SUCCEEDED,
                previous=jobs_pb2.JOB_STATUS_RUNNING,
                attempt=1,
                job=final_job(job_id),
            ),
        ),
    ]


@dataclass
class Recorded:
    """What the fake servers saw."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    watch_requests: list[events_pb2.WatchJobRequest] = field(default_factory=list)
    drop_first_watch: bool = False


def _metadata(context: Any) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}


def invalid_argument_status() -> grpc.Status:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="id", description="is not a UUID")
        ]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="id: is not a UUID")
    status.details.add().Pack(bad)
    return rpc_status.to_status(status)


def _handlers(get: Any, submit: Any, watch: Any) -> list[grpc.GenericRpcHandler]:
    jobs = grpc.method_handlers_generic_handler(
        "conveyor.v1.JobService",
        {
            "GetJob": grpc.unary_unary_rpc_method_handler(
                get,
                request_deserializer=jobs_pb2.GetJobRequest.FromString,
                response_serializer=jobs_pb2.GetJobResponse.SerializeToString,
            ),
            "SubmitJob": grpc.unary_unary_rpc_method_handler(
                submit,
                request_deserializer=jobs_pb2.SubmitJobRequest.FromString,
                response_serializer=jobs_pb2.SubmitJobResponse.SerializeToString,
            ),
        },
    )
    job_events = grpc.method_handlers_generic_handler(
        "conveyor.v1.JobEvents",
        {
            "WatchJob": grpc.unary_stream_rpc_method_handler(
                watch,
                request_deserializer=events_pb2.WatchJobRequest.FromString,
                response_serializer=events_pb2.JobEvent.SerializeToString,
            )
        },
    )
    return [jobs, job_events]


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


# --------------------------------------------------------------------------- client


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


# --------------------------------------------------------------------------- CLI commands


@pytest.fixture
def sync_fake() -> Iterator[str]:
    """A threaded gRPC server, for commands that run their own event loop (asyncio.run)."""

    def get_job(request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext) -> Any:
        if request.id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "job missing not found")
        return jobs_pb2.GetJobResponse(job=final_job(request.id))

    def submit_job(request: jobs_pb2.SubmitJobRequest, context: grpc.ServicerContext) -> Any:
        return jobs_pb2.SubmitJobResponse(
            job=jobs_pb2.Job(id=JOB_ID, status=jobs_pb2.JOB_STATUS_PENDING)
        )

    def watch_job(
        request: events_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[events_pb2.JobEvent]:
        yield from events(request.id)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(_handlers(get_job, submit_job, watch_job))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_cli_server_error_exits_3(sync_fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gateway", sync_fake, "get", "missing"]) == 3
    assert capsys.readouterr().err.strip() == "error: NOT_FOUND: job missing not found"


def test_cli_get_prints_json(sync_fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", JOB_ID, "--gateway", sync_fake]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["id"] == JOB_ID
    assert doc["status"] == "JOB_STATUS_SUCCEEDED"
    assert doc["result_text"] == "Hello"


def test_cli_submit_prints_the_id(sync_fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gateway", sync_fake, "submit", "Hi"]) == 0
    assert capsys.readouterr().out.strip() == JOB_ID


def test_cli_submit_watch_streams_tokens(
    sync_fake: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--gateway", sync_fake, "--notifier", sync_fake, "submit", "Hi", "--watch"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello\n"
    assert JOB_ID in captured.err


def test_cli_unreachable_gateway_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gateway", "127.0.0.1:1", "get", JOB_ID]) == 3
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")
