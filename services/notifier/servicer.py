"""JobEvents: WatchJob (one job) and WatchJobs (a list of ids, or every job of the
caller's tenant with some labels), exact across reconnects (see events.proto).

Each call gets a bounded inbox (`Watcher`) registered with the hub before anything
is read, and a `Stream` that opens each job (snapshot, catch-up) and then turns the
queued live events into what to send. gRPC flow control paces the sending; when the
inbox overflows because the reader is too slow, the stream sends what was queued
and ends with RESOURCE_EXHAUSTED (reason WATCH_FELL_BEHIND), and the reader resumes
from its last sequence number.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf.duration_pb2 import Duration

from conveyor.bus.events import is_terminal
from conveyor.contract.convert import check_text, key_field, parse_job_id, to_timedelta
from conveyor.core.config import Settings
from conveyor.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from conveyor.core.lifecycle import Job
from conveyor.core.metrics import WATCHERS
from conveyor.db import watches
from conveyor.server.auth import tenant_of
from conveyor.v1 import events_pb2, events_pb2_grpc

from .hub import Watcher
from .stream import Services, Stream

log = logging.getLogger(__name__)

MAX_IDS = 1000
DEFAULT_PROGRESS_S = 1.0
MIN_PROGRESS_S = 0.1
MAX_PROGRESS_S = 60.0
FELL_BEHIND = "WATCH_FELL_BEHIND"


class FellBehind(ResourceExhausted):
    """The reader fell too far behind; the status says where to resume (google.rpc.ErrorInfo)."""

    def __init__(self, message: str, metadata: dict[str, str]) -> None:
        super().__init__(message)
        self.reason, self.info = FELL_BEHIND, metadata


def progress_interval(value: Duration | None) -> float:
    """Seconds between progress reports: unset means every second; clamped to 0.1..60.

    A Duration outside its own definition (nanos of 1e9 or more, mixed signs, beyond
    10,000 years) is InvalidArgument."""
    if value is None:
        return DEFAULT_PROGRESS_S
    seconds = to_timedelta(value, "progress_interval").total_seconds()
    if seconds <= 0:
        return DEFAULT_PROGRESS_S
    return min(MAX_PROGRESS_S, max(MIN_PROGRESS_S, seconds))


class JobEventsServicer(events_pb2_grpc.JobEventsServicer):
    def __init__(self, services: Services, settings: Settings) -> None:
        self.services = services
        self.hub = services.hub
        self.settings = settings
        self.tenant_streams: dict[str, int] = {}
        """Open streams per tenant (CONVEYOR_NOTIFIER_MAX_WATCHES_PER_TENANT each)."""

    # -- streams

    def _watcher(self, tenant: str, *, deltas: bool, labels: dict[str, str] | None) -> Watcher:
        if self.hub.streams >= self.settings.notifier_max_watches:
            raise ResourceExhausted("this notifier serves its maximum of streams; try another")
        mine = self.tenant_streams.get(tenant, 0)
        if mine >= self.settings.notifier_max_watches_per_tenant:
            raise ResourceExhausted(
                f"your tenant has {mine} open watch streams on this notifier, its maximum;"
                " close one first"
            )
        self.tenant_streams[tenant] = mine + 1
        self.hub.streams += 1
        WATCHERS.inc()
        return Watcher(tenant, self.settings.notifier_watch_buffer, deltas=deltas, labels=labels)

    def _close(self, watcher: Watcher) -> None:
        self.hub.remove(watcher)
        self.hub.streams -= 1
        left = self.tenant_streams.get(watcher.tenant, 1) - 1
        if left > 0:
            self.tenant_streams[watcher.tenant] = left
        else:
            self.tenant_streams.pop(watcher.tenant, None)
        WATCHERS.dec()

    async def _live(
        self, stream: Stream, *, many: bool, ends: bool
    ) -> AsyncIterator[events_pb2.JobEvent]:
        """Queued live events, progress reports and idle checks until the jobs finish."""
        watcher = stream.watcher
        progress_due = time.monotonic() + stream.progress_s

        def done() -> bool:
            return ends and all(t.terminal for t in stream.trackers.values())

        while True:
            while watcher.queue and not watcher.broken:
                event = watcher.queue.popleft()
                for out in await stream.handle(event):
                    yield out
                    if is_terminal(out) and watcher.labels is not None:
                        stream.forget(out.job_id)
                    elif is_terminal(out):
                        self.hub.unwatch_job(watcher, out.job_id)
                if done():
                    return
                if time.monotonic() >= progress_due:
                    for report in stream.progress(many):
                        yield report
                    progress_due = time.monotonic() + stream.progress_s
            if watcher.broken:
                raise Unavailable("the notifier lost its event feed for a moment; resume")
            if watcher.overflowed:
                raise self._fell_behind(stream)
            if done():
                return
            wait = min(stream.next_progress_in(), max(0.0, stream.next_check_at - time.monotonic()))
            await watcher.wait(max(0.01, wait))
            if watcher.queue or watcher.overflowed:
                continue
            for report in stream.progress(many):
                yield report
            progress_due = time.monotonic() + stream.progress_s
            if time.monotonic() >= stream.next_check_at:
                for out in await stream.check():
                    yield out
                    if is_terminal(out) and watcher.labels is not None:
                        stream.forget(out.job_id)

    def _fell_behind(self, stream: Stream) -> FellBehind:
        trackers = list(stream.trackers.values())
        if len(trackers) == 1:
            last = trackers[0].last
            log.info("watcher fell behind", extra={"job_id": trackers[0].job_id, "sequence": last})
            return FellBehind(
                f"the watcher fell behind; resume with after_sequence={last}",
                {"job_id": trackers[0].job_id, "after_sequence": str(last)},
            )
        log.info("watcher of many jobs fell behind", extra={"jobs": len(trackers)})
        return FellBehind(
            "the watcher fell behind; resume with after_sequences set to the last sequence"
            " number received for each job",
            {},
        )

    # -- RPCs

    async def WatchJob(
        self, request: events_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.JobEvent]:
        tenant = tenant_of(context)
        job_id = parse_job_id(request.id)
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence", "must not be negative")
        progress_s = progress_interval(
            request.progress_interval if request.HasField("progress_interval") else None
        )
        watcher = self._watcher(tenant, deltas=True, labels=None)
        try:
            self.hub.watch_job(watcher, str(job_id))
            job = await watches.job_by_id(self.services.engine, tenant, job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found")
            stream = Stream(self.services, watcher, progress_s)
            for event in await stream.open(job, request.after_sequence):
                yield event
            if stream.trackers[str(job_id)].terminal:
                return
            async for event in self._live(stream, many=False, ends=True):
                yield event
        finally:
            self._close(watcher)

    async def WatchJobs(
        self, request: events_pb2.WatchJobsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.JobEvent]:
        tenant = tenant_of(context)
        ids = self._ids(request)
        labels = dict(request.labels)
        if not ids and not labels:
            raise InvalidArgument("ids", "give ids or labels")
        for name, text in labels.items():  # a NUL would fail the query for them
            check_text(name, key_field("labels", name))
            check_text(text, key_field("labels", name))
        resume: dict[str, int] = {}
        for key, value in request.after_sequences.items():
            if not _is_uuid(key):
                raise InvalidArgument(key_field("after_sequences", key), "is not a job id")
            if value < 0:
                raise InvalidArgument(key_field("after_sequences", key), "must not be negative")
            resume[str(uuid.UUID(key))] = value
        progress_s = progress_interval(
            request.progress_interval if request.HasField("progress_interval") else None
        )
        watcher = self._watcher(
            tenant, deltas=request.token_deltas, labels=labels if not ids else None
        )
        try:
            stream = Stream(self.services, watcher, progress_s)
            if ids:
                for job_id in ids:
                    self.hub.watch_job(watcher, str(job_id))
                found = await watches.jobs_by_id(self.services.engine, tenant, ids)
                missing = [str(i) for i in ids if str(i) not in found]
                if missing:
                    raise NotFound(f"job {missing[0]} not found")
                ordered: list[Job] = [found[str(i)] for i in ids]
            else:
                self.hub.watch_tenant(watcher)
                interest = self.services.interest
                if interest is not None and not interest.leased_for(tenant):
                    await interest.lease(tenant)  # the tenant's deltas go on the bus
                ordered = await watches.live_with_labels(self.services.engine, tenant, labels)
            for job in ordered:
                for event in await stream.open(job, resume.get(str(job.id), 0)):
                    yield event
            if ids and all(t.terminal for t in stream.trackers.values()):
                return
            async for event in self._live(stream, many=True, ends=bool(ids)):
                yield event
        finally:
            self._close(watcher)

    @staticmethod
    def _ids(request: events_pb2.WatchJobsRequest) -> list[uuid.UUID]:
        if request.ids and request.labels:
            raise InvalidArgument("labels", "give ids or labels, not both")
        if len(request.ids) > MAX_IDS:
            raise InvalidArgument("ids", f"at most {MAX_IDS}")
        out: list[uuid.UUID] = []
        for i, value in enumerate(request.ids):
            job_id = parse_job_id(value, f"ids[{i}]")
            if job_id not in out:
                out.append(job_id)
        return out


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
