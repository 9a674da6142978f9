"""Live job streams that never miss an event: WatchJob resumes exactly, through any
notifier, a slow reader is cut off and resumes, and WatchJobs follows many jobs."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from conveyor.client import ConveyorClient, NotFound
from conveyor.v1 import events_pb2, events_pb2_grpc, jobs_pb2
from devtools import devstack
from tests.conftest import TenantClient, eventually, finished
from tests.faults import FaultProxy
from tests.stack import Backing, Stack, free_port

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
TERMINAL = {
    jobs_pb2.JOB_STATUS_SUCCEEDED,
    jobs_pb2.JOB_STATUS_FAILED,
    jobs_pb2.JOB_STATUS_CANCELLED,
    jobs_pb2.JOB_STATUS_DEAD,
}


def slow(tokens: int, per_second: int, latency_ms: int = 100) -> dict[str, str]:
    """Labels that make the simulator stream `tokens` tokens at `per_second`."""
    return {
        "x-sim-tokens": str(tokens),
        "x-sim-tokens-per-second": str(per_second),
        "x-sim-latency-ms": str(latency_ms),
    }


SMALL_WINDOW = (("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0))
"""Channel options of a reader whose gRPC flow-control window stays small."""


@contextlib.asynccontextmanager
async def raw_stream(
    target: str,
    api_key: str,
    request: events_pb2.WatchJobRequest,
    options: tuple[tuple[str, int], ...] = (),
) -> AsyncIterator[grpc.aio.UnaryStreamCall]:
    """A WatchJob call with no client library in between (no resume, no filtering)."""
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = events_pb2_grpc.JobEventsStub(channel)
        call = stub.WatchJob(request, metadata=(("authorization", f"Bearer {api_key}"),))
        try:
            yield call
        finally:
            call.cancel()


def kind(event: events_pb2.JobEvent) -> str:
    return event.WhichOneof("payload") or ""


def numbered(events: list[events_pb2.JobEvent]) -> list[events_pb2.JobEvent]:
    """The events proper: status changes and token deltas (not snapshots, not progress)."""
    return [e for e in events if kind(e) in ("status_changed", "token_delta")]


def text_of(events: list[events_pb2.JobEvent], attempt: int | None = None) -> str:
    return "".join(
        e.token_delta.text
        for e in events
        if kind(e) == "token_delta" and (attempt is None or e.token_delta.attempt == attempt)
    )


def assert_in_order(events: list[events_pb2.JobEvent], after: int = 0) -> None:
    seqs = [e.sequence for e in numbered(events)]
    assert seqs == sorted(set(seqs)), "numbered events are strictly increasing"
    assert not seqs or seqs[0] > after, "nothing at or before the resume point"


async def read_until(
    events: AsyncIterator[events_pb2.JobEvent], deltas: int
) -> list[events_pb2.JobEvent]:
    """Events up to and including the `deltas`-th token delta."""
    seen: list[events_pb2.JobEvent] = []
    async for event in events:
        seen.append(event)
        if sum(1 for e in seen if kind(e) == "token_delta") >= deltas:
            break
    return seen


async def test_a_stream_killed_mid_job_resumes_with_exactly_the_missing_text(
    client: ConveyorClient,
) -> None:
    job = await client.submit(MODEL, "resume me", max_tokens=200, labels=slow(80, 60))
    first = await read_until(client.watch(job.id, resume=False), deltas=10)
    last = max(e.sequence for e in numbered(first))
    await asyncio.sleep(0.3)  # the job goes on while nobody watches

    rest = [e async for e in client.watch(job.id, after_sequence=last)]

    assert kind(rest[0]) == "snapshot"
    assert_in_order(rest, after=last)
    final = rest[-1]
    assert kind(final) == "status_changed"
    assert final.status_changed.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    done = await client.get(job.id)
    assert (
        text_of(first) + text_of(rest) == done.result_text == final.status_changed.job.result_text
    )
    assert done.usage.output_tokens == 80


async def test_a_watch_that_starts_mid_run_gets_the_text_so_far_then_the_rest(
    client: ConveyorClient,
) -> None:
    job = await client.submit(MODEL, "join late", max_tokens=200, labels=slow(60, 60))

    async def streaming() -> bool:
        return (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_RUNNING

    await eventually(streaming, within_s=20, every_s=0.05)
    await asyncio.sleep(0.3)
    events = [e async for e in client.watch(job.id)]

    assert events[0].snapshot.status == jobs_pb2.JOB_STATUS_RUNNING
    first = events[1]
    assert kind(first) == "token_delta", "the text so far comes first"
    assert first.sequence - first.token_delta.output_tokens == events[0].sequence, (
        "from the first delta of the running attempt"
    )
    assert_in_order(events, after=events[0].sequence)
    done = await client.get(job.id)
    assert text_of(events) == done.result_text


async def test_a_finished_job_gives_its_snapshot_and_terminal_event_then_closes(
    client: ConveyorClient, stack: Stack, api_key: str
) -> None:
    job = await client.wait((await client.submit(MODEL, "done", max_tokens=16)).id, 30)

    async with raw_stream(stack.notifier, api_key, events_pb2.WatchJobRequest(id=job.id)) as call:
        events = [e async for e in call]
        assert await call.code() == grpc.StatusCode.OK

    assert [kind(e) for e in events] == ["snapshot", "status_changed"]
    snapshot, terminal = events
    assert snapshot.snapshot.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert terminal.sequence == snapshot.sequence == job.sequence
    assert terminal.status_changed.previous == jobs_pb2.JOB_STATUS_RUNNING
    assert terminal.status_changed.job.result_text == job.result_text
    assert terminal.status_changed.job.usage.output_tokens == job.usage.output_tokens

    resumed_after_the_end = events_pb2.WatchJobRequest(id=job.id, after_sequence=job.sequence)
    async with raw_stream(stack.notifier, api_key, resumed_after_the_end) as call:
        assert [kind(e) async for e in call] == ["snapshot"], "nothing is sent twice"


async def test_resuming_from_the_start_replays_every_stored_change_in_order(
    client: ConveyorClient,
) -> None:
    job = await client.submit(
        MODEL,
        "flaky",
        max_tokens=32,
        max_attempts=3,
        labels={"x-sim-fail": "529", "x-sim-fail-attempts": "1"},
    )
    done = await client.wait(job.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.attempts == 2

    events = [e async for e in client.watch(job.id, after_sequence=1)]

    changes = [e.status_changed for e in events if kind(e) == "status_changed"]
    assert [(c.status, c.attempt) for c in changes] == [
        (jobs_pb2.JOB_STATUS_RUNNING, 1),
        (jobs_pb2.JOB_STATUS_SCHEDULED, 1),
        (jobs_pb2.JOB_STATUS_PENDING, 1),
        (jobs_pb2.JOB_STATUS_RUNNING, 2),
        (jobs_pb2.JOB_STATUS_SUCCEEDED, 2),
    ]
    failed_attempt = changes[1]
    assert failed_attempt.error.code == "overloaded_error" and failed_attempt.error.retryable
    assert not changes[2].HasField("error"), "only the failure carries the error"
    assert_in_order(events, after=1)


async def test_two_notifiers_serve_the_same_stream_and_a_resume_can_switch_between_them(
    client: ConveyorClient, stack: Stack, api_key: str
) -> None:
    # 10 s of streaming: the second notifier (a new process, slow to start on a busy
    # machine) is ready while the job still streams.
    job = await client.submit(MODEL, "two notifiers", max_tokens=500, labels=slow(400, 40))
    first = await read_until(client.watch(job.id, resume=False), deltas=8)
    last = max(e.sequence for e in numbered(first))

    # The second instance starts while the job streams: its own buffer misses the
    # beginning of the attempt, so it asks the worker for the text so far.
    second = stack.start_notifier("notifier-2")
    try:
        running = await client.get(job.id)
        assert running.status == jobs_pb2.JOB_STATUS_RUNNING, "the premise: still streaming"
        async with ConveyorClient(stack.gateway, second, api_key=api_key) as other:
            resumed = [e async for e in other.watch(job.id, after_sequence=last)]
            from_scratch = [e async for e in other.watch(job.id, after_sequence=1)]
    finally:
        stack.stop("notifier-2")
    again = [e async for e in client.watch(job.id, after_sequence=last)]

    done = await client.get(job.id)
    assert_in_order(resumed, after=last)
    assert text_of(first) + text_of(resumed) == done.result_text
    assert text_of(from_scratch) == done.result_text, "the finished attempt, still buffered"
    # Both instances number every event the same way.
    assert [e.sequence for e in numbered(resumed)][-1] == done.sequence
    assert text_of(again) == text_of(resumed)


async def test_a_slow_reader_is_cut_off_with_its_resume_point_and_resumes_exactly(
    client: ConveyorClient, stack: Stack, api_key: str
) -> None:
    # 6,000 events overflow a reader that reads none (its inbox holds 256, its window
    # little); 1,500 a second leave a reader that does read room to keep up on a busy
    # machine (at 3,000 a second, one in CI fell behind too).
    job = await client.submit(MODEL, "firehose", max_tokens=8000, labels=slow(6000, 1500, 300))
    # A reader that keeps up, on the same job at the same time (if this busy test process
    # starves it, it resumes where it was cut off: it still gets every token once).
    keeping_up = asyncio.create_task(_collect(client.watch(job.id)))

    request = events_pb2.WatchJobRequest(id=job.id)
    async with raw_stream(stack.notifier, api_key, request, SMALL_WINDOW) as call:
        received = [await call.read()]  # the snapshot; then stop reading for a while
        await client.wait(job.id, 60)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            while (event := await call.read()) is not grpc.aio.EOF:
                received.append(event)

    assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = _error_info(cut.value.trailing_metadata())
    assert info.reason == "WATCH_FELL_BEHIND"
    last = max(e.sequence for e in numbered(received))
    assert info.metadata["after_sequence"] == str(last), "cut off after what it was sent"
    assert_in_order(received)

    rest = [e async for e in client.watch(job.id, after_sequence=last)]
    done = await client.get(job.id)
    assert_in_order(rest, after=last)
    assert text_of(received) + text_of(rest) == done.result_text
    assert text_of(await keeping_up) == done.result_text, "the other reader was not held up"


async def _collect(events: AsyncIterator[events_pb2.JobEvent]) -> list[events_pb2.JobEvent]:
    return [e async for e in events]


def _error_info(trailers: grpc.aio.Metadata | None) -> error_details_pb2.ErrorInfo:
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError("no google.rpc.ErrorInfo in the status")


async def test_progress_reports_tokens_so_far_without_consuming_sequence_numbers(
    client: ConveyorClient,
) -> None:
    job = await client.submit(MODEL, "progress", max_tokens=200, labels=slow(60, 60))
    events = [e async for e in client.watch(job.id, progress_interval=timedelta(milliseconds=200))]

    reports = [e for e in events if kind(e) == "progress"]
    assert reports, "a running job reports its progress"
    assert all(r.progress.attempt == 1 for r in reports)
    tokens = [r.progress.output_tokens for r in reports]
    assert tokens == sorted(tokens) and tokens[-1] > 0
    for i, event in enumerate(events):
        if kind(event) == "progress":
            before = [e.sequence for e in numbered(events[:i])]
            assert event.sequence == (before[-1] if before else events[0].sequence)
    assert text_of(events) == (await client.get(job.id)).result_text


async def test_watch_jobs_follows_a_list_of_jobs_until_all_are_finished(
    client: ConveyorClient,
) -> None:
    jobs = [
        await client.submit(MODEL, f"batch {i}", max_tokens=32, labels=slow(20, 100))
        for i in range(3)
    ]
    failing = await client.submit(MODEL, "bad", max_tokens=8, labels={"x-sim-fail": "400"})
    ids = [j.id for j in [*jobs, failing]]

    events = [e async for e in client.watch_jobs(ids)]

    assert [e.job_id for e in events[: len(ids)]] == ids, "a snapshot of each job first"
    assert all(kind(e) == "snapshot" for e in events[: len(ids)])
    assert not any(kind(e) == "token_delta" for e in events), "no tokens unless asked"
    for job_id in ids:
        mine = [e for e in events if e.job_id == job_id]
        assert_in_order(mine, after=mine[0].sequence - 1)
        final = await client.get(job_id)
        last_status = [e for e in mine if kind(e) in ("snapshot", "status_changed")][-1]
        status = (
            last_status.status_changed.status
            if kind(last_status) == "status_changed"
            else last_status.snapshot.status
        )
        assert status == final.status and status in TERMINAL
    assert (await client.get(failing.id)).status == jobs_pb2.JOB_STATUS_FAILED


async def test_watch_jobs_by_label_shows_matching_jobs_as_they_appear(
    client: ConveyorClient,
) -> None:
    board = uuid.uuid4().hex
    seen: list[events_pb2.JobEvent] = []
    terminal: set[str] = set()
    ours: list[str] = []

    async def follow() -> None:
        async for event in client.watch_jobs(labels={"board": board}, token_deltas=True):
            seen.append(event)
            if kind(event) == "status_changed" and event.status_changed.status in TERMINAL:
                terminal.add(event.job_id)
                if len(ours) == 2 and terminal >= set(ours):
                    return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.5)  # the stream is open before the jobs exist
    other = await client.submit(MODEL, "not on the board", max_tokens=8, labels={"board": "x"})
    for i in range(2):
        ours.append(
            (
                await client.submit(
                    MODEL,
                    f"on the board {i}",
                    max_tokens=64,
                    labels={"board": board, **slow(20, 80)},
                )
            ).id
        )
    await asyncio.wait_for(task, 30)

    assert {e.job_id for e in seen} == set(ours), "only the jobs carrying the label"
    assert other.id not in {e.job_id for e in seen}
    for job_id in ours:
        mine = [e for e in seen if e.job_id == job_id]
        assert kind(mine[0]) == "snapshot", "a job new to the stream starts with its snapshot"
        assert_in_order(mine, after=mine[0].sequence)
        done = await client.get(job_id)
        assert text_of(mine) == done.result_text


async def test_watching_unknown_or_another_tenants_jobs_is_not_found(
    client: ConveyorClient, tenant_client: TenantClient
) -> None:
    mine = await client.submit(MODEL, "mine", max_tokens=8)
    with pytest.raises(NotFound):
        async for _ in client.watch_jobs([mine.id, str(uuid.uuid4())]):
            pass
    async with tenant_client("watchers-b") as other:
        with pytest.raises(NotFound):
            async for _ in other.watch_jobs([mine.id]):
                pass
        stranger = await _within(other.watch_jobs(labels={"suite": "x"}), 0.5)
    assert all(e.tenant == "watchers-b" for e in stranger)
    assert (await client.wait(mine.id, 30)).status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def _within(
    events: AsyncIterator[events_pb2.JobEvent], seconds: float
) -> list[events_pb2.JobEvent]:
    """The events that arrive within `seconds` (for streams that do not end)."""
    seen: list[events_pb2.JobEvent] = []

    async def gather() -> None:
        async for event in events:
            seen.append(event)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(gather(), seconds)
    return seen


@contextlib.contextmanager
def notifier_with_lagging_bus(stack: Stack, backing: Backing) -> Iterator[tuple[str, FaultProxy]]:
    """One more notifier, reading the bus through a proxy the test can stall (its
    Postgres link is direct): its address and the proxy."""
    url = urlsplit(backing.amqp_url)
    with FaultProxy(url.hostname or "127.0.0.1", url.port or 5672) as proxy:
        proxied = urlunsplit(
            url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{proxy.port}")
        )
        port = free_port()
        service = devstack.Service(
            "notifier-lag",
            "services.notifier",
            "grpc",
            f"{stack.settings.notifier_host}:{port}",
            "JobEvents",
        )
        stack.start_extra(
            service,
            CONVEYOR_AMQP_URL=proxied,
            CONVEYOR_NOTIFIER_PORT=str(port),
            CONVEYOR_NOTIFIER_METRICS_PORT="0",
        )
        try:
            yield service.address, proxy
        finally:
            proxy.restore()
            stack.stop("notifier-lag")


def assert_whole_attempt(events: list[events_pb2.JobEvent], done: jobs_pb2.Job) -> None:
    """The watch got every event of the job's last attempt once, in order, with no number
    missing: deltas numbered from its RUNNING event, the terminal change right after the
    last one, and the deltas rebuild the stored result."""
    assert_in_order(events)
    mine = numbered(events)
    running = [
        e
        for e in mine
        if kind(e) == "status_changed"
        and e.status_changed.status == jobs_pb2.JOB_STATUS_RUNNING
        and e.status_changed.attempt == done.attempts
    ]
    assert running, "the attempt's RUNNING event"
    deltas = [e for e in mine if kind(e) == "token_delta" and e.sequence > running[0].sequence]
    assert all(e.sequence - e.token_delta.output_tokens == running[0].sequence for e in deltas)
    final = mine[-1]
    assert kind(final) == "status_changed" and final.status_changed.status == done.status
    assert final.sequence == done.sequence
    assert deltas and deltas[-1].sequence == final.sequence - 1, (
        f"the last deltas before {final.sequence} arrived (got up to {deltas[-1].sequence})"
    )
    assert deltas[-1].token_delta.output_tokens == done.usage.output_tokens
    assert text_of(deltas) == done.result_text == final.status_changed.job.result_text


async def test_watches_get_the_last_deltas_even_when_the_bus_brings_them_after_postgres(
    client: ConveyorClient, stack: Stack, backing: Backing, api_key: str
) -> None:
    # The notifier re-reads Postgres every second when its streams are quiet
    # (CONVEYOR_NOTIFIER_IDLE_CHECK_S=1); its bus stalls while the jobs finish, so those
    # checks find them finished before their last deltas arrive. The jobs' terminal
    # changes must still come after every delta.
    with notifier_with_lagging_bus(stack, backing) as (address, proxy):
        async with ConveyorClient(stack.gateway, address, api_key=api_key) as lagging:
            jobs = [
                await lagging.submit(MODEL, f"lag {i}", max_tokens=100, labels=slow(40, 20))
                for i in range(12)
            ]
            received: dict[str, list[events_pb2.JobEvent]] = {j.id: [] for j in jobs}

            async def watch(job_id: str) -> None:
                request = events_pb2.WatchJobRequest(id=job_id, after_sequence=1)
                async with raw_stream(address, api_key, request) as call:
                    async for event in call:
                        received[job_id].append(event)
                    assert await call.code() == grpc.StatusCode.OK

            watches = [asyncio.create_task(watch(j.id)) for j in jobs]

            async def all_streaming() -> bool:
                return all(
                    sum(1 for e in seen if kind(e) == "token_delta") >= 3
                    for seen in received.values()
                )

            await eventually(all_streaming, within_s=60, every_s=0.05)
            proxy.stall()
            try:
                done = [await finished(lagging, j.id, within_s=60) for j in jobs]
                await asyncio.sleep(2.5)  # idle checks read the finished jobs meanwhile
            finally:
                proxy.restore()
            await asyncio.wait_for(asyncio.gather(*watches), 60)

    for job in done:
        assert job.status == jobs_pb2.JOB_STATUS_SUCCEEDED
        assert_whole_attempt(received[job.id], job)
