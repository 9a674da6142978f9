"""Job events: building them from rows and publishing them on `conveyor.events`.

Status changes are also stored (job_events); token deltas travel only on the
bus. The body is the contract's `JobEvent`, serialized protobuf, so the
notifier forwards it to watchers without translating; the status changes of
many jobs at once (a busy gateway's submissions) travel as one `JobEventBatch`
per tenant and status, each event with its trace.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, cast

import aio_pika
from aio_pika.abc import AbstractExchange, DeliveryMode
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.bus.broker import event_routing_key
from conveyor.contract.convert import job_error, job_to_proto
from conveyor.core.lifecycle import JobState
from conveyor.core.telemetry import inject_headers
from conveyor.v1 import events_pb2

EVENT_CONTENT_TYPE = "application/x-protobuf; messageType=conveyor.v1.JobEvent"
BATCH_CONTENT_TYPE = "application/x-protobuf; messageType=conveyor.v1.JobEventBatch"


def _now() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def status_event(row: Mapping[str, Any], previous: str | None) -> events_pb2.JobEvent:
    """The event for the transition that left the job in `row`."""
    status = JobState(row["status"])
    change = events_pb2.StatusChanged(status=status.to_proto(), attempt=row["attempts"])
    if previous:
        change.previous = JobState(previous).to_proto()
    err = job_error(row["error"])
    if err is not None:
        change.error.CopyFrom(err)
    if status.terminal:
        change.job.CopyFrom(job_to_proto(row))
    event = events_pb2.JobEvent(
        job_id=str(row["id"]), sequence=row["seq"], tenant=row["tenant"], status_changed=change
    )
    event.time.FromDatetime(row["updated_at"])
    return event


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


def token_delta(
    text: str,
    attempt: int,
    output_tokens: int,
    kind: int = TEXT,
    index: int = 0,
    block: bytes = b"",
    cited: bytes = b"",
) -> events_pb2.TokenDelta:
    return events_pb2.TokenDelta(
        text=text,
        attempt=attempt,
        output_tokens=output_tokens,
        kind=cast(events_pb2.DeltaKind.ValueType, kind),
        index=index,
        block_json=block,
        citation_json=cited,
    )


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
) -> events_pb2.JobEvent:
    return events_pb2.JobEvent(
        job_id=job_id,
        sequence=sequence,
        tenant=tenant,
        time=_now(),
        token_delta=token_delta(text, attempt, output_tokens, kind, index, block, cited),
    )


def event_kind(event: events_pb2.JobEvent) -> str:
    """The `<status|delta>` part of the routing key."""
    if event.HasField("token_delta"):
        return "delta"
    return JobState.from_proto(event.status_changed.status).value


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

    async def publish_status(self, row: Mapping[str, Any], previous: str | None) -> None:
        """Publish a transition; it carries the trace context so the notifier's work joins the trace."""
        await self.publish(status_event(row, previous), inject_headers())

    async def publish_statuses(
        self, rows: Sequence[Mapping[str, Any]], previous: str | None
    ) -> None:
        """Publish the transitions of many jobs (each from `previous`): one message per
        tenant and status, each event carrying its job's stored trace context."""
        groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
        for row in rows:
            groups[(row["tenant"], row["status"])].append(row)
        for (tenant, status), group in groups.items():
            batch = events_pb2.JobEventBatch(
                entries=[
                    events_pb2.JobEventBatch.Entry(
                        event=status_event(row, previous), traceparent=row["traceparent"] or ""
                    )
                    for row in group
                ]
            )
            await self._send(
                batch.SerializeToString(),
                BATCH_CONTENT_TYPE,
                event_routing_key(status, tenant),
                {},
            )
