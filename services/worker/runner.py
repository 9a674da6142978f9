"""Running one delivered job: claim, call the model, write the outcome, then ack.

`JobRunner.handle` returns what becomes of the message (conveyor.bus.settle: ack,
requeue, reject) and the worker's consumer settles it (services.worker.app). The ack
comes only after the outcome is committed, so a worker that dies at any point
leaves the message unacked and the broker redelivers it. The claim is
a conditional UPDATE under a fresh lease: a duplicate delivery of a job that is
running or finished is acked without calling the model, and an outcome whose
lease was taken over (stalled-job recovery) is refused by the database.

A job whose tenant already runs as many jobs as its limit allows is not
claimed: its message goes back to the queue and the worker stops taking that
tenant's jobs for a moment. The model call (services.worker.calls) first waits for
provider budget (services.worker.limiter); that wait counts against the job's timeout.

The heartbeat (`renew_leases`) learns which leases were taken over and aborts those
calls; while it cannot reach Postgres, `abort_unrenewed` aborts calls whose lease may
have expired. An aborted call writes nothing and its message is acked: the job is
someone else's (or the sweeper's) now, so the model is not called twice at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.broker import PUBLISHED_AT_HEADER, JobMessage, lane_of
from conveyor.bus.catchup import Delta
from conveyor.bus.events import EventPublisher, delta_event, delta_runs, shape_of
from conveyor.bus.settle import ACK, REJECT, requeue, settle
from conveyor.bus.settle import Outcome as Settlement
from conveyor.core import lifecycle
from conveyor.core.config import Settings
from conveyor.core.lifecycle import Job, JobState, Outcome, failure_outcome
from conveyor.core.metrics import (
    COST_USD,
    IN_FLIGHT,
    JOBS_FINISHED,
    JOBS_RETRIED,
    JOBS_STARTED,
    QUEUE_WAIT,
    RUN_TIME,
    TENANT_DEFERRED,
    ModelNames,
)
from conveyor.core.pricing import with_cost
from conveyor.core.telemetry import context_from_headers, tracer
from conveyor.db import jobs as db
from conveyor.db.engine import retry_transient
from conveyor.llm.provider import Provider, classify, simulator_headers
from conveyor.v1 import events_pb2

from .calls import ModelCaller
from .group_writes import JobWrites, StatusEvents
from .inflight import InFlight, LeaseLost
from .interest import Interest
from .limiter import ProviderLimiter

log = logging.getLogger(__name__)
T = TypeVar("T")

COALESCE_S = 0.0
"""A watched attempt's pieces that follow its last delta event by less than this
gather into one event (see `_run`'s on_delta); at 0, those of one turn of the event
loop do. Not raised yet: a slow reader's cut-off (tests/integration/
test_http_api_events.py) counts events, see bench/README.md."""
ENDED_KEPT_S = 30.0
ENDED_KEPT_MAX = 2_000
"""An ended attempt's pieces are kept this long (at most this many attempts): a watch
registered just after its attempt ended (a fast job) asks for them, since an
attempt nobody watched published its deltas nowhere."""


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        provider: Provider,
        events: EventPublisher,
        limiter: ProviderLimiter | None = None,
        on_tenant_full: Callable[[str], Awaitable[float]] | None = None,
    ) -> None:
        """`on_tenant_full(tenant)` is told that a tenant is at its concurrency limit
        (the worker pauses its queues) and returns how long to hold a delivery of
        that tenant from a shared queue before handing it back."""
        self.settings = settings
        self.engine = engine
        self.events = events
        self.on_tenant_full = on_tenant_full
        self.name = f"{socket.gethostname()}:{id(self)}"
        self.inflight: dict[uuid.UUID, InFlight] = {}
        self.stopping = False
        self.use_sim_headers = settings.provider == "simulator"
        self.model_label = ModelNames.from_settings(settings)
        self.call = ModelCaller(provider, limiter, self.model_label)
        # Claims and outcomes as group commits, status events in batches (group_writes).
        self.writes = JobWrites(engine, self.name, stopping=lambda: self.stopping)
        self.status_events = StatusEvents(events)
        self.interest = Interest()
        self.ended: OrderedDict[uuid.UUID, tuple[float, InFlight]] = OrderedDict()
        """Attempts that ended here lately, oldest first (`ENDED_KEPT_S`)."""

    def text_so_far(
        self, job_id: uuid.UUID, attempt: int, watcher: str | None = None
    ) -> tuple[int, list[Delta]] | None:
        """The deltas a running attempt sent so far (conveyor.bus.catchup.Delta: output_tokens,
        text, kind, block index, block JSON, citation JSON), with the
        sequence number of its RUNNING event; None if this worker does not run that
        attempt. (conveyor.bus.catchup: a notifier catching a watcher up asks for it.)

        With `watcher` (a notifier's id), that notifier now watches the attempt: in this
        same step (no await) the pieces so far are cut into runs, those not published yet
        go out, and the answer holds every run, so every later delta is published live
        and the answer and the live stream overlap without a gap."""
        entry = self.inflight.get(job_id)
        running = entry is not None and entry.attempt == attempt
        if not running:  # or ended here lately: its pieces are all there is
            _, entry = self.ended.get(job_id, (0.0, None))
        if entry is None or entry.attempt != attempt:
            return None
        self._cut(entry)
        if watcher is not None and running:
            entry.watchers.add(watcher)
            self._publish(entry)
        deltas: list[Delta] = []
        start = 0
        for end in entry.flushed:
            text, (kind, index, block, cited) = entry.run_of(start, end)
            deltas.append((end, text, kind, index, block.decode(), cited.decode()))
            start = end
        return entry.base_seq, deltas

    def _keep_ended(self, entry: InFlight) -> None:
        """Keep an ended attempt's pieces for `text_so_far` a while (`ENDED_KEPT_S`)."""
        now = time.monotonic()
        self.ended.pop(entry.job_id, None)
        self.ended[entry.job_id] = (now, entry)
        while self.ended:
            kept_at, _ = next(iter(self.ended.values()))
            if len(self.ended) <= ENDED_KEPT_MAX and now - kept_at < ENDED_KEPT_S:
                break
            self.ended.popitem(last=False)

    def unwatch(self, job_id: uuid.UUID, attempt: int, watcher: str) -> None:
        """The notifier `watcher` no longer watches the attempt."""
        entry = self.inflight.get(job_id)
        if entry is not None and entry.attempt == attempt:
            entry.watchers.discard(watcher)

    def tenant_interest(self, tenant: str, lease_s: float) -> None:
        """Publish every attempt of `tenant` for `lease_s`: a tenant-wide watch exists.
        Attempts that were not published until now send their deltas so far first."""
        if self.interest.lease(tenant, lease_s):
            for entry in list(self.inflight.values()):
                if entry.tenant == tenant:
                    self._flush(entry)

    async def renew_leases(self) -> None:
        """One heartbeat: renew the leases of the running calls, abort those whose lease
        was lost or whose cancel was requested."""
        entries = {e.lease: e for e in list(self.inflight.values())}
        if not entries:
            return
        sent = time.monotonic()
        renewal = await db.heartbeat(self.engine, list(entries))
        for lease, entry in entries.items():
            if lease in renewal.lost:
                self.abort_lost(entry, "lease taken over")
            else:
                entry.renewed_at = max(entry.renewed_at, sent)
        for job_id in renewal.cancel:
            self.cancel(job_id)

    def abort_unrenewed(self, hold_s: float) -> int:
        """Abort the calls whose lease was last renewed more than `hold_s` ago (the
        database is unreachable, so the lease cannot be proven); how many."""
        now = time.monotonic()
        stale = [e for e in list(self.inflight.values()) if now - e.renewed_at > hold_s]
        return sum(self.abort_lost(e, "lease not renewed in time") for e in stale)

    def abort_lost(self, entry: InFlight, why: str) -> bool:
        """Abort the call of an attempt whose lease is gone; False if it already ended
        (its outcome, if being written, is refused by the lease check)."""
        if entry.task is None or entry.task.done() or entry.lease_lost:
            return False
        entry.lease_lost = True
        entry.task.cancel()
        log.warning(
            "lease lost; model call aborted",
            extra={"job_id": str(entry.job_id), "attempt": entry.attempt, "reason": why},
        )
        return True

    def cancel(self, job_id: uuid.UUID) -> bool:
        """Abort the model call of a job this worker runs; False if it runs none."""
        entry = self.inflight.get(job_id)
        if entry is None or entry.task is None:
            return False
        entry.cancel_requested = True
        entry.task.cancel()
        return True

    async def handle(self, message: AbstractIncomingMessage) -> Settlement:
        """Process one delivery; what becomes of its message (conveyor.bus.settle).

        Acked once the job's outcome is written or when there is nothing to do, rejected
        (dead-lettered) when it cannot be read or names no job, requeued while the job's
        tenant is at its limit. A call interrupted by shutdown hands the job back and
        requeues the message itself; the message stays unacked only when the process
        is going away.
        """
        received_ns = time.time_ns()
        with tracer().start_as_current_span(
            f"{lane_of(message.routing_key) or 'job'} process",
            context=context_from_headers(message.headers),
            kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "rabbitmq", "messaging.operation.type": "process"},
        ) as span:
            try:
                delivered = JobMessage.decode(message.body)
            except ValueError as exc:
                span.set_status(StatusCode.ERROR, "poison message")
                log.error("poison message dead-lettered", extra={"error": str(exc)})
                return REJECT
            span.set_attribute("conveyor.job.id", str(delivered.job_id))
            self._record_queue_wait(message, received_ns)
            return await self._handle(delivered, message)

    def _record_queue_wait(self, message: AbstractIncomingMessage, received_ns: int) -> None:
        published = (message.headers or {}).get(PUBLISHED_AT_HEADER)
        if not isinstance(published, int) or published > received_ns:
            return
        tracer().start_span("queue wait", start_time=published).end(end_time=received_ns)
        QUEUE_WAIT.labels(lane_of(message.routing_key)).observe((received_ns - published) / 1e9)

    async def _handle(self, delivered: JobMessage, message: AbstractIncomingMessage) -> Settlement:
        job_id = delivered.job_id
        lease = uuid.uuid4()
        with tracer().start_as_current_span("claim"):
            # Retried while the database is away; the lease runs from before its write.
            job, claimed_at = await self.writes.claim(job_id, lease, delivered.tenant)
        if job is None:
            return await self._not_claimed(delivered, message)
        lane = job.lane
        JOBS_STARTED.labels(lane).inc()
        started = time.monotonic()
        entry = InFlight(
            job_id=job_id,
            lease=lease,
            attempt=job.attempts,
            base_seq=job.seq,
            renewed_at=claimed_at,
        )
        earlier = self.inflight.get(job_id)
        if earlier is not None:
            # This claim took the job over from an earlier attempt still running here
            # (its heartbeat had not yet seen the loss): no heartbeat looks at it once
            # replaced, so its call is aborted now.
            self.abort_lost(earlier, "taken over by a later attempt")
        self.inflight[job_id] = entry
        IN_FLIGHT.inc()
        try:
            try:
                outcome = await self._run(job, entry)
            except asyncio.CancelledError:
                await self._hand_back(job_id, lease, message, job.seq + len(entry.text))
                raise
            except LeaseLost:
                # Taken over (or about to be): its new attempt has a message of its own.
                return ACK
            outcome = with_cost(outcome, job.model)
            with tracer().start_as_current_span("write outcome") as span:
                span.set_attribute("conveyor.job.status", outcome.status.value)
                # Retried while the database is away (group_writes.GroupWriter).
                done = await self.writes.finish(
                    job_id, lease, outcome, seq_floor=job.seq + len(entry.text)
                )
        finally:
            # A later attempt of the same job may run here already (this one's lease lost).
            if self.inflight.get(job_id) is entry:
                del self.inflight[job_id]
                self._keep_ended(entry)
            IN_FLIGHT.dec()
        if done is None:
            log.warning("outcome refused: lease taken over", extra={"job_id": str(job_id)})
            return ACK
        if entry.publishing is not None:
            await entry.publishing  # the last tokens go out before the final status
        RUN_TIME.labels(lane, outcome.status.value).observe(time.monotonic() - started)
        if outcome.cost_micros:
            COST_USD.labels(self.model_label(job.model), lane).inc(outcome.cost_micros / 1e6)
        if outcome.status is JobState.SCHEDULED:
            JOBS_RETRIED.labels(lane).inc()
        elif outcome.status.terminal:
            JOBS_FINISHED.labels(lane, outcome.status.value).inc()
        await self._emit(done, "running")
        log.info("job %s", done.status, extra={"job_id": str(job_id), "attempt": done.attempts})
        # Acked even when the job is dead: it is written dead already, with its reason and
        # last error. Rejecting the message would only have the dispatcher's dead-letter
        # consumer (services.dispatcher.dead_letters) add x-death data to the history,
        # and a dead letter still queued when RetryJob revives the job would make that
        # consumer kill the revived job again. The dead-letter exchange is for messages
        # this worker could not record (poison, no such job, unexpected errors): for those
        # the dispatcher writes the job dead with the x-death data in the transition's detail.
        return ACK

    async def _hand_back(
        self,
        job_id: uuid.UUID,
        lease: uuid.UUID,
        message: AbstractIncomingMessage,
        seq_floor: int = 0,
    ) -> None:
        """Shutdown interrupted the call: return the job to pending and requeue its message
        (here, not by returning an outcome: the handler is being cancelled)."""
        try:
            released = await db.release(self.engine, job_id, lease, seq_floor)
            if released is not None:
                await self._emit(released, "running")
            await settle(message, requeue())
            log.info("job handed back", extra={"job_id": str(job_id)})
        except Exception as exc:  # the unacked message is redelivered when we disconnect
            log.warning("hand-back incomplete", extra={"job_id": str(job_id), "error": repr(exc)})

    async def _not_claimed(
        self, delivered: JobMessage, message: AbstractIncomingMessage
    ) -> Settlement:
        """The job was not pending: unknown, cancelled, running elsewhere or finished."""
        job_id = delivered.job_id
        async with self.engine.connect() as conn:
            current = await db.get_job(conn, job_id)
        if current is None:
            log.error("message names no job; dead-lettered", extra={"job_id": str(job_id)})
            return REJECT
        if current.status is JobState.PENDING and current.cancel_requested_at is None:
            return await self._defer(current, message)
        if current.status is JobState.PENDING:  # a cancel was requested
            cancelled = await db.transition(
                self.engine,
                job_id,
                lifecycle.transition("cancel_delivered").from_states,
                JobState.CANCELLED,
            )
            if cancelled is not None:
                await self._emit(cancelled, "pending")
        log.info(
            "duplicate or skipped delivery acked",
            extra={"job_id": str(job_id), "status": current.status.value},
        )
        return ACK

    async def _defer(self, current: Job, message: AbstractIncomingMessage) -> Settlement:
        """The job is pending but was not claimed: its tenant is at its concurrency limit.

        The message goes back to its queue (at its place) for a later delivery; the
        tenant's queues are paused in this worker meanwhile, so the worker's slots go
        to other tenants. A delivery from a shared lane queue (fairness off) cannot be
        paused by tenant, so it is held for the pause before going back.
        """
        tenant = current.tenant
        TENANT_DEFERRED.labels(tenant).inc()
        hold = await self.on_tenant_full(tenant) if self.on_tenant_full is not None else 1.0
        log.debug(
            "tenant at its concurrency limit; job handed back",
            extra={"job_id": str(current.id), "tenant": tenant},
        )
        return requeue(hold if message.routing_key == current.lane else 0.0)

    async def _run(self, job: Job, entry: InFlight) -> Outcome:
        """Call the model and turn what happened into an outcome."""
        attempt = job.attempts

        loop = asyncio.get_running_loop()
        entry.tenant = job.tenant
        interest = self.interest

        def flush() -> None:
            entry.flush_handle = None
            self._flush(entry)

        def on_delta(kind: int, index: int, text: str, block: bytes, cited: bytes) -> None:
            # Unwatched, a piece is only kept: it is cut into runs when a watch starts
            # (text_so_far) and never published. Watched, the first piece after a quiet
            # spell goes at the end of this turn of the event loop; pieces that follow a
            # publish by less than COALESCE_S gather until then, so a fast stream costs
            # one event per COALESCE_S, not one per read.
            entry.text.append(text)
            entry.shape.append(shape_of(kind, index, block, cited))
            if entry.flush_handle is not None or not interest.watched(entry):
                return
            due = entry.published_at + COALESCE_S
            if due <= loop.time():
                entry.flush_handle = loop.call_soon(flush)
            else:
                entry.flush_handle = loop.call_at(due, flush)

        headers = simulator_headers(job.labels, attempt) if self.use_sim_headers else {}
        entry.task = asyncio.create_task(self.call(job, on_delta, headers))
        # The RUNNING event is published once the request is on its way (the call's task
        # runs first); the deltas wait for it, so it still comes first.
        entry.publishing = asyncio.create_task(self._emit(job, "pending"))
        try:
            completion = await asyncio.shield(entry.task)
        except asyncio.CancelledError:
            self._flush(entry)
            current = asyncio.current_task()
            if entry.lease_lost and current is not None and not current.cancelling():
                raise LeaseLost(str(entry.job_id)) from None
            if entry.cancel_requested and current is not None and not current.cancelling():
                return Outcome(
                    status=JobState.CANCELLED,
                    result_text=entry.answer_text(),
                    error={
                        "code": "cancelled",
                        "message": "cancelled while running",
                        "retryable": False,
                    },
                )
            entry.task.cancel()
            raise
        except Exception as exc:
            self._flush(entry)  # the last pieces go out before the final status
            return failure_outcome(job, classify(exc), self.settings)
        self._flush(entry)
        return Outcome(
            status=JobState.SUCCEEDED,
            result_text=completion.text,
            stop_reason=completion.stop_reason,
            usage=completion.usage,
            result=completion.result,
        )

    def _cut(self, entry: InFlight) -> None:
        """Cut the pieces not cut yet into the runs they travel as (delta_runs)."""
        n = len(entry.text)
        start = entry.cut
        if start < n:
            entry.flushed += [end for _, end in delta_runs(entry.shape, start, n)]

    def _publish(self, entry: InFlight) -> None:
        """Publish the runs cut and not published yet, in order, after the attempt's
        earlier events."""
        if entry.published >= len(entry.flushed):
            return
        job_id, tenant = str(entry.job_id), entry.tenant
        attempt, base_seq = entry.attempt, entry.base_seq
        start = entry.flushed[entry.published - 1] if entry.published else 0
        events = []
        for end in entry.flushed[entry.published :]:
            text, (kind, index, block, cited) = entry.run_of(start, end)
            events.append(
                delta_event(
                    job_id, tenant, base_seq + end, text, attempt, end, kind, index, block, cited
                )
            )
            start = end
        entry.published = len(entry.flushed)
        entry.published_at = asyncio.get_running_loop().time()
        entry.publishing = asyncio.create_task(self._publish_deltas(events, entry.publishing))

    def _flush(self, entry: InFlight) -> None:
        """If the attempt is watched, cut the pieces so far into runs and publish them
        (unwatched, they are cut when a watch starts: text_so_far)."""
        if entry.flush_handle is not None:
            entry.flush_handle.cancel()
            entry.flush_handle = None
        if self.interest.watched(entry):
            self._cut(entry)
            self._publish(entry)

    async def _publish_deltas(
        self, events: list[events_pb2.JobEvent], after: asyncio.Task[None] | None
    ) -> None:
        if after is not None:
            await after
        for event in events:
            try:
                await self.events.publish(event)
            except Exception as exc:  # deltas are live only; the result is stored at the end
                log.debug(
                    "delta publish failed", extra={"job_id": event.job_id, "error": repr(exc)}
                )

    async def _emit(self, job: Job, previous: str) -> None:
        try:  # with the other changes of this turn of the loop: a claim or finish group's
            await self.status_events.publish(job, previous)
        except Exception as exc:  # events are advisory; the row is the record
            log.warning("event publish failed", extra={"job_id": str(job.id), "error": repr(exc)})

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a database operation, retrying while Postgres is unreachable (or its
        statements time out), until the worker is stopping.

        Giving up would lose nothing (the message stays unacked) but would leave the
        job to stalled-job recovery; riding out a short outage is cheaper.
        """
        return await retry_transient(op, stopping=lambda: self.stopping)
