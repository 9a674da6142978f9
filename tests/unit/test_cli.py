"""Unit tests of the client and the CLI that need no RabbitMQ, Postgres or Conveyor services.

Argument parsing and request building are pure; the client and the CLI's
commands run against tiny in-process gRPC servers (real gRPC over 127.0.0.1 on a
free port) whose handlers stand in for the gateway and the notifier.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import subprocess
import sys
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
    build_submit_request,
    exit_code_for,
    format_table,
    main,
    parse_args,
    parse_key_value,
    stream_job,
)
from conveyor.cli.base import exit_code_of_error
from conveyor.cli.jobs import LaneRates, lanes_view
from conveyor.cli.ops import Phase, apply_in_batches
from conveyor.cli.output import message_dict, plain, stats_tables
from conveyor.client import (
    TERMINAL_STATUSES,
    ConveyorClient,
    ConveyorError,
    InvalidArgument,
    NotFound,
    job_status_name,
    job_status_value,
)
from conveyor.client.sync import SyncConveyorClient
from conveyor.v1 import events_pb2, jobs_pb2, operations_pb2

JOB_ID = "0b9f6a4e-8d4c-4d59-9a55-1f0f5b7e1a01"


# --------------------------------------------------------------------------- pure helpers


def parse(*argv: str) -> argparse.Namespace:
    return parse_args(list(argv))


def test_parse_key_value() -> None:
    assert parse_key_value("a=b") == ("a", "b")
    assert parse_key_value("url=http://x/?q=1") == ("url", "http://x/?q=1")
    assert parse_key_value("empty=") == ("empty", "")
    for bad in ("novalue", "=b", ""):
        with pytest.raises(ValueError):
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
    assert [s for group in args.statuses for s in group] == [
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
        if request.id == "bad":
            context.abort_with_status(invalid_argument_status())
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


def test_cli_refusal_exits_4(sync_fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gateway", sync_fake, "get", "missing"]) == 4
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


# --------------------------------------------------------------------------- exit codes, output


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 2),
        (grpc.StatusCode.OUT_OF_RANGE, 2),
        (grpc.StatusCode.UNAVAILABLE, 3),
        (grpc.StatusCode.INTERNAL, 3),
        (grpc.StatusCode.UNKNOWN, 3),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 3),
        (grpc.StatusCode.NOT_FOUND, 4),
        (grpc.StatusCode.PERMISSION_DENIED, 4),
        (grpc.StatusCode.UNAUTHENTICATED, 4),
        (grpc.StatusCode.FAILED_PRECONDITION, 4),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 4),
    ],
)
def test_invalid_input_exits_2_a_server_fault_3_a_refusal_4(
    code: grpc.StatusCode, exit_code: int
) -> None:
    assert exit_code_of_error(ConveyorError(code, "x")) == exit_code


def test_cli_invalid_argument_from_the_server_exits_2(
    sync_fake: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--gateway", sync_fake, "get", "bad"]) == 2
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: ")


def test_a_bad_flag_value_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--status", "finished"]) == 2
    assert "--status" in capsys.readouterr().err
    assert main(["submit", "hi", "--priority", "12"]) == 2
    assert main(["no-such-command"]) == 2


def test_json_of_a_message_keeps_numbers_as_numbers() -> None:
    stats = jobs_pb2.GetStatsResponse(
        counts={"pending": 3, "succeeded": 12_000_000_000},
        lanes=[jobs_pb2.LaneStats(lane="bulk", counts={"pending": 3}, queue_depth=2)],
        dead_letter_depth=1,
        tokens=jobs_pb2.Usage(input_tokens=10, output_tokens=20),
        tenant="acme",
    )
    stats.run_time_p50.FromMilliseconds(1500)
    doc = message_dict(stats, defaults=True)
    assert doc["counts"] == {"pending": 3, "succeeded": 12_000_000_000}
    assert doc["lanes"] == [{"lane": "bulk", "counts": {"pending": 3}, "queue_depth": 2}]
    assert doc["dead_letter_depth"] == 1 and doc["run_time_p50"] == 1.5
    assert doc["tokens"]["input_tokens"] == 10 and doc["tokens"]["output_tokens"] == 20


def test_stats_tables_show_each_lane_and_status_with_the_totals() -> None:
    stats = jobs_pb2.GetStatsResponse(
        counts={"pending": 4, "running": 1, "succeeded": 1234},
        lanes=[
            jobs_pb2.LaneStats(lane="interactive", counts={"running": 1}, queue_depth=0),
            jobs_pb2.LaneStats(
                lane="bulk", counts={"pending": 4, "succeeded": 1234}, queue_depth=4
            ),
        ],
        dead_letter_depth=2,
        tokens=jobs_pb2.Usage(input_tokens=5000, output_tokens=700),
        tenant="acme",
    )
    stats.run_time_p95.FromSeconds(75)
    lines = plain(*stats_tables(stats)).splitlines()
    assert lines[0].strip() == "Jobs (tenant acme)"
    assert lines[1].split()[:5] == ["LANE", "QUEUED", "PENDING", "SCHEDULED", "RUNNING"]
    assert lines[3].split() == ["bulk", "4", "4", "0", "0", "1,234", "0", "0", "0"]
    assert lines[4].split() == ["all", "4", "4", "0", "1", "1,234", "0", "0", "0"]
    summary = lines[-1].split()
    assert summary[:3] == ["2", "-", "1m15s"] and summary[3:5] == ["5,000", "700"]


def test_stats_tables_show_cost_and_cache_savings_per_tenant_model_and_lane() -> None:
    stats = jobs_pb2.GetStatsResponse(
        tenant="acme",
        costs=[
            jobs_pb2.CostStats(
                tenant="acme",
                model="claude-sonnet-4-5",
                lane="default",
                jobs=12,
                unpriced_jobs=0,
                cost_micros=1_234_567,
                cache_read_ratio=0.25,
                cache_saved_micros=90_000,
            ),
            jobs_pb2.CostStats(
                tenant="acme", model="claude-new", lane="bulk", jobs=3, unpriced_jobs=3
            ),
        ],
    )
    lines = plain(*stats_tables(stats)).splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["TENANT", "MODEL"])
    assert lines[header + 1].split() == [
        "acme",
        "claude-sonnet-4-5",
        "default",
        "12",
        "0",
        "$1.234567",
        "25.0%",
        "$0.090000",
    ]
    assert lines[header + 2].split()[3:5] == ["3", "3"], "unpriced jobs are counted as such"


async def test_bulk_actions_go_in_batches_until_the_phase_is_empty() -> None:
    """Each batch's jobs leave the filter; the loop stops when fewer than asked match."""
    waiting = 7
    calls: list[tuple[int, bool]] = []

    async def act(limit: int, dry_run: bool, phase: Phase) -> operations_pb2.BulkActionResponse:
        nonlocal waiting
        calls.append((limit, dry_run))
        matched = min(limit, waiting)
        if not dry_run:
            waiting -= matched
        return operations_pb2.BulkActionResponse(
            matched=matched, changed=0 if dry_run else matched, dry_run=dry_run
        )

    done = await apply_in_batches("cancelled", [Phase()], act, limit=0, batch=3, yes=True)
    assert done["matched"] == 7 and done["changed"] == 7 and waiting == 0
    assert calls == [(10_000, True), (3, False), (3, False), (3, False)]

    waiting, calls[:] = 7, []
    done = await apply_in_batches("cancelled", [Phase()], act, limit=5, batch=3, yes=True)
    assert done["changed"] == 5 and waiting == 2, "the limit holds over batches"
    assert calls == [(5, True), (3, False), (2, False)]


def test_the_sync_client_has_every_method_of_the_async_client() -> None:
    public = {n for n in vars(ConveyorClient) if not n.startswith("_")}
    assert public - set(dir(SyncConveyorClient)) == set()


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


def test_lane_rates_are_jobs_per_second_between_two_samples() -> None:
    def sample(pending: int, done: int) -> jobs_pb2.GetStatsResponse:
        counts = {"pending": pending, "succeeded": done}
        return jobs_pb2.GetStatsResponse(lanes=[jobs_pb2.LaneStats(lane="bulk", counts=counts)])

    rates = LaneRates()
    rates.sample(sample(10, 0), now=100.0)
    assert rates.done_per_s == {}, "no rate from one sample"
    rates.sample(sample(14, 6), now=102.0)
    assert rates.done_per_s == {"bulk": 3.0} and rates.new_per_s == {"bulk": 5.0}
    assert "3.0" in plain(lanes_view(sample(14, 6), rates, {"bulk": "all tenants"}))
