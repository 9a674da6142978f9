"""Server-Sent Events: the message format, the resume points (event ids and
Last-Event-ID) and the writer that cuts off a reader who stopped reading."""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiohttp import web

from conveyor.core.errors import InvalidArgument
from conveyor.core.lifecycle import TERMINAL
from conveyor.v1 import events_pb2

log = logging.getLogger(__name__)

FIRST_EVENT_WAIT_S = 1.0
"""A stream's first message (or its refusal) is awaited this long before the SSE
answer starts, so that an unknown job or a wrong key gets a plain JSON error with
its HTTP status; a stream with nothing to say yet starts with a comment instead."""
STREAM_QUEUE = 16
"""Messages read from a gRPC stream ahead of the HTTP reader. With the small
per-stream gRPC window of the notifier channel
(app.NOTIFIER_WINDOW) and a socket send buffer of SSE_SEND_BUFFER, a slow
reader holds back the notifier, whose bounded inbox then cuts it off, as on gRPC."""
SSE_SEND_BUFFER = 16 * 1024
RETRY_MS = 2000
"""The reconnection delay an EventSource is told to use."""


def sse(data: bytes, event_id: str | None = None, event: str | None = None) -> bytes:
    """One Server-Sent Events message (`data` is one line of JSON)."""
    head = b""
    if event_id is not None:
        head += b"id: " + event_id.encode() + b"\n"
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


class Positions:
    """Where a stream is, per job: the SSE event ids, and Last-Event-ID read back.

    WatchJob: the id is the job's sequence number (of the event; a snapshot's when no
    resume point was given), so Last-Event-ID is `after_sequence`.

    WatchJobs: the id is a cursor, `<job>:<sequence>` entries joined by commas, one
    per job seen so far (with `labels`, per unfinished job), where `<job>` is the
    job's index in `ids` or, with `labels`, its id. Last-Event-ID is turned back into
    `after_sequences`, so a reconnect gets each job's events after the last one
    received, exactly once, as a gRPC resume does.
    """

    def __init__(self, ids: list[str], resume: dict[str, int], forget_finished: bool) -> None:
        self.index = {job: i for i, job in enumerate(ids)}
        self.at: dict[str, int] = dict(resume)
        self.forget_finished = forget_finished

    def see(self, event: events_pb2.JobEvent) -> None:
        kind = event.WhichOneof("payload")
        if kind == "snapshot":
            self.at.setdefault(event.job_id, event.sequence)
        elif kind in ("status_changed", "token_delta"):
            self.at[event.job_id] = event.sequence
            if (
                self.forget_finished
                and kind == "status_changed"
                and event.status_changed.status in FINISHED
            ):
                self.at.pop(event.job_id, None)

    def single(self, job_id: str) -> str:
        return str(self.at.get(job_id, 0))

    def cursor(self) -> str:
        return ",".join(
            f"{self.index.get(job, job)}:{seq}" for job, seq in self.at.items() if seq > 0
        )

    @staticmethod
    def parse(text: str, ids: list[str]) -> dict[str, int]:
        """A WatchJobs cursor as after_sequences; InvalidArgument if it is not one."""
        out: dict[str, int] = {}
        for part in filter(None, text.split(",")):
            job, sep, seq = part.strip().rpartition(":")
            if not sep or not seq.isdigit() or len(seq) > 18:
                raise InvalidArgument("Last-Event-ID", "is not a cursor this stream sent")
            if job.isdigit():
                if int(job) >= len(ids):
                    raise InvalidArgument("Last-Event-ID", "names a job index beyond `ids`")
                job = ids[int(job)]
            out[job] = int(seq)
        return out


FINISHED = frozenset(state.to_proto() for state in TERMINAL)
"""The terminal statuses, as the contract spells them."""


def canonical(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        return job_id


class Stalled(Exception):
    """The SSE reader took nothing for the write timeout."""


class Writer:
    """Writes to an SSE answer; a reader that takes nothing for `timeout_s` is Stalled."""

    def __init__(self, response: web.StreamResponse, timeout_s: float) -> None:
        self.response = response
        self.timeout_s = timeout_s

    async def send(self, data: bytes) -> None:
        try:
            await asyncio.wait_for(self.response.write(data), self.timeout_s)
        except TimeoutError:
            log.info("an SSE reader stopped reading; disconnected")
            raise Stalled() from None
