"""The worker's rules: which failures retry, how long it waits, what a job message is,
how it reads a stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import anthropic
import httpx2
import pytest
from anthropic._streaming import SSEDecoder

from conveyor.bus.broker import JobMessage
from conveyor.core.config import Settings
from conveyor.core.lifecycle import backoff_s
from conveyor.db.engine import retry_transient
from conveyor.llm.provider import classify, sse_events
from services.worker.inflight import InFlight, lease_hold_s
from services.worker.runner import JobRunner


def _status_error(
    status: int, error_type: str, headers: dict[str, str] | None = None
) -> anthropic.APIStatusError:
    request = httpx2.Request("POST", "http://sim/v1/messages")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    body = {"type": "error", "error": {"type": error_type, "message": f"{error_type} happened"}}
    return anthropic.APIStatusError(f"{status}", response=response, body=body)


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (429, "rate_limit_error", True),
        (529, "overloaded_error", True),
        (500, "api_error", True),
        (503, "api_error", True),
        (400, "invalid_request_error", False),
        (401, "authentication_error", False),
        (403, "permission_error", False),
        (404, "not_found_error", False),
        (200, "overloaded_error", True),  # an error event in the middle of a stream
        (200, "invalid_request_error", False),
    ],
)
def test_provider_errors_are_sorted_into_transient_and_permanent(
    status: int, error_type: str, retryable: bool
) -> None:
    err = classify(_status_error(status, error_type))
    assert err.retryable is retryable
    assert err.code == error_type and err.http_status == status
    assert err.message == f"{error_type} happened"


def test_retry_after_is_read_from_the_response() -> None:
    err = classify(_status_error(429, "rate_limit_error", {"retry-after": "7"}))
    assert err.retry_after_s == 7.0


@pytest.mark.parametrize(
    "exc",
    [
        httpx2.RemoteProtocolError("peer closed connection"),
        anthropic.APIConnectionError(request=httpx2.Request("POST", "http://sim")),
        anthropic.APITimeoutError(request=httpx2.Request("POST", "http://sim")),
        TimeoutError(),
        ConnectionResetError(),
    ],
)
def test_dropped_streams_and_timeouts_are_transient(exc: BaseException) -> None:
    assert classify(exc).retryable


def test_the_jobs_own_timeout_is_reported_as_a_timeout() -> None:
    err = classify(TimeoutError())
    assert err.code == "timeout" and err.retryable


def test_backoff_grows_exponentially_with_full_jitter_within_the_cap() -> None:
    for attempt in range(1, 10):
        ceiling = min(60.0, 1.0 * 2 ** (attempt - 1))
        samples = [backoff_s(attempt, 1.0, 60.0, None) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling / 2  # jitter spreads over the whole range


def test_backoff_never_undercuts_the_providers_retry_after() -> None:
    assert all(backoff_s(1, 1.0, 60.0, 5.0) >= 5.0 for _ in range(100))


def test_a_job_message_round_trips_and_garbage_is_refused() -> None:
    msg = JobMessage(job_id=uuid.uuid4(), tenant="acme")
    assert JobMessage.decode(msg.encode()) == msg
    for body in (b"", b"\x00", b"{}", b'{"job_id": "nope", "tenant": "t"}', b"[1]"):
        with pytest.raises(ValueError):
            JobMessage.decode(body)


STREAMS = {
    "an answer": (
        b'event: message_start\ndata: {"type":"message_start"}\n\n'
        b'event: ping\ndata: {"type": "ping"}\n\n'
        b'event: content_block_delta\ndata: {"delta":{"text":"a b"}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    ),
    "CRLF line ends": b"event: a\r\ndata: 1\r\n\r\nevent: b\r\ndata: 2\r\n\r\n",
    "CR line ends": b"event: a\rdata: 1\r\revent: b\rdata: 2\r\r",
    "comments, unknown fields, no space after the colon": (
        b": t=123\nevent:a\nfoo: 7\ndata:x\n\n: only a comment\n\n"
    ),
    "data over several lines, no event name": b"data: one\ndata: two\ndata:\n\n",
    "an event cut off by the end": b"event: a\ndata: 1\n\nevent: b\ndata: 2",
}


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def _ours(data: bytes, size: int) -> list[tuple[str, bytes]]:
    return [event async for event in sse_events(_chunks(data, size))]


async def _sdks(data: bytes) -> list[tuple[str, bytes]]:
    return [
        (sse.event or "message", sse.data.encode())
        async for sse in SSEDecoder().aiter_bytes(_chunks(data, len(data)))
    ]


@pytest.mark.parametrize("name", list(STREAMS))
def test_stream_events_are_those_the_sdk_decodes_however_the_bytes_arrive(name: str) -> None:
    data = STREAMS[name]
    expected = asyncio.run(_sdks(data))
    assert expected, "the SDK finds events in every example"
    for size in range(1, len(data) + 1):  # every split, down to a byte at a time
        assert asyncio.run(_ours(data, size)) == expected, f"chunks of {size} bytes"


def test_a_worker_gives_up_an_unrenewed_lease_a_heartbeat_before_the_sweeper_may_take_it() -> None:
    assert lease_hold_s(lease_s=30, heartbeat_s=5) == 25
    assert lease_hold_s(lease_s=4, heartbeat_s=1) == 3
    assert lease_hold_s(lease_s=4, heartbeat_s=3) == 2, "never less than half the lease"


async def test_only_calls_whose_lease_was_not_renewed_in_time_are_aborted() -> None:
    runner = JobRunner(Settings(), cast(Any, None), cast(Any, None), cast(Any, None))
    never = asyncio.Event()
    stale = InFlight(job_id=uuid.uuid4(), lease=uuid.uuid4(), renewed_at=0.0)
    fresh = InFlight(job_id=uuid.uuid4(), lease=uuid.uuid4())
    for entry in (stale, fresh):
        entry.task = asyncio.create_task(never.wait())  # type: ignore[arg-type]
        runner.inflight[entry.job_id] = entry
    assert runner.abort_unrenewed(hold_s=60) == 1
    assert stale.lease_lost and not fresh.lease_lost
    await asyncio.sleep(0)
    assert stale.task is not None and stale.task.cancelled()
    assert fresh.task is not None and not fresh.task.done()
    assert runner.abort_unrenewed(hold_s=60) == 0, "an aborted call is aborted once"
    fresh.task.cancel()


async def test_database_operations_are_retried_while_the_database_is_away_and_only_then() -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("server closed the connection")
        return "done"

    assert await retry_transient(flaky, first_s=0.0) == "done" and len(calls) == 3

    async def refused() -> None:
        raise ValueError("not a database outage")

    with pytest.raises(ValueError):
        await retry_transient(refused, first_s=0.0)

    calls.clear()
    with pytest.raises(ConnectionError, match="while stopping"):
        await retry_transient(flaky, first_s=0.0, stopping=lambda: True)
    assert len(calls) == 1, "a stopping process does not wait for the database"
