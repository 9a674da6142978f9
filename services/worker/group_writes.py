"""Group commit of the worker's claims and outcomes, and its status events in batches.

Every job the worker runs makes two writes (conveyor.db.transitions: its claim and its
outcome), each one statement, and two status events (RUNNING, then the outcome's).
Postgres spends about 0.33 ms of CPU per statement and 0.06 ms per row
(`python -m bench.floors`), so concurrent claims share one statement
(`transitions.claim_many`) and so do concurrent outcomes (`transitions.finish_many`),
as the gateway's submits share their INSERT (services.gateway.group_insert).

`GroupWriter` runs one statement of a kind at a time, and starts one at most every
`GROUP_INTERVAL_S`: a write that arrives when none ran lately goes at once, alone (the
single-job statement, exactly as before); the writes that arrive while one runs (or
within the interval) wait and then go together, up to `max_rows`. An idle worker adds
no latency; a busy one spends a statement on many jobs.

Each group keeps what its single statements guaranteed:
- a lost connection or a statement that timed out or met a deadlock is tried again,
  for the whole group (`retry_transient`), until the worker is stopping;
- one job's bad value (a data error, e.g. a NUL in its result text) fails that job
  alone: the statement wrote nothing, so the group is split in halves and each half
  tried again until the job holding the value fails by itself;
- each job's conditions (from-states, its lease, no cancel requested) are checked per
  row, so one refused job does not refuse its group;
- claims of a tenant with a concurrency limit go through the single statement
  (`transitions.claim`), which locks the tenant row and checks the count one job at a
  time; a tenant seen with a limit skips the group for `LIMITED_MEMORY_S`.

The statements run in a task of their own: a caller cancelled while it waits (shutdown)
interrupts no one else's write. Its own write may still be made: a claim nobody runs
then is recovered by the stalled-job sweeper, an outcome is written as it would have been.

`StatusEvents` publishes the status changes made in one turn of the event loop (the
RUNNING events of a claim group, the outcomes of a finish group: their callers wake
together) as one `JobEventBatch` per tenant and status, each event carrying the trace
context of the job's own work; a lone change goes as one event, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.events import EventPublisher, status_event
from conveyor.core.lifecycle import Job, Outcome
from conveyor.core.telemetry import inject_headers
from conveyor.db import transitions
from conveyor.db.engine import retry_transient, write_by_halves
from conveyor.db.transitions import ClaimRequest, FinishRequest

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

GROUP_INTERVAL_S = 0.002
"""A statement of a kind starts at most this often (as the gateway's INSERTs,
CONVEYOR_GATEWAY_GROUP_INTERVAL_MS): without pacing, a busy worker's statements follow
each other as fast as they return, with a job or two each. One that comes after a
longer pause starts at once."""

LIMITED_MEMORY_S = 60.0
"""How long a tenant seen with a concurrency limit has its claims made one by one
without first trying the group (a limit set or lifted meanwhile is seen by either
statement: the single one checks it, the grouped one leaves limited tenants out)."""


@dataclass
class _Waiting(Generic[In, Out]):
    item: In
    done: asyncio.Future[tuple[Out, float]]


class GroupWriter(Generic[In, Out]):
    """Runs `write_one` for a lone item and `write_many` for several that waited together;
    `write_many` returns one result per item, in order."""

    def __init__(
        self,
        write_one: Callable[[In], Awaitable[Out]],
        write_many: Callable[[list[In]], Awaitable[list[Out]]],
        *,
        name: str,
        max_rows: int = 500,
        interval_s: float = 0.0,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.write_one = write_one
        self.interval_s = interval_s
        self._next_start = 0.0
        self.write_many = write_many
        self.name = name
        self.max_rows = max_rows
        self.stopping = stopping
        self._waiting: deque[_Waiting[In, Out]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.statements = 0
        """Statements run (tries included), for the benchmark and tests."""
        self.rows = 0
        """Items written by them."""

    async def write(self, item: In) -> tuple[Out, float]:
        """`item` written; its result and when (time.monotonic) the statement that wrote
        it started."""
        me: _Waiting[In, Out] = _Waiting(item, asyncio.get_running_loop().create_future())
        self._waiting.append(me)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await me.done

    async def _drain(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            while self._waiting:
                pause = self._next_start - loop.time()
                if pause > 0:  # a statement started moments ago: gather more for the next
                    await asyncio.sleep(pause)
                self._next_start = loop.time() + self.interval_s
                batch: list[_Waiting[In, Out]] = []
                while self._waiting and len(batch) < self.max_rows:
                    waiting = self._waiting.popleft()
                    if not waiting.done.done():  # its caller is gone: nothing to write
                        batch.append(waiting)
                if batch:
                    await write_by_halves(batch, self._write, _fail, self.name)
        finally:
            self._task = None
            if self._waiting:  # only if cancelled: nothing else leaves items behind
                _fail(list(self._waiting), asyncio.CancelledError())
                self._waiting.clear()

    async def _write(self, batch: Sequence[_Waiting[In, Out]]) -> None:
        """One statement for `batch` (tried again while the database is unavailable),
        and the answers."""
        items = [w.item for w in batch]
        started = 0.0

        async def attempt() -> list[Out]:
            nonlocal started
            started = time.monotonic()
            self.statements += 1
            if len(items) == 1:
                return [await self.write_one(items[0])]
            return await self.write_many(items)

        results = await retry_transient(
            attempt,
            message=f"database unavailable; {self.name} retrying",
            stopping=self.stopping,
        )
        self.rows += len(batch)
        for waiting, result in zip(batch, results, strict=True):
            if not waiting.done.done():
                waiting.done.set_result((result, started))

    async def close(self) -> None:
        """Wait for the writes under way."""
        while self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def _fail(batch: Sequence[_Waiting[In, Out]], exc: BaseException) -> None:
    for waiting in batch:
        if not waiting.done.done():
            if isinstance(exc, asyncio.CancelledError):
                waiting.done.cancel()
            else:
                waiting.done.set_exception(exc)


class JobWrites:
    """The worker's claims and outcome writes, grouped (see the module's docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        worker: str,
        *,
        max_rows: int = 500,
        interval_s: float = GROUP_INTERVAL_S,
        stopping: Callable[[], bool] | None = None,
    ) -> None:
        self.engine = engine
        self.worker = worker
        self._limited: dict[str, float] = {}
        self.claims: GroupWriter[ClaimRequest, Job | None | _Limited] = GroupWriter(
            self._claim_one,
            self._claim_many,
            name="claims",
            max_rows=max_rows,
            interval_s=interval_s,
            stopping=stopping,
        )
        self.finishes: GroupWriter[FinishRequest, Job | None] = GroupWriter(
            self._finish_one,
            self._finish_many,
            name="outcomes",
            max_rows=max_rows,
            interval_s=interval_s,
            stopping=stopping,
        )

    async def claim(
        self, job_id: uuid.UUID, lease: uuid.UUID, tenant: str
    ) -> tuple[Job | None, float]:
        """Move a pending job to running under `lease` (transitions.claim): the job or
        None, and when (time.monotonic) the statement that claimed it started, the
        earliest its lease can have been written."""
        request = ClaimRequest(job_id, lease, tenant)
        seen = self._limited.get(tenant)
        if seen is None or time.monotonic() - seen > LIMITED_MEMORY_S:
            claimed, started = await self.claims.write(request)
            if not isinstance(claimed, _Limited):
                return claimed, started
            self._limited[tenant] = time.monotonic()
        return await self._claim_limited(request)

    async def _claim_limited(self, request: ClaimRequest) -> tuple[Job | None, float]:
        started = 0.0

        async def claim() -> Job | None:
            nonlocal started
            started = time.monotonic()
            return await transitions.claim(
                self.engine, request.job_id, request.lease, self.worker, request.tenant
            )

        job = await retry_transient(claim, stopping=self.claims.stopping)
        return job, started

    async def finish(
        self, job_id: uuid.UUID, lease: uuid.UUID, outcome: Outcome, seq_floor: int = 0
    ) -> Job | None:
        """Write an attempt's outcome if its lease still holds (transitions.finish)."""
        done, _ = await self.finishes.write(FinishRequest(job_id, lease, outcome, seq_floor))
        return done

    async def _claim_one(self, r: ClaimRequest) -> Job | None | _Limited:
        return await transitions.claim(self.engine, r.job_id, r.lease, self.worker, r.tenant)

    async def _claim_many(self, requests: list[ClaimRequest]) -> list[Job | None | _Limited]:
        claimed = await transitions.claim_many(self.engine, requests, self.worker)
        return [
            LIMITED if limited else job
            for job, limited in zip(claimed.jobs, claimed.limited, strict=True)
        ]

    async def _finish_one(self, r: FinishRequest) -> Job | None:
        return await transitions.finish(self.engine, r.job_id, r.lease, r.outcome, r.seq_floor)

    async def _finish_many(self, requests: list[FinishRequest]) -> list[Job | None]:
        return await transitions.finish_many(self.engine, requests)

    async def close(self) -> None:
        await self.claims.close()
        await self.finishes.close()


class _Limited:
    """A claim left out of a group: its tenant has a concurrency limit."""


LIMITED = _Limited()


@dataclass
class _Change:
    job: Job
    previous: str | None
    headers: dict[str, str]
    """The trace context of the work that made the change."""


class StatusEvents:
    """Publishes the status changes made in one turn of the event loop together."""

    def __init__(self, events: EventPublisher) -> None:
        self.events = events
        self._pending: list[_Change] = []
        self._sent: asyncio.Future[None] | None = None
        self.messages = 0
        """Messages published, for the benchmark and tests."""

    async def publish(self, job: Job, previous: str | None) -> None:
        """Publish a transition (from `previous`), with the trace context of the caller;
        returns once its message is sent."""
        self._pending.append(_Change(job, previous, inject_headers()))
        if self._sent is None:
            loop = asyncio.get_running_loop()
            self._sent = loop.create_future()
            loop.call_soon(self._flush)
        await asyncio.shield(self._sent)

    def _flush(self) -> None:
        changes, sent = self._pending, self._sent
        self._pending, self._sent = [], None
        assert sent is not None
        task = asyncio.create_task(self._send(changes))
        task.add_done_callback(lambda t: _settle(sent, t))

    async def _send(self, changes: list[_Change]) -> None:
        if len(changes) == 1:
            change = changes[0]
            self.messages += 1
            await self.events.publish(status_event(change.job, change.previous), change.headers)
            return
        self.messages += await self.events.publish_changes(
            [
                (c.job, c.previous, c.headers.get("traceparent") or c.job.traceparent or "")
                for c in changes
            ]
        )


def _settle(sent: asyncio.Future[None], task: asyncio.Task[None]) -> None:
    if sent.done():
        return
    if task.cancelled():
        sent.cancel()
    elif (exc := task.exception()) is not None:
        sent.set_exception(exc)
    else:
        sent.set_result(None)
