"""The batch lane: jobs of CONVEYOR_BATCH_LANES go through the Message Batches API.

Such jobs are not published to a worker queue (conveyor.bus.outbox holds them back); they
wait, pending, until this batcher, one more loop of the dispatcher, gathers them per
model into batches of at most CONVEYOR_BATCH_MAX_REQUESTS requests and
CONVEYOR_BATCH_MAX_BYTES bytes, sent when full or when the oldest has waited
CONVEYOR_BATCH_MAX_WAIT_S. It lives in the dispatcher because it is control-plane
work of the same kind as the timers: periodic, off the hot path, safe to run in every
dispatcher at once, and it needs no process of its own to scale.

Crash safety. A batch is recorded in Postgres (`batches`, its jobs in `batch_jobs`)
BEFORE `messages.batches.create` is called with custom_id = job id; the call and the
note that it succeeded (status `created`, jobs pending → running under the batch's
id as lease) happen in one transaction holding the batch's row and an advisory lock
that serializes creations. A dispatcher that died in between leaves a `recorded`
batch: the next one (any dispatcher) first lists the recent batches at the API and
adopts one created after the record, with the same number of requests, that no batch
row owns (the creation of a live dispatcher is always noted before the lock is
released); only when there is none does it create the batch. Results are written with
the worker's own conditional transitions (conveyor.db.transitions.finish under the batch's
lease), so reading them twice after a crash finishes no job twice.

Outcomes follow the worker's rules (conveyor.core.lifecycle.failure_outcome):
succeeded → the whole message and usage (service_tier `batch`, cost at the batch
price); errored → transient (overloaded, api_error, rate limit) is retried through
the batch lane with backoff or dead when attempts are exhausted, permanent fails;
canceled or expired at the API → CONVEYOR_BATCH_EXPIRED_POLICY (retry, or dead).

CancelJob on a batched job: the gateway flags it (the job is running); the next tick
here moves it to cancelled, so its result is dropped, and a batch whose jobs are all
cancelled is cancelled at the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import anthropic
import orjson
from opentelemetry.trace import Link, SpanKind, StatusCode, get_current_span
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.events import EventPublisher
from conveyor.core.config import Settings
from conveyor.core.lifecycle import Job, JobState, failure_outcome, transition
from conveyor.core.metrics import COST_USD, JOBS_FINISHED, JOBS_RETRIED, JOBS_STARTED, ModelNames
from conveyor.core.pricing import with_cost
from conveyor.core.telemetry import exporting, inject_headers, traceparent_context, tracer
from conveyor.db import batches as bdb
from conveyor.db import transitions as db
from conveyor.db.statements import utcnow
from conveyor.llm.provider import (
    SIMULATOR_HEADER_PREFIX,
    TRANSIENT_ERROR_TYPES,
    ProviderError,
    check_provider,
    classify,
)

log = logging.getLogger(__name__)

LIST_WINDOW_S = 60.0
"""An orphan (created, never noted) may show a creation time this much before its
record's, for clocks that disagree."""
HOLD_PAST_EXPIRY_S = 3600.0
"""A batched job's heartbeat is set this far past its batch's expiry: the stalled-job
sweeper leaves it to the batcher, and takes it back only if no batcher ran for that long."""
MAX_TRACE_LINKS = 1000
"""Links from a batch's span to its jobs' traces, at most."""
SIM_BATCH_RESULT_LABEL = "x-sim-batch-result"
"""With the simulator: a job labelled with this (`errored-500`, `expired`, ...) gets
that result in its batch; `x-sim-fail-attempts` limits it to those attempts."""


def completion_of(message: Mapping[str, Any]) -> db.Outcome:
    """A succeeded batch request as the worker writes a finished call: joined text,
    stop reason, the usage columns and the rest of the message."""
    content = list(message.get("content") or [])
    usage = dict(message.get("usage") or {})
    text = "".join(b.get("text") or "" for b in content if b.get("type") == "text")
    columns = (
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    )
    return db.Outcome(
        status=JobState.SUCCEEDED,
        result_text=text,
        stop_reason=message.get("stop_reason"),
        usage={k: int(usage.get(k) or 0) for k in columns},
        result={
            "id": message.get("id"),
            "model": message.get("model"),
            "content": content,
            "stop_sequence": message.get("stop_sequence"),
            "usage": usage,
        },
    )


def errored(error: Mapping[str, Any]) -> ProviderError:
    """An errored batch request, classified like a failed call: its error type decides."""
    inner = error.get("error") if isinstance(error.get("error"), Mapping) else error
    err_type = str(inner.get("type", "")) if isinstance(inner, Mapping) else ""
    message = str(inner.get("message", "")) if isinstance(inner, Mapping) else ""
    return ProviderError(
        code=err_type or "api_error",
        message=message or "the batch request errored",
        retryable=err_type in TRANSIENT_ERROR_TYPES,
    )


def sim_batch_results(jobs: Sequence[Job]) -> dict[str, str]:
    """The `x-sim-batch-results` header for the simulator, from the jobs' labels."""
    forced: dict[str, str] = {}
    for job in jobs:
        labels = job.labels or {}
        kind = labels.get(SIM_BATCH_RESULT_LABEL)
        if not kind:
            continue
        only = labels.get(SIMULATOR_HEADER_PREFIX + "fail-attempts")
        attempt = str(int(job.attempts) + 1)  # the attempt this batch will be
        if only and attempt not in {a.strip() for a in only.split(",")}:
            continue
        forced[str(job.id)] = kind
    return {"x-sim-batch-results": orjson.dumps(forced).decode()} if forced else {}


def _when(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


class Batcher:
    def __init__(
        self,
        engine: AsyncEngine,
        events: EventPublisher,
        settings: Settings,
        client: anthropic.AsyncAnthropic | None = None,
    ) -> None:
        self.engine = engine
        self.events = events
        self.settings = settings
        self.lanes = tuple(settings.batch_lanes)
        self.client = client or anthropic.AsyncAnthropic(
            api_key=check_provider(settings),
            base_url=settings.provider_base_url,
            max_retries=2,  # idempotent reads; a create is looked up before it is repeated
        )
        self.use_sim_headers = settings.provider == "simulator"
        self.model_label = ModelNames.from_settings(settings)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                moved = await self.tick()
                if any(moved.values()):
                    log.info("batcher", extra=moved)
            except Exception as exc:  # Postgres or the API away: try again next tick
                log.warning("batcher pass failed", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.dispatcher_interval_s)

    async def tick(self) -> dict[str, int]:
        """One pass: cancels, new batches, recorded ones created, created ones polled."""
        cancelled = await self.cancel_sweep()
        recorded = await self.flush()
        created = 0
        for row in await bdb.open_batches(self.engine, "recorded", due_only=False):
            created += await self.submit(row["id"])
        written = 0
        for row in await bdb.open_batches(self.engine, "created"):
            written += await self.poll(row)
        return {  # (not `created`: a LogRecord attribute)
            "jobs_cancelled": cancelled,
            "batches_recorded": recorded,
            "batches_created": created,
            "results_written": written,
        }

    # -- gathering

    async def flush(self) -> int:
        """Record a batch for each model whose waiting jobs fill one or waited long enough."""
        now = utcnow()
        recorded = 0
        for w in await bdb.waiting(self.engine, self.lanes):
            full = w.jobs >= self.settings.batch_max_requests or (
                w.bytes >= self.settings.batch_max_bytes
            )
            aged = (now - w.oldest).total_seconds() >= self.settings.batch_max_wait_s
            if not (full or aged):
                continue
            made = await bdb.record(
                self.engine,
                self.lanes,
                w.model,
                self.settings.batch_max_requests,
                self.settings.batch_max_bytes,
            )
            if made is not None:
                recorded += 1
                log.info(
                    "batch recorded",
                    extra={"batch_id": str(made[0]), "model": w.model, "jobs": made[1]},
                )
        return recorded

    # -- creating

    async def submit(self, batch_id: uuid.UUID) -> int:
        """Create a recorded batch at the API (or adopt the one a dead dispatcher created);
        1 if it is created now."""
        if self.settings.batch_test_pause == "recorded":
            await self._test_pause("recorded")
        claimed: list[Job] = []
        async with bdb.locked(self.engine, batch_id, "recorded", bdb.SUBMIT_LOCK) as (conn, row):
            if row is None:
                return 0
            jobs = await bdb.batch_jobs(conn, batch_id)
            if all(j.status == JobState.CANCELLED for j in jobs):
                await bdb.end_empty(conn, batch_id)
                return 0
            links = [
                Link(get_current_span(traceparent_context(j.traceparent)).get_span_context())
                for j in jobs[:MAX_TRACE_LINKS]
                if j.traceparent
            ]
            with tracer().start_as_current_span(
                f"batch create {row['model']}",
                kind=SpanKind.CLIENT,
                links=links,
                attributes={
                    "conveyor.batch.id": str(batch_id),
                    "conveyor.batch.requests": len(jobs),
                    "gen_ai.request.model": row["model"],
                },
            ) as span:
                provider_batch = await self._adopt(conn, row)
                if provider_batch is None:
                    requests = [
                        {
                            "custom_id": str(j.id),
                            "params": bdb.params_of(j.model, j.request or {}),
                        }
                        for j in jobs
                    ]
                    headers = sim_batch_results(jobs) if self.use_sim_headers else {}
                    provider_batch = await self.client.messages.batches.create(
                        requests=requests,  # type: ignore[arg-type]
                        extra_headers=headers or None,
                    )
                    if self.settings.batch_test_pause == "api":
                        await self._test_pause("api")  # created, not yet noted
                    log.info(
                        "batch created",
                        extra={"batch_id": str(batch_id), "provider_batch_id": provider_batch.id},
                    )
                span.set_attribute("conveyor.batch.provider_id", provider_batch.id)
                traceparent = inject_headers().get("traceparent")
                await conn.execute(
                    "UPDATE batches SET traceparent = $2 WHERE id = $1", batch_id, traceparent
                )
                claimed = await bdb.mark_created(
                    conn,
                    batch_id,
                    provider_batch.id,
                    _when(provider_batch.expires_at),
                    self.settings.batch_poll_s,
                    HOLD_PAST_EXPIRY_S,
                )
        for job in claimed:
            JOBS_STARTED.labels(job.lane).inc()
        await self._emit_all(claimed, "pending")
        if self.settings.batch_test_pause == "created":
            await self._test_pause("created")
        return 1

    async def _adopt(self, conn: Any, row: Mapping[str, Any]) -> Any | None:
        """A batch at the API created for this record by a dispatcher that died before
        noting it: created after the record, as many requests, owned by no row."""
        since = row["recorded_at"].timestamp() - LIST_WINDOW_S
        candidates = []
        page = await self.client.messages.batches.list(limit=100)
        async for batch in page:
            if batch.created_at.timestamp() < since:
                break
            counts = batch.request_counts
            total = (
                counts.processing
                + counts.succeeded
                + counts.errored
                + counts.canceled
                + counts.expired
            )
            if total == row["request_count"]:
                candidates.append(batch)
        if not candidates:
            return None
        owned = await bdb.registered_provider_ids(conn, [b.id for b in candidates])
        orphans = [b for b in candidates if b.id not in owned]
        if not orphans:
            return None
        # The earliest after the record: the one its crashed creator made.
        orphans.sort(key=lambda b: b.created_at)
        log.warning(
            "recorded batch adopted: created before a crash",
            extra={"batch_id": str(row["id"]), "provider_batch_id": orphans[0].id},
        )
        return orphans[0]

    # -- results

    async def poll(self, row: Mapping[str, Any]) -> int:
        """Look at a created batch; once ended, write its jobs' outcomes. How many."""
        batch_id = row["id"]
        try:
            batch = await self.client.messages.batches.retrieve(row["provider_batch_id"])
        except anthropic.NotFoundError:
            batch = None
        if batch is not None and batch.processing_status != "ended":
            wait = min(
                self.settings.batch_poll_max_s, self.settings.batch_poll_s * 2 ** row["polls"]
            )
            await bdb.next_poll(self.engine, batch_id, wait)
            return 0
        async with bdb.locked(self.engine, batch_id, "created") as (conn, locked):
            if locked is None:
                return 0  # another dispatcher writes them
            jobs = {str(j.id): j for j in await bdb.batch_jobs(conn, batch_id)}
            with tracer().start_as_current_span(
                f"batch results {row['model']}",
                context=traceparent_context(row["traceparent"]),
                kind=SpanKind.CLIENT,
                attributes={
                    "conveyor.batch.id": str(batch_id),
                    "conveyor.batch.provider_id": row["provider_batch_id"],
                },
            ) as span:
                written, outcomes, cost = await self._write_results(row, batch, jobs)
                counts = batch.request_counts.model_dump() if batch is not None else {}
                span.set_attributes({f"conveyor.batch.{k}": v for k, v in counts.items()})
                if batch is None:
                    span.set_status(StatusCode.ERROR, "batch not found at the API")
            await bdb.mark_ended(conn, batch_id, counts, cost, outcomes)
        log.info(
            "batch results written",
            extra={"batch_id": str(batch_id), "jobs": written, **counts},
        )
        return written

    async def _write_results(
        self, row: Mapping[str, Any], batch: Any, jobs: Mapping[str, Job]
    ) -> tuple[int, dict[uuid.UUID, str], int | None]:
        batch_id: uuid.UUID = row["id"]
        outcomes: dict[uuid.UUID, str] = {}
        cost: int | None = 0
        written = 0
        if batch is not None:
            async for item in await self.client.messages.batches.results(batch.id):
                job = jobs.get(item.custom_id)
                if job is None:
                    log.warning(
                        "batch result for no job of the batch ignored",
                        extra={"batch_id": str(batch_id), "custom_id": item.custom_id},
                    )
                    continue
                result = item.result.model_dump(mode="json")
                outcomes[job.id] = result["type"]
                if job.status != JobState.RUNNING or job.lease_id != batch_id:
                    continue  # cancelled meanwhile (its result dropped) or written already
                outcome = with_cost(self._outcome(job, result), row["model"], batch=True)
                if outcome.status is JobState.SUCCEEDED:
                    price = outcome.cost_micros
                    cost = None if cost is None or price is None else cost + price
                written += await self._finish(row, job, outcome)
        for job in jobs.values():  # in the batch but not in its results: as if expired
            if job.id in outcomes:
                continue
            outcomes[job.id] = "missing"
            if job.status == JobState.RUNNING and job.lease_id == batch_id:
                written += await self._finish(row, job, self._outcome(job, {"type": "expired"}))
        return written, outcomes, cost

    def _outcome(self, job: Job, result: Mapping[str, Any]) -> db.Outcome:
        kind = result.get("type")
        if kind == "succeeded":
            return completion_of(result["message"])
        if kind == "errored":
            return failure_outcome(job, errored(result.get("error") or {}), self.settings)
        error = ProviderError(
            code=f"batch_{kind}",
            message=f"the batch request was {kind} at the API",
            retryable=self.settings.batch_expired_policy == "retry",
        )
        if not error.retryable:
            return db.Outcome(
                status=JobState.DEAD,
                error=error.as_dict(),
                dead_reason=f"batch request {kind} (CONVEYOR_BATCH_EXPIRED_POLICY=dead)",
            )
        return failure_outcome(job, error, self.settings)

    async def _finish(self, row: Mapping[str, Any], job: Job, outcome: db.Outcome) -> int:
        """Write one job's outcome under the batch's lease, as the worker would."""
        done = await db.finish(self.engine, job.id, row["id"], outcome)
        if done is None:
            return 0
        if exporting():
            tracer().start_span(
                "batch request",
                context=traceparent_context(job.traceparent),
                attributes={
                    "conveyor.job.id": str(job.id),
                    "conveyor.batch.id": str(row["id"]),
                    "conveyor.batch.provider_id": row["provider_batch_id"],
                    "conveyor.job.status": outcome.status.value,
                },
                start_time=int(row["submitted_at"].timestamp() * 1e9),
            ).end()
        if outcome.cost_micros:
            COST_USD.labels(self.model_label(row["model"]), done.lane).inc(
                outcome.cost_micros / 1e6
            )
        if outcome.status is JobState.SCHEDULED:
            JOBS_RETRIED.labels(done.lane).inc()
        elif outcome.status.terminal:
            JOBS_FINISHED.labels(done.lane, outcome.status.value).inc()
        await self._emit_all([done], "running")
        return 1

    # -- cancelling

    async def cancel_sweep(self) -> int:
        """Cancel the batched jobs whose cancel was requested; cancel at the API the
        batches none of whose jobs is wanted any more."""
        moved = 0
        for r in await bdb.cancel_requested(self.engine):
            done = await db.transition(
                self.engine,
                r["id"],
                transition("cancel_running").from_states,
                JobState.CANCELLED,
                detail={"reason": "cancelled while in a batch", "batch_id": str(r["batch_id"])},
            )
            if done is not None:
                moved += 1
                JOBS_FINISHED.labels(done.lane, "cancelled").inc()
                await self._emit_all([done], "running")
        for b in await bdb.all_cancelled(self.engine):
            try:
                await self.client.messages.batches.cancel(b["provider_batch_id"])
            except anthropic.APIStatusError as exc:
                log.warning("batch cancel refused", extra={"error": str(classify(exc))})
            await bdb.mark_cancel_sent(self.engine, b["id"])
            log.info(
                "batch cancelled at the API: all its jobs were cancelled",
                extra={"batch_id": str(b["id"]), "provider_batch_id": b["provider_batch_id"]},
            )
        return moved

    # -- helpers

    async def _emit_all(self, jobs: Sequence[Job], previous: str) -> None:
        for job in jobs:
            try:
                await self.events.publish_status(job, previous)
            except Exception as exc:  # events are advisory; the row is the record
                log.warning(
                    "event publish failed", extra={"job_id": str(job.id), "error": repr(exc)}
                )

    async def _test_pause(self, where: str) -> None:
        log.warning("batcher paused for a test", extra={"at": where})
        await asyncio.sleep(3600)

    async def close(self) -> None:
        await self.client.close()


async def run_batcher(
    engine: AsyncEngine, events: EventPublisher, settings: Settings, stop: asyncio.Event
) -> None:
    """The batch lane's loop, when CONVEYOR_BATCH_LANES names any lane."""
    if not settings.batch_lanes:
        return
    batcher = Batcher(engine, events, settings)
    try:
        await batcher.run(stop)
    finally:
        await batcher.close()
