"""What a notifier knows from the bus: recent token deltas of every running job, and
who watches what.

Every notifier instance binds `job.#` on the events exchange, so each one sees
every event published and any of them can serve any watcher. Workers publish the
deltas of an attempt only while some notifier watches it, and then all of them,
from its first piece on (services.notifier.interest). For each job with an attempt
in progress the hub keeps that attempt's deltas (a `JobLog`), bounded per job and
in total: a watch that starts or resumes mid-run is caught up from here without
asking anybody. What a log does not reach back to (this notifier started after
the attempt did, or trimmed it) is asked from the worker (conveyor.bus.catchup).
If the bus connection drops, events may have been lost meanwhile: the logs are
forgotten and every stream ends with UNAVAILABLE, so its reader resumes exactly.

Events are handed to the watchers of their job (and to the label-filtered
watchers of their tenant) through a bounded queue per watcher: the bus consumer
never waits for a slow reader; a reader too far behind is marked overflowed and
cut off by its stream once it has been given what was queued.

`on_message` has no await point, so events are recorded and fanned out in the
order the bus delivers them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from google.protobuf.message import DecodeError
from opentelemetry.trace import SpanKind

from conveyor.bus.catchup import TextSoFar
from conveyor.bus.events import BATCH_CONTENT_TYPE
from conveyor.core.lifecycle import JobState
from conveyor.core.telemetry import context_from_headers, tracer
from conveyor.v1 import events_pb2, jobs_pb2

log = logging.getLogger(__name__)

EVENT_OVERHEAD_BYTES = 200
"""Rough memory of a decoded event beyond its serialized size (counted against the caps)."""
IDLE_LOG_S = 1800.0
"""A log not touched for this long is dropped (its worker is gone without a word)."""


def event_size(event: events_pb2.JobEvent) -> int:
    return event.ByteSize() + EVENT_OVERHEAD_BYTES


@dataclass
class JobLog:
    """The deltas this notifier holds of one attempt: every delta with a sequence number
    above `held_from`. A log started by the attempt's RUNNING event holds them all
    (`held_from` is that event's sequence); one started mid-attempt, or trimmed, holds
    a suffix.

    Within one bus connection no event is lost and one publisher's events keep their
    order, so a delta of the same attempt with a higher sequence simply follows. (The
    worker may send several of the model's text pieces as one delta; its sequence is
    that of its last piece, so numbers between deltas can be skipped.)
    """

    job_id: str
    tenant: str
    attempt: int
    held_from: int
    deltas: deque[events_pb2.JobEvent] = field(default_factory=deque)
    nbytes: int = 0
    count: int = 0
    """Text pieces of the attempt so far (the highest output_tokens seen)."""
    started_ns: int | None = None
    """When the attempt started (its RUNNING event), for progress reports."""
    ended: float | None = None
    """time.monotonic() when the attempt ended (a later status change), else None."""
    touched: float = field(default_factory=time.monotonic)

    @property
    def last_seq(self) -> int:
        return self.deltas[-1].sequence if self.deltas else self.held_from

    def covers(self, after_seq: int) -> bool:
        """Whether every delta above `after_seq` (up to the last seen) is held."""
        return after_seq >= self.held_from

    def after(self, after_seq: int) -> list[events_pb2.JobEvent]:
        """The deltas held with a sequence above `after_seq`."""
        return [e for e in self.deltas if e.sequence > after_seq]

    def copy(self) -> JobLog:
        return JobLog(
            job_id=self.job_id,
            tenant=self.tenant,
            attempt=self.attempt,
            held_from=self.held_from,
            deltas=deque(self.deltas),
            nbytes=self.nbytes,
            count=self.count,
            started_ns=self.started_ns,
            ended=self.ended,
        )


class Watcher:
    """One stream's inbox: events of the jobs it follows, bounded."""

    def __init__(
        self,
        tenant: str,
        limit: int,
        *,
        deltas: bool = True,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.tenant = tenant
        self.limit = limit
        self.deltas = deltas
        self.labels = dict(labels) if labels is not None else None
        """Set for a label-filtered WatchJobs: the watcher gets every event of its tenant."""
        self.queue: deque[events_pb2.JobEvent] = deque()
        self.wake = asyncio.Event()
        self.overflowed = False
        self.broken = False
        """The notifier's bus connection was lost: events may be missing."""
        self.job_ids: set[str] = set()

    def offer(self, event: events_pb2.JobEvent) -> None:
        if self.overflowed or (not self.deltas and event.HasField("token_delta")):
            return
        if len(self.queue) >= self.limit:
            self.overflowed = True
        else:
            self.queue.append(event)
        self.wake.set()

    async def wait(self, timeout_s: float) -> None:  # noqa: ASYNC109 - a bounded nap
        """Until something is queued (or overflowed), at most `timeout_s`."""
        if self.queue or self.overflowed or self.broken:
            return
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), timeout_s)
        except TimeoutError:
            return


class Hub:
    """The notifier's view of the bus: job logs and watchers (see the module docstring)."""

    def __init__(
        self,
        job_log_bytes: int = 2 * 1024 * 1024,
        total_bytes: int = 128 * 1024 * 1024,
        linger_s: float = 60.0,
    ) -> None:
        self.job_log_bytes = job_log_bytes
        self.total_bytes = total_bytes
        self.linger_s = linger_s
        self.logs: dict[str, JobLog] = {}
        self.bytes = 0
        self.watchers: dict[str, set[Watcher]] = defaultdict(set)
        self.tenant_watchers: dict[str, set[Watcher]] = defaultdict(set)
        self.streams = 0
        self.events_seen = 0
        self.since_ns = time.time_ns()
        """When this hub began to see the bus (without a break): what was published
        before then never reaches it."""

    # -- watchers

    def watch_job(self, watcher: Watcher, job_id: str) -> None:
        self.watchers[job_id].add(watcher)
        watcher.job_ids.add(job_id)

    def unwatch_job(self, watcher: Watcher, job_id: str) -> None:
        subs = self.watchers.get(job_id)
        if subs is not None:
            subs.discard(watcher)
            if not subs:
                del self.watchers[job_id]
        watcher.job_ids.discard(job_id)

    def watch_tenant(self, watcher: Watcher) -> None:
        self.tenant_watchers[watcher.tenant].add(watcher)

    def remove(self, watcher: Watcher) -> None:
        for job_id in list(watcher.job_ids):
            self.unwatch_job(watcher, job_id)
        subs = self.tenant_watchers.get(watcher.tenant)
        if subs is not None:
            subs.discard(watcher)
            if not subs:
                del self.tenant_watchers[watcher.tenant]

    # -- logs

    def log_copy(self, job_id: str) -> JobLog | None:
        """A copy of the job's log as of now (to pair with a live subscription)."""
        found = self.logs.get(job_id)
        return found.copy() if found is not None else None

    def tokens(self, job_id: str, attempt: int) -> int | None:
        found = self.logs.get(job_id)
        if found is None or found.attempt != attempt:
            return None
        return found.count

    def _drop(self, job_id: str) -> None:
        old = self.logs.pop(job_id, None)
        if old is not None:
            self.bytes -= old.nbytes

    def _trim(self, entry: JobLog, limit: int) -> None:
        while entry.deltas and entry.nbytes > limit:
            gone = entry.deltas.popleft()
            size = event_size(gone)
            entry.nbytes -= size
            self.bytes -= size
            entry.held_from = gone.sequence

    def _record(self, event: events_pb2.JobEvent) -> None:
        job_id = event.job_id
        now = time.monotonic()
        if event.HasField("status_changed"):
            change = event.status_changed
            current = self.logs.get(job_id)
            if change.status == jobs_pb2.JOB_STATUS_RUNNING:
                if current is not None and current.attempt >= change.attempt:
                    return  # a late or repeated RUNNING event
                self._drop(job_id)
                self.logs[job_id] = JobLog(
                    job_id=job_id,
                    tenant=event.tenant,
                    attempt=change.attempt,
                    held_from=event.sequence,
                    started_ns=event.time.ToNanoseconds() if event.HasField("time") else None,
                )
            elif (
                current is not None and current.ended is None and event.sequence > current.held_from
            ):
                current.ended = now
            return
        if not event.HasField("token_delta"):
            return
        delta = event.token_delta
        current = self.logs.get(job_id)
        if current is not None and delta.attempt < current.attempt:
            return  # a lost worker still streaming an attempt that was taken over
        if current is None or delta.attempt > current.attempt:
            self._drop(job_id)
            # Joined mid-attempt: what came before this delta is not known here.
            current = JobLog(
                job_id=job_id, tenant=event.tenant, attempt=delta.attempt, held_from=event.sequence
            )
            self.logs[job_id] = current
        elif event.sequence <= current.last_seq:
            return  # seen already
        size = event_size(event)
        current.deltas.append(event)
        current.nbytes += size
        self.bytes += size
        current.count = max(current.count, int(delta.output_tokens))
        current.touched = now
        if current.nbytes > self.job_log_bytes:
            self._trim(current, self.job_log_bytes)
        if self.bytes > self.total_bytes:
            self._shed()

    def _shed(self) -> None:
        """Over the total cap: halve the biggest logs until under 90% of it."""
        for entry in sorted(self.logs.values(), key=lambda e: e.nbytes, reverse=True):
            if self.bytes <= self.total_bytes * 0.9:
                return
            self._trim(entry, entry.nbytes // 2)

    def merge(self, text: TextSoFar, tenant: str) -> None:
        """Fill the job's log from a worker's answer, so later watchers need not ask."""
        current = self.logs.get(text.job_id)
        if current is not None and current.attempt > text.attempt:
            return
        have: list[events_pb2.JobEvent] = []
        started, count = None, 0
        if current is not None and current.attempt == text.attempt:
            if current.held_from <= text.base_seq or text.last_seq < current.held_from:
                return  # complete already, or the answer does not join up with it
            joint = current.held_from
            have = [e for e in current.deltas if e.sequence > joint]
            started, count = current.started_ns, current.count
        else:
            joint = text.last_seq
        self._drop(text.job_id)
        rebuilt = JobLog(
            job_id=text.job_id,
            tenant=tenant,
            attempt=text.attempt,
            held_from=text.base_seq,
            started_ns=started,
        )
        rebuilt.deltas.extend(e for e in text.events(tenant, text.base_seq) if e.sequence <= joint)
        rebuilt.deltas.extend(have)
        rebuilt.nbytes = sum(event_size(e) for e in rebuilt.deltas)
        rebuilt.count = max(count, text.count)
        self.logs[text.job_id] = rebuilt
        self.bytes += rebuilt.nbytes
        self._trim(rebuilt, self.job_log_bytes)

    def reset(self) -> None:
        """The bus connection was lost and restored: events may be missing. Forget every
        log, and end every stream (UNAVAILABLE) so that its reader resumes."""
        self.logs.clear()
        self.bytes = 0
        self.since_ns = time.time_ns()
        everyone = {w for subs in self.watchers.values() for w in subs}
        everyone |= {w for subs in self.tenant_watchers.values() for w in subs}
        for watcher in everyone:
            watcher.broken = True
            watcher.wake.set()

    def sweep(self) -> int:
        """Forget logs of attempts that ended a while ago or went quiet; returns how many."""
        now = time.monotonic()
        stale = [
            job_id
            for job_id, entry in self.logs.items()
            if (entry.ended is not None and now - entry.ended > self.linger_s)
            or now - entry.touched > IDLE_LOG_S
        ]
        for job_id in stale:
            self._drop(job_id)
        return len(stale)

    # -- the bus

    def _targets(self, event: events_pb2.JobEvent) -> Iterable[Watcher]:
        subs = self.watchers.get(event.job_id)
        tenant_subs = self.tenant_watchers.get(event.tenant)
        if subs and tenant_subs:
            return subs | tenant_subs
        return subs or tenant_subs or ()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        entries: list[tuple[events_pb2.JobEvent, Mapping[str, Any] | None]]
        try:
            if message.content_type == BATCH_CONTENT_TYPE:
                batch = events_pb2.JobEventBatch.FromString(message.body)
                entries = [(e.event, {"traceparent": e.traceparent}) for e in batch.entries]
            else:
                entries = [(events_pb2.JobEvent.FromString(message.body), message.headers)]
        except DecodeError:
            log.warning("undecodable event dropped", extra={"routing_key": message.routing_key})
            return
        for event, headers in entries:
            self._deliver(event, headers)

    def _deliver(self, event: events_pb2.JobEvent, headers: Mapping[str, Any] | None) -> None:
        self.events_seen += 1
        self._record(event)
        targets = self._targets(event)
        if not targets:
            return
        if not event.HasField("status_changed"):  # token deltas: no span each, too many
            for watcher in targets:
                watcher.offer(event)
            return
        # A status change joins the job's trace: its publisher put the context in the headers.
        with tracer().start_as_current_span(
            "notify watchers",
            context=context_from_headers(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "conveyor.job.id": event.job_id,
                "conveyor.job.status": JobState.from_proto(event.status_changed.status).value,
                "conveyor.watchers": len(list(targets)),
            },
        ):
            for watcher in targets:
                watcher.offer(event)
