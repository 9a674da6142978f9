"""The HTTP/JSON API's Server-Sent Events against a real stack: equal to WatchJob, with
sequence ids (or a cursor over many jobs) that resume exactly, a slow reader cut off
with where to resume, and refusals as plain JSON errors before the stream starts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from conveyor.client import ConveyorClient
from conveyor.v1 import events_pb2
from services.http.transcode import to_json
from tests.integration.http_api import MODEL
from tests.stack import Stack

pytestmark = pytest.mark.integration


def slow(tokens: int, per_second: int, latency_ms: int = 100) -> dict[str, str]:
    """Labels that make the simulator stream `tokens` tokens at `per_second`."""
    return {
        "x-sim-tokens": str(tokens),
        "x-sim-tokens-per-second": str(per_second),
        "x-sim-latency-ms": str(latency_ms),
    }


@dataclass
class Sse:
    """One Server-Sent Events message."""

    id: str | None
    event: str | None
    data: Any


async def sse_messages(response: aiohttp.ClientResponse) -> AsyncIterator[Sse]:
    """The messages of an SSE answer, as a browser's EventSource parses them."""
    event_id: str | None = None
    event: str | None = None
    data: list[str] = []
    while line := await response.content.readline():
        text = line.decode().rstrip("\n")
        if text.startswith(":") or text.startswith("retry:"):
            continue
        if text == "":
            if data:
                yield Sse(event_id, event, json.loads("\n".join(data)))
            event, data = None, []
            continue
        name, _, value = text.partition(": ")
        if name == "id":
            event_id = value
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)


def events_only(messages: list[Sse]) -> list[Sse]:
    """The job events (no progress reports, no end marker)."""
    return [m for m in messages if m.event is None and "progress" not in m.data]


def text_of(messages: list[Sse]) -> str:
    return "".join(
        m.data["tokenDelta"]["text"]
        for m in messages
        if m.event is None
        and "tokenDelta" in m.data
        and m.data["tokenDelta"]["kind"] == "DELTA_KIND_TEXT"
    )


async def _sse(
    http: aiohttp.ClientSession, path: str, headers: dict[str, str] | None = None
) -> list[Sse]:
    async with http.get(path, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        return [m async for m in sse_messages(r)]


async def test_job_events_over_sse_are_what_watch_job_sends_with_sequence_numbers_as_ids(
    http: aiohttp.ClientSession, client: ConveyorClient
) -> None:
    # Run a little later, so that both streams are open before it starts: a stream that
    # opens mid-run gets the deltas so far caught up, which may be cut differently.
    job = await client.submit(
        MODEL, "stream me", max_tokens=300, labels=slow(120, 200, 500), delay=timedelta(seconds=3)
    )
    over_http, over_grpc = await asyncio.gather(
        _sse(http, f"/v1/jobs/{job.id}/events"),
        _collect(client.watch(job.id, resume=False)),
    )
    assert over_http[-1].event == "end"
    grpc_events = [to_json(e) for e in over_grpc if not e.HasField("progress")]
    assert [m.data for m in events_only(over_http)] == grpc_events
    for m in events_only(over_http)[1:]:  # the snapshot's id is its sequence too
        assert m.id == m.data["sequence"]
    assert over_http[0].data["snapshot"]["id"] == job.id
    done = await client.get(job.id)
    assert text_of(over_http) == done.result_text


async def _collect(events: AsyncIterator[events_pb2.JobEvent]) -> list[events_pb2.JobEvent]:
    return [e async for e in events]


async def test_last_event_id_resumes_exactly_after_the_last_event_received(
    http: aiohttp.ClientSession, client: ConveyorClient
) -> None:
    job = await client.submit(MODEL, "resume me", max_tokens=300, labels=slow(150, 100, 300))
    first: list[Sse] = []
    async with http.get(f"/v1/jobs/{job.id}/events") as r:
        async for m in sse_messages(r):
            first.append(m)
            if len([x for x in first if "tokenDelta" in x.data]) >= 5:
                break  # the reader goes away mid-stream
    last = first[-1].id
    assert last is not None
    rest = await _sse(http, f"/v1/jobs/{job.id}/events", {"Last-Event-ID": last})
    done = await client.get(job.id)
    assert "snapshot" in rest[0].data, "a resume starts with the job's state"
    after = [m for m in events_only(rest)[1:]]
    assert all(int(m.data["sequence"]) > int(last) for m in after)
    sequences = [int(m.data["sequence"]) for m in after]
    assert sequences == sorted(set(sequences)), "in order, no duplicates"
    assert text_of(first) + text_of(rest) == done.result_text, "nothing missed, nothing twice"


async def test_watch_jobs_over_sse_resumes_every_job_exactly_from_its_cursor(
    http: aiohttp.ClientSession, client: ConveyorClient
) -> None:
    jobs = [
        await client.submit(MODEL, f"many {i}", max_tokens=300, labels=slow(80, 80, 200))
        for i in range(2)
    ]
    path = f"/v1/events?ids={jobs[0].id},{jobs[1].id}&token_deltas=true"
    first: list[Sse] = []
    async with http.get(path) as r:
        async for m in sse_messages(r):
            first.append(m)
            if sum("tokenDelta" in x.data for x in first) >= 6:
                break
    cursor = first[-1].id
    assert cursor is not None and cursor.startswith("0:")
    rest = await _sse(http, path, {"Last-Event-ID": cursor})
    assert rest[-1].event == "end"
    for i, job in enumerate(jobs):
        done = await client.get(job.id)
        mine = [m for m in first + rest if m.event is None and m.data["jobId"] == job.id]
        assert text_of(mine) == done.result_text, f"job {i}: nothing missed, nothing twice"


async def test_a_slow_sse_reader_is_cut_off_with_where_to_resume(
    stack: Stack, api_key: str, client: ConveyorClient
) -> None:
    # 8,000 tokens overflow what a reader that reads none can leave queued: the notifier's
    # inbox of 256 events and the few KiB each hop between it and the socket buffers.
    job = await client.submit(MODEL, "firehose", max_tokens=9000, labels=slow(8000, 2000, 300))
    host, port = stack.settings.http_host, stack.settings.http_port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    request = (
        f"GET /v1/jobs/{job.id}/events HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {api_key}\r\nConnection: close\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    await client.wait(job.id, 60)  # not reading meanwhile
    received = bytearray()
    with contextlib.closing(sock):
        async with asyncio.timeout(60):
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
    text = received.decode(errors="replace")
    assert "event: error" in text, text[-500:]
    error = json.loads(text.split("event: error\ndata: ")[1].split("\n")[0])["error"]
    assert error["code"] == "RESOURCE_EXHAUSTED" and error["reason"] == "WATCH_FELL_BEHIND"
    ids = [line[4:] for line in text.split("\n") if line.startswith("id: ")]
    assert error["metadata"]["after_sequence"] == ids[-1], "cut off after what it was sent"
    rest = await _sse_with_key(stack, api_key, job.id, ids[-1])
    assert rest[-1].event == "end", "the reader resumes from its last id"


async def _sse_with_key(stack: Stack, api_key: str, job_id: str, last: str) -> list[Sse]:
    headers = {"Authorization": f"Bearer {api_key}"}
    async with aiohttp.ClientSession(stack.http_url, headers=headers) as session:
        return await _sse(session, f"/v1/jobs/{job_id}/events", {"Last-Event-ID": last})


async def test_sse_refusals_are_plain_json_errors_before_the_stream_starts(
    http: aiohttp.ClientSession,
) -> None:
    async with http.get(f"/v1/jobs/{uuid.uuid4()}/events") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
    async with http.get("/v1/events") as r:
        assert r.status == 400 and (await r.json())["error"]["details"][0]["field"] == "ids"
    async with http.get(f"/v1/jobs/{uuid.uuid4()}/events", headers={"Last-Event-ID": "x"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["details"][0]["field"] == "Last-Event-ID"
