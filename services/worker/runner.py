"""Running one delivered job: claim, call the model, write the outcome, then ack.

The ack comes only after the outcome is committed, so a worker that dies at
any point leaves the message unacked and the broker redelivers it. The claim is
a conditional UPDATE under a fresh lease: a duplicate delivery of a job that is
running or finished is acked without calling the model, and an outcome whose
lease was taken over (stalled-job recovery) is refused by the database.

A job whose tenant already runs as many jobs as its limit allows is not
claimed: its message goes back to the queue and the worker stops taking that
tenant's jobs for a moment. Before the model call, the call waits for provider
budget (services.worker.limiter); that wait counts against the job's timeout.

The heartbeat (`renew_leases`) learns which leases were taken over and aborts those
calls; while it cannot reach Postgres, `abort_unrenewed` aborts calls whose lease may
have expired. An aborted call writes nothing and its message is acked: the job is
someone else's (or the sweeper's) now, so the model is not called twice at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.broker import PUBLISHED_AT_HEADER, JobMessage, lane_of
from conveyor.bus.catchup import Delta
from conveyor.bus.events import EventPublisher, Shape, delta_event, delta_runs, shape_of
from conveyor.core.config import Settings
from conveyor.core.lifecycle import JobState, backoff_s
from conveyor.core.metrics import (
    COST_USD,
    IN_FLIGHT,
    JOBS_FINISHED,
    JOBS_RETRIED,
    JOBS_STARTED,
    QUEUE_WAIT,
    RUN_TIME,
    TENANT_DEFERRED,
    TOKENS,
    ModelNames,
)
from conveyor.core.pricing import cost_micros
from conveyor.core.telemetry import context_from_headers, tracer
from conveyor.db import jobs as db
from conveyor.db.engine import is_transient
from conveyor.llm.provider import (
    TEXT,
    Completion,
    DeltaSink,
    Provider,
    ProviderError,
    classify,
)
from conveyor.v1 import events_pb2

from .limiter import ProviderLimiter

log = logging.getLogger(__name__)

SIMULATOR_HEADER_PREFIX = "x-sim-"
"""Labels with this prefix become HTTP headers when the provider is the simulator
(CONVEYOR_PROVIDER=simulator), so a test can make one particular job fail; with
the real API a tenant's labels never become request headers."""


def simulator_headers(labels: Mapping[str, str] | None, attempt: int) -> dict[str, str]:
    """The request headers for the simulator: the job's `x-sim-*` labels and its attempt."""
    headers = {k: v for k, v in (labels or {}).items() if k.startswith(SIMULATOR_HEADER_PREFIX)}
    headers["x-sim-attempt"] = str(attempt)
    return headers


@dataclass
class InFlight:
    """A job this worker is running."""

    job_id: uuid.UUID
    lease: uuid.UUID
    task: asyncio.Task[Completion] | None = None
    text: list[str] = field(default_factory=list)
    """The streamed pieces of the attempt (text, tool input, thinking...), in order."""
    shape: list[Shape] = field(default_factory=list)
    """What each piece of `text` is: (kind, block index, block_json, citation_json)."""
    cancel_requested: bool = False
    sent: int = 0
    """How many of `text` went out as delta events."""
    flush_scheduled: bool = False
    publishing: asyncio.Task[None] | None = None
    """The latest event publish (the RUNNING event, then each delta): each waits for
    the one before it, and the final status event waits for the last."""
    attempt: int = 0
    base_seq: int = 0
    """Sequence number of the attempt's RUNNING event: text piece n has base_seq + n."""
    flushed: list[int] = field(default_factory=list)
    """len(text) at each delta event sent: where the published deltas end."""

    def run_of(self, start: int, end: int) -> tuple[str, Shape]:
        """The text and shape of the delta event made of pieces start..end."""
        return "".join(self.text[start:end]), self.shape[start]

    def answer_text(self) -> str:
        """The text of the text blocks so far (a cancelled run's partial result)."""
        return "".join(t for t, s in zip(self.text, self.shape, strict=True) if s[0] == TEXT)

    renewed_at: float = field(default_factory=time.monotonic)
    """When (time.monotonic) the last heartbeat that renewed the lease was sent."""
    lease_lost: bool = False


class LeaseLost(Exception):
    """The attempt's lease was taken over, or could not be renewed in time: its call
    was aborted and its outcome must not be written."""


def lease_hold_s(lease_s: float, heartbeat_s: float) -> float:
    """How long a worker keeps a call running without a renewed lease.

    The sweeper may requeue a job `lease_s` after its last renewal; the worker looks
    once per heartbeat, so it gives up one heartbeat earlier (at least half the lease).
    """
    return max(lease_s - heartbeat_s, lease_s / 2)


def failure_outcome(row: Mapping[str, Any], error: ProviderError, settings: Settings) -> db.Outcome:
    """The outcome of a failed attempt (the job row as claimed): failed when permanent,
    dead when attempts are exhausted, else scheduled for a retry with backoff. Shared by
    the worker and the batch lane (services.dispatcher.batcher)."""
    attempt, max_attempts = row["attempts"], row["max_attempts"]
    extra = {"job_id": str(row["id"]), "attempt": attempt, "error": str(error)}
    if not error.retryable:
        log.info("permanent failure", extra=extra)
        return db.Outcome(status=JobState.FAILED, error=error.as_dict())
    if attempt >= max_attempts:
        log.info("attempts exhausted", extra=extra)
        return db.Outcome(
            status=JobState.DEAD,
            error=error.as_dict(),
            dead_reason=f"attempts exhausted ({attempt} of {max_attempts})",
        )
    delay = backoff_s(attempt, settings.retry_base_s, settings.retry_cap_s, error.retry_after_s)
    log.info("transient failure; retry scheduled", extra={**extra, "retry_in_s": round(delay, 3)})
    return db.Outcome(
        status=JobState.SCHEDULED,
        error=error.as_dict(),
        retry_in_s=delay,
    )


def with_cost(outcome: db.Outcome, model: str, *, batch: bool = False) -> db.Outcome:
    """The outcome with its attempt's cost, from the whole usage the provider reported
    (the cache writes' TTL split is there); 0 without usage, None for an unpriced model."""
    full = (outcome.result or {}).get("usage")
    usage = full if isinstance(full, Mapping) else (outcome.usage or {})
    return dataclasses.replace(outcome, cost_micros=cost_micros(model, usage, batch=batch))


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
        self.provider = provider
        self.events = events
        self.limiter = limiter
        self.on_tenant_full = on_tenant_full
        self.name = f"{socket.gethostname()}:{id(self)}"
        self.inflight: dict[uuid.UUID, InFlight] = {}
        self.stopping = False
        self.use_sim_headers = settings.provider == "simulator"
        self.model_label = ModelNames.from_settings(settings)

    def text_so_far(self, job_id: uuid.UUID, attempt: int) -> tuple[int, list[Delta]] | None:
        """The deltas a running attempt sent so far (conveyor.bus.catchup.Delta: output_tokens,
        text, kind, block index, block JSON, citation JSON), with the
        sequence number of its RUNNING event; None if this worker does not run that
        attempt. (conveyor.bus.catchup: a notifier catching a watcher up asks for it.)"""
        entry = self.inflight.get(job_id)
        if entry is None or entry.attempt != attempt:
            return None
        deltas: list[Delta] = []
        start = 0
        for end in entry.flushed:
            text, (kind, index, block, cited) = entry.run_of(start, end)
            deltas.append((end, text, kind, index, block.decode(), cited.decode()))
            start = end
        return entry.base_seq, deltas

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

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Process one delivery; always settles the message (ack, reject) or leaves it
        unacked only when the process is going away."""
        received_ns = time.time_ns()
        with tracer().start_as_current_span(
            f"{lane_of(message.routing_key) or 'job'} process",
            context=context_from_headers(message.headers),
            kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "rabbitmq", "messaging.operation.type": "process"},
        ) as span:
            try:
                job = JobMessage.decode(message.body)
            except ValueError as exc:
                span.set_status(StatusCode.ERROR, "poison message")
                log.error("poison message dead-lettered", extra={"error": str(exc)})
                await message.reject(requeue=False)
                return
            span.set_attribute("conveyor.job.id", str(job.job_id))
            self._record_queue_wait(message, received_ns)
            await self._handle(job, message)

    def _record_queue_wait(self, message: AbstractIncomingMessage, received_ns: int) -> None:
        published = (message.headers or {}).get(PUBLISHED_AT_HEADER)
        if not isinstance(published, int) or published > received_ns:
            return
        tracer().start_span("queue wait", start_time=published).end(end_time=received_ns)
        QUEUE_WAIT.labels(lane_of(message.routing_key)).observe((received_ns - published) / 1e9)

    async def _handle(self, job: JobMessage, message: AbstractIncomingMessage) -> None:
        lease = uuid.uuid4()
        claimed_at = time.monotonic()

        async def claim() -> Mapping[str, Any] | None:
            nonlocal claimed_at
            claimed_at = time.monotonic()  # the lease runs from before the claim's write
            return await db.claim(self.engine, job.job_id, lease, self.name, job.tenant)

        with tracer().start_as_current_span("claim"):
            row = await self._retrying(claim)
        if row is None:
            await self._not_claimed(job, message)
            return
        lane = row["lane"]
        JOBS_STARTED.labels(lane).inc()
        started = time.monotonic()
        entry = InFlight(
            job_id=job.job_id,
            lease=lease,
            attempt=row["attempts"],
            base_seq=row["seq"],
            renewed_at=claimed_at,
        )
        self.inflight[job.job_id] = entry
        IN_FLIGHT.inc()
        try:
            try:
                outcome = await self._run(row, entry)
            except asyncio.CancelledError:
                await self._hand_back(job.job_id, lease, message, row["seq"] + len(entry.text))
                raise
            except LeaseLost:
                # Taken over (or about to be): its new attempt has a message of its own.
                await message.ack()
                return
            outcome = with_cost(outcome, row["model"])
            with tracer().start_as_current_span("write outcome") as span:
                span.set_attribute("conveyor.job.status", outcome.status.value)
                done = await self._retrying(
                    lambda: db.finish(
                        self.engine,
                        job.job_id,
                        lease,
                        outcome,
                        seq_floor=row["seq"] + len(entry.text),
                    )
                )
        finally:
            # A later attempt of the same job may run here already (this one's lease lost).
            if self.inflight.get(job.job_id) is entry:
                del self.inflight[job.job_id]
            IN_FLIGHT.dec()
        if done is None:
            log.warning("outcome refused: lease taken over", extra={"job_id": str(job.job_id)})
            await message.ack()
            return
        if entry.publishing is not None:
            await entry.publishing  # the last tokens go out before the final status
        RUN_TIME.labels(lane, outcome.status.value).observe(time.monotonic() - started)
        if outcome.cost_micros:
            COST_USD.labels(self.model_label(row["model"]), lane).inc(outcome.cost_micros / 1e6)
        if outcome.status is JobState.SCHEDULED:
            JOBS_RETRIED.labels(lane).inc()
        elif outcome.status.terminal:
            JOBS_FINISHED.labels(lane, outcome.status.value).inc()
        await self._emit(done, "running")
        log.info(
            "job %s",
            done["status"],
            extra={"job_id": str(job.job_id), "attempt": done["attempts"]},
        )
        # Acked even when the job is dead: it is written dead already (reason and last
        # error). A dead letter would add nothing, and one still queued when RetryJob
        # revives the job would make the dispatcher kill the revived job again. The DLX
        # is for messages this worker could not record (poison, unexpected errors).
        await message.ack()

    async def _hand_back(
        self,
        job_id: uuid.UUID,
        lease: uuid.UUID,
        message: AbstractIncomingMessage,
        seq_floor: int = 0,
    ) -> None:
        """Shutdown interrupted the call: return the job to pending and requeue it."""
        try:
            row = await db.release(self.engine, job_id, lease, seq_floor)
            if row is not None:
                await self._emit(row, "running")
            await message.nack(requeue=True)
            log.info("job handed back", extra={"job_id": str(job_id)})
        except Exception as exc:  # the unacked message is redelivered when we disconnect
            log.warning("hand-back incomplete", extra={"job_id": str(job_id), "error": repr(exc)})

    async def _not_claimed(self, job: JobMessage, message: AbstractIncomingMessage) -> None:
        """The job was not pending: unknown, cancelled, running elsewhere or finished."""
        async with self.engine.connect() as conn:
            current = await db.get_job(conn, job.job_id)
        if current is None:
            log.error("message names no job; dead-lettered", extra={"job_id": str(job.job_id)})
            await message.reject(requeue=False)
            return
        if current["status"] == JobState.PENDING and current["cancel_requested_at"] is None:
            await self._defer(current, message)
            return
        if current["status"] == JobState.PENDING and current["cancel_requested_at"] is not None:
            row = await db.transition(
                self.engine, job.job_id, [JobState.PENDING], JobState.CANCELLED
            )
            if row is not None:
                await self._emit(row, "pending")
        log.info(
            "duplicate or skipped delivery acked",
            extra={"job_id": str(job.job_id), "status": current["status"]},
        )
        await message.ack()

    async def _defer(self, current: Mapping[str, Any], message: AbstractIncomingMessage) -> None:
        """The job is pending but was not claimed: its tenant is at its concurrency limit.

        The message goes back to its queue (at its place) for a later delivery; the
        tenant's queues are paused in this worker meanwhile, so the worker's slots go
        to other tenants. A delivery from a shared lane queue (fairness off) cannot be
        paused by tenant, so it is held for the pause before going back.
        """
        tenant = current["tenant"]
        TENANT_DEFERRED.labels(tenant).inc()
        hold = await self.on_tenant_full(tenant) if self.on_tenant_full is not None else 1.0
        if message.routing_key == current["lane"]:
            await asyncio.sleep(hold)
        log.debug(
            "tenant at its concurrency limit; job handed back",
            extra={"job_id": str(current["id"]), "tenant": tenant},
        )
        await message.nack(requeue=True)

    async def _run(self, row: Mapping[str, Any], entry: InFlight) -> db.Outcome:
        """Call the model and turn what happened into an outcome."""
        job_id, tenant, attempt = str(row["id"]), row["tenant"], row["attempts"]
        base_seq = row["seq"]

        loop = asyncio.get_running_loop()

        def flush() -> None:
            entry.flush_scheduled = False
            n = len(entry.text)
            for start, end in delta_runs(entry.shape, entry.sent, n):
                text, (kind, index, block, cited) = entry.run_of(start, end)
                entry.flushed.append(end)
                event = delta_event(
                    job_id, tenant, base_seq + end, text, attempt, end, kind, index, block, cited
                )
                entry.publishing = asyncio.create_task(self._publish_delta(event, entry.publishing))
            entry.sent = n

        def on_delta(kind: int, index: int, text: str, block: bytes, cited: bytes) -> None:
            # Pieces of one block and kind that arrive in one turn of the event loop travel
            # as one event: no added latency, and a fast stream costs one publish per read,
            # not per token.
            entry.text.append(text)
            entry.shape.append(shape_of(kind, index, block, cited))
            if not entry.flush_scheduled:
                entry.flush_scheduled = True
                loop.call_soon(flush)

        headers = simulator_headers(row["labels"], attempt) if self.use_sim_headers else {}
        entry.task = asyncio.create_task(self._call(row, on_delta, headers))
        # The RUNNING event is published once the request is on its way (the call's task
        # runs first); the deltas wait for it, so it still comes first.
        entry.publishing = asyncio.create_task(self._emit(row, "pending"))
        try:
            completion = await asyncio.shield(entry.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if entry.lease_lost and current is not None and not current.cancelling():
                raise LeaseLost(str(entry.job_id)) from None
            if entry.cancel_requested and current is not None and not current.cancelling():
                return db.Outcome(
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
            return self._failure(row, classify(exc))
        return db.Outcome(
            status=JobState.SUCCEEDED,
            result_text=completion.text,
            stop_reason=completion.stop_reason,
            usage=completion.usage,
            result=completion.result,
        )

    async def _call(
        self, row: Mapping[str, Any], on_delta: DeltaSink, headers: Mapping[str, str]
    ) -> Completion:
        """One model call, after waiting for provider budget, as a GenAI client span
        (semantic conventions for gen_ai.*). The job's timeout runs from here: the wait
        for budget is part of it, so a job cannot wait for budget without end."""
        deadline = asyncio.get_running_loop().time() + row["timeout_ms"] / 1000
        limiter = self.limiter
        if limiter is None:
            return await self._model_call(row, on_delta, headers, None, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                permit = await limiter.acquire(row["model"], row["request"])
        except TimeoutError:
            raise TimeoutError("the job's timeout ran out waiting for rate-limit budget") from None
        usage: Mapping[str, int] | None = None
        try:

            async def observe(response_headers: Mapping[str, str]) -> None:
                await limiter.observe(permit, response_headers)

            completion = await self._model_call(row, on_delta, headers, observe, deadline)
            usage = completion.usage
            return completion
        except Exception as exc:
            error = classify(exc)
            if error.http_status == 429:
                await limiter.throttled(permit, error.retry_after_s, error.headers)
            raise
        finally:
            limiter.settle(permit, usage)

    async def _model_call(
        self,
        row: Mapping[str, Any],
        on_delta: DeltaSink,
        headers: Mapping[str, str],
        on_response: Callable[[Mapping[str, str]], Awaitable[None]] | None,
        deadline: float,
    ) -> Completion:
        model = row["model"]
        with tracer().start_as_current_span(
            f"chat {model}",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.system": "anthropic",
                "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": row["request"].get("max_tokens", 0),
                "conveyor.attempt": row["attempts"],
                "conveyor.retry_number": row["attempts"] - 1,
            },
        ) as span:
            try:
                async with asyncio.timeout_at(deadline):
                    completion = await self.provider.stream(
                        model, row["request"], on_delta, headers, on_response
                    )
            except BaseException as exc:
                if not isinstance(exc, asyncio.CancelledError):
                    error = classify(exc)
                    span.set_attribute("error.type", error.code)
                    span.set_status(StatusCode.ERROR, error.message)
                raise
            usage = completion.usage
            span.set_attributes(
                {
                    "gen_ai.response.model": model,
                    "gen_ai.response.finish_reasons": [completion.stop_reason],
                    "gen_ai.usage.input_tokens": usage["input_tokens"],
                    "gen_ai.usage.output_tokens": usage["output_tokens"],
                }
            )
            label = self.model_label(model)  # `other` unless known or allowed
            TOKENS.labels(label, "input").inc(usage["input_tokens"])
            TOKENS.labels(label, "output").inc(usage["output_tokens"])
            return completion

    def _failure(self, row: Mapping[str, Any], error: ProviderError) -> db.Outcome:
        return failure_outcome(row, error, self.settings)

    async def _publish_delta(
        self, event: events_pb2.JobEvent, after: asyncio.Task[None] | None
    ) -> None:
        if after is not None:
            await after
        try:
            await self.events.publish(event)
        except Exception as exc:  # deltas are live only; the result is stored at the end
            log.debug("delta publish failed", extra={"job_id": event.job_id, "error": repr(exc)})

    async def _emit(self, row: Mapping[str, Any], previous: str) -> None:
        try:
            await self.events.publish_status(row, previous)
        except Exception as exc:  # events are advisory; the row is the record
            log.warning(
                "event publish failed", extra={"job_id": str(row["id"]), "error": repr(exc)}
            )

    async def _retrying(self, op: Any) -> Any:
        """Run a database operation, retrying while Postgres is unreachable (or its
        statements time out).

        Giving up would lose nothing (the message stays unacked) but would leave the
        job to stalled-job recovery; riding out a short outage is cheaper.
        """
        delay = 0.1
        while True:
            try:
                return await op()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._log_db_retry(exc)
            if self.stopping:
                raise ConnectionError("database unavailable while stopping")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    @staticmethod
    def _log_db_retry(exc: BaseException) -> None:
        log.warning("database unavailable; retrying", extra={"error": repr(exc)})
