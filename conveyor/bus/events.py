"""Job events: the one place they are built, and their publishing on `conveyor.events`.

Every event a watcher receives is built here, from a `Job` record or a stored
history entry: status changes (live, as published by whoever made the change, or
replayed from `job_events`), snapshots, token deltas and progress reports. A live
change and its stored replay are built by the same function, so they are the same
event.

Status changes are also stored (job_events); token deltas travel only on the bus.
The body is the contract's `JobEvent`, serialized protobuf, so the notifier
forwards it to watchers without translating; the status changes of many jobs at
once (a batch of submissions) travel as one `JobEventBatch` per tenant and status,
each event with its trace.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

import aio_pika
from aio_pika.abc import AbstractExchange, DeliveryMode
from google.protobuf.duration_pb2 import Duration

from conveyor.bus.broker import event_routing_key
from conveyor.contract.convert import job_error, job_to_proto
from conveyor.core.lifecycle import TERMINAL, Job, JobState
from conveyor.core.telemetry import inject_headers
from conveyor.v1 import events_pb2, jobs_pb2

EVENT_CONTENT_TYPE = "application/x-protobuf; messageType=conveyor.v1.JobEvent"
BATCH_CONTENT_TYPE = "application/x-protobuf; messageType=conveyor.v1.JobEventBatch"

CARRIES_ERROR = frozenset(
    s.to_proto() for s in (JobState.SCHEDULED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED)
)
"""Statuses whose change carries the error that caused it; on the others the job's
error column is stale (left from an earlier attempt) and is not sent."""
TERMINAL_PROTO = frozenset(s.to_proto() for s in TERMINAL)
RUNNING = jobs_pb2.JOB_STATUS_RUNNING


# --------------------------------------------------------------------------- status changes


def _status_change(
    job: Job,
    status: JobState,
    previous: str | None,
    attempt: int,
    sequence: int,
    at: datetime,
    error: jobs_pb2.JobError | None,
    *,
    latest: bool,
) -> events_pb2.JobEvent:
    change = events_pb2.StatusChanged(status=status.to_proto(), attempt=attempt)
    if previous:
        change.previous = JobState(previous).to_proto()
    if error is not None and change.status in CARRIES_ERROR:
        change.error.CopyFrom(error)
    if status.terminal and latest:  # the change that ends the job carries all of it
        change.job.CopyFrom(job_to_proto(job))
    event = events_pb2.JobEvent(
        job_id=str(job.id), sequence=sequence, tenant=job.tenant, status_changed=change
    )
    event.time.FromDatetime(at)
    return event


def status_event(job: Job, previous: str | None) -> events_pb2.JobEvent:
    """The event for the transition (from `previous`) that left the job as `job` is."""
    assert job.updated_at is not None
    return _status_change(
        job,
        job.status,
        previous,
        job.attempts,
        job.seq,
        job.updated_at,
        job_error(job.error),
        latest=True,
    )


def history_event(entry: Mapping[str, Any], job: Job) -> events_pb2.JobEvent:
    """A stored transition (a `job_events` row) as the event that announced it; the
    latest one carries the job as `status_event` did."""
    latest = entry["seq"] == job.seq
    detail = entry["detail"] if isinstance(entry["detail"], Mapping) else None
    error = job_error(detail) if detail and detail.get("code") else None
    if error is None and latest:
        error = job_error(job.error)
    return _status_change(
        job,
        JobState(entry["status"]),
        entry["previous"],
        entry["attempt"],
        entry["seq"],
        entry["created_at"],
        error,
        latest=latest,
    )


def is_terminal(event: events_pb2.JobEvent) -> bool:
    """Whether `event` is the status change that ends its job."""
    return event.HasField("status_changed") and event.status_changed.status in TERMINAL_PROTO


def event_kind(event: events_pb2.JobEvent) -> str:
    """The `<status|delta>` part of the routing key."""
    if event.HasField("token_delta"):
        return "delta"
    return JobState.from_proto(event.status_changed.status).value


# --------------------------------------------------------------------------- snapshots, progress


def snapshot_event(job: Job) -> events_pb2.JobEvent:
    """The job as it is: the first event of a watch."""
    assert job.updated_at is not None
    event = events_pb2.JobEvent(
        job_id=str(job.id), sequence=job.seq, tenant=job.tenant, snapshot=job_to_proto(job)
    )
    event.time.FromDatetime(job.updated_at)
    return event


def progress_event(
    job_id: str, tenant: str, sequence: int, attempt: int, tokens: int, started_ns: int | None
) -> events_pb2.JobEvent:
    """A report that the attempt is running: its pieces so far and time since it started."""
    now_ns = time.time_ns()
    elapsed = Duration()
    if started_ns is not None:
        elapsed.FromNanoseconds(max(0, now_ns - started_ns))
    event = events_pb2.JobEvent(
        job_id=job_id,
        sequence=sequence,
        tenant=tenant,
        progress=events_pb2.Progress(attempt=attempt, output_tokens=tokens, elapsed=elapsed),
    )
    event.time.FromNanoseconds(now_ns)
    return event


# --------------------------------------------------------------------------- token deltas


Shape = tuple[int, int, bytes, bytes]
"""What a streamed piece is: (DeltaKind, block index, block_json, citation_json)."""
TEXT = events_pb2.DELTA_KIND_TEXT
_MERGEABLE = frozenset(
    {
        events_pb2.DELTA_KIND_TEXT,
        events_pb2.DELTA_KIND_INPUT_JSON,
        events_pb2.DELTA_KIND_THINKING,
        events_pb2.DELTA_KIND_SIGNATURE,
    }
)
_PLAIN: dict[tuple[int, int], Shape] = {}


def shape_of(kind: int, index: int, block: bytes = b"", cited: bytes = b"") -> Shape:
    """The shape of a piece; the common ones (no JSON) are shared, not one tuple each."""
    if block or cited:
        return (kind, index, block, cited)
    shape = _PLAIN.get((kind, index))
    if shape is None:
        shape = _PLAIN.setdefault((kind, index), (kind, index, b"", b""))
    return shape


def delta_runs(shapes: Sequence[Shape], start: int, end: int) -> list[tuple[int, int]]:
    """Pieces start..end cut into the delta events they travel as: consecutive pieces of
    the same block and kind (text, input JSON, thinking, signature) make one event; a
    citation or a whole block is an event of its own."""
    runs: list[tuple[int, int]] = []
    i = start
    while i < end:
        kind, index = shapes[i][0], shapes[i][1]
        j = i + 1
        if kind in _MERGEABLE:
            while j < end and shapes[j][0] == kind and shapes[j][1] == index and not shapes[j][2]:
                j += 1
        runs.append((i, j))
        i = j
    return runs


def delta_event(
    job_id: str,
    tenant: str,
    sequence: int,
    text: str,
    attempt: int,
    output_tokens: int,
    kind: int = TEXT,
    index: int = 0,
    block: bytes = b"",
    cited: bytes = b"",
    at_ns: int | None = None,
) -> events_pb2.JobEvent:
    """A token delta: pieces of the attempt's output, the last of them its
    `output_tokens`-th, under `sequence` (the RUNNING event's plus output_tokens).
    Stamped now, or at `at_ns` (a worker's answer replayed: one time for all of it)."""
    event = events_pb2.JobEvent(
        job_id=job_id,
        sequence=sequence,
        tenant=tenant,
        token_delta=events_pb2.TokenDelta(
            text=text,
            attempt=attempt,
            output_tokens=output_tokens,
            kind=cast(events_pb2.DeltaKind.ValueType, kind),
            index=index,
            block_json=block,
            citation_json=cited,
        ),
    )
    event.time.FromNanoseconds(time.time_ns() if at_ns is None else at_ns)
    return event


# --------------------------------------------------------------------------- publishing


class EventPublisher:
    """Publishes job events; transient messages without confirms (the database is the record)."""

    def __init__(self, exchange: AbstractExchange) -> None:
        self.exchange = exchange

    async def _send(
        self, body: bytes, content_type: str, routing_key: str, headers: dict[str, Any]
    ) -> None:
        await self.exchange.publish(
            aio_pika.Message(
                body=body,
                content_type=content_type,
                delivery_mode=DeliveryMode.NOT_PERSISTENT,
                headers=headers,
            ),
            routing_key=routing_key,
            mandatory=False,  # no watcher bound is normal
        )

    async def publish(
        self, event: events_pb2.JobEvent, headers: dict[str, Any] | None = None
    ) -> None:
        await self._send(
            event.SerializeToString(),
            EVENT_CONTENT_TYPE,
            event_routing_key(event_kind(event), event.tenant),
            headers or {},
        )

    async def publish_status(self, job: Job, previous: str | None) -> None:
        """Publish a transition; it carries the trace context so the notifier's work joins the trace."""
        await self.publish(status_event(job, previous), inject_headers())

    async def publish_changes(self, changes: Sequence[tuple[Job, str | None, str]]) -> int:
        """Publish the transitions of many jobs, each (job, its previous status, the
        traceparent of the work that made the change): one message per tenant and
        status; how many messages."""
        groups: dict[tuple[str, str], list[events_pb2.JobEventBatch.Entry]] = defaultdict(list)
        for job, previous, traceparent in changes:
            groups[(job.tenant, job.status.value)].append(
                events_pb2.JobEventBatch.Entry(
                    event=status_event(job, previous), traceparent=traceparent
                )
            )
        for (tenant, status), entries in groups.items():
            await self._send(
                events_pb2.JobEventBatch(entries=entries).SerializeToString(),
                BATCH_CONTENT_TYPE,
                event_routing_key(status, tenant),
                {},
            )
        return len(groups)

    async def publish_statuses(self, jobs: Sequence[Job], previous: str | None) -> None:
        """Publish the transitions of many jobs (each from `previous`): one message per
        tenant and status, each event carrying its job's stored trace context."""
        groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
        for job in jobs:
            groups[(job.tenant, job.status.value)].append(job)
        for (tenant, status), group in groups.items():
            batch = events_pb2.JobEventBatch(
                entries=[
                    events_pb2.JobEventBatch.Entry(
                        event=status_event(job, previous), traceparent=job.traceparent or ""
                    )
                    for job in group
                ]
            )
            await self._send(
                batch.SerializeToString(),
                BATCH_CONTENT_TYPE,
                event_routing_key(status, tenant),
                {},
            )
