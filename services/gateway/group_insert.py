"""Group commit: concurrent submits share INSERT statements.

Each submit hands its jobs to `GroupInsert.insert` and gets back the rows that were
inserted (a job absent from the answer collided with an idempotency key). One INSERT
runs at a time, and one starts at most every `interval_s`; the submits that arrive
meanwhile wait and go together in the next one, up to `max_rows` jobs. So an idle
gateway inserts each submit at once, alone; a busy one spends one statement, one
round trip and one commit on many submits instead of one each. Postgres spends about 0.33 ms of CPU per statement and 0.06 ms per job
(`python -m bench.floors`), so the pacing is what keeps a busy gateway's statements few:
without it they follow each other as fast as they return, with a job or two each.
One at a time, not two: with a second statement beside it, each carried fewer
submits and SubmitJob's p99 at 1,000/s was about twice as high (bench/README.md).

The statements run in a task of their own, so a submit cancelled while it waits
(its client went away) interrupts no one else's INSERT; its jobs may still be
inserted, and the outbox publishes them.

`after_commit` gets every statement's new rows once they are committed, before its
submits have their answers: it starts publishing them (services.gateway.servicer)
and returns what finishes when they are published. Called first, its messages are
written before the answers are, so a worker starts on a job while its caller is
still being answered; the answers do not wait for the broker's confirms. The
statement's task waits for the publishing before taking more submits, so publishing
keeps up with accepting: when it cannot, submits wait here and the next statements
grow, which is also what makes their publishing cheaper per job.

One submit's bad value must not fail the others it shares a statement with: when
a shared INSERT fails with a data error (a value Postgres refuses, not a lost
connection), the statement inserted nothing, so its submits are split in halves and
each half tried again, until the submit that holds the value fails alone.

At most `max_waiting` jobs wait for a statement: beyond that (Postgres falling behind)
a submit is refused with RESOURCE_EXHAUSTED before anything of it is written.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.errors import ResourceExhausted
from conveyor.core.lifecycle import Job
from conveyor.db import jobs as db
from conveyor.db.engine import write_by_halves

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    jobs: Sequence[db.NewJob]
    actor: str | None
    done: asyncio.Future[dict[uuid.UUID, Job]]


class GroupInsert:
    def __init__(
        self,
        engine: AsyncEngine,
        max_rows: int = 500,
        after_commit: Callable[[list[Job]], Awaitable[object]] | None = None,
        interval_s: float = 0.0,
        max_waiting: int = 10_000,
    ) -> None:
        self.engine = engine
        self.after_commit = after_commit
        self.interval_s = interval_s
        self._next_start = 0.0
        self.max_rows = max_rows
        self._waiting: deque[_Waiting] = deque()
        self.max_waiting = max_waiting
        self._waiting_jobs = 0
        self._task: asyncio.Task[None] | None = None

    async def insert(self, jobs: Sequence[db.NewJob], actor: str | None) -> dict[uuid.UUID, Job]:
        """Insert `jobs` (submitted by `actor`); the inserted rows by job id.

        ResourceExhausted, with nothing written, when the queue is full."""
        self.check_room(len(jobs))
        me = _Waiting(jobs, actor, asyncio.get_running_loop().create_future())
        self._waiting.append(me)
        self._waiting_jobs += len(jobs)
        self._kick()
        return await me.done

    def check_room(self, jobs: int) -> None:
        """Refuse `jobs` more when they would overfill the queue (a submit larger than the
        whole queue still goes when nothing waits)."""
        if self._waiting and self._waiting_jobs + jobs > self.max_waiting:
            raise ResourceExhausted(
                f"the gateway has {self._waiting_jobs} jobs waiting to be stored, its maximum;"
                " try again shortly",
                retry_after_s=1.0,
            )

    def _kick(self) -> None:
        """Start the statements' task for the waiting submits, unless it runs."""
        if self._waiting and self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                pause = self._next_start - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                self._next_start = loop.time() + self.interval_s
                await write_by_halves(self._take(), self._insert, _fail, "inserts")
        finally:
            self._task = None
            self._kick()

    def _take(self) -> list[_Waiting]:
        """The submits waiting longest: at least one, up to `max_rows` jobs."""
        batch: list[_Waiting] = []
        rows = 0
        while self._waiting and (not batch or rows + len(self._waiting[0].jobs) <= self.max_rows):
            item = self._waiting.popleft()
            self._waiting_jobs -= len(item.jobs)
            batch.append(item)
            rows += len(item.jobs)
        return batch

    async def _insert(self, batch: Sequence[_Waiting]) -> None:
        """One INSERT for `batch`, the answers, and what follows the commit."""
        jobs = [job for item in batch for job in item.jobs]
        actors = [item.actor for item in batch for _ in item.jobs]
        inserted = {j.id: j for j in await db.insert_jobs(self.engine, jobs, actors)}
        publishing = None
        try:
            if inserted and self.after_commit is not None:
                publishing = self.after_commit(list(inserted.values()))
                # One turn of the loop: the publishing's first steps hand the messages to
                # the broker connection's writer, whose turn then comes before the answers'.
                await asyncio.sleep(0)
        finally:  # committed: answered, even if cancelled meanwhile
            for item in batch:
                if not item.done.done():
                    item.done.set_result(
                        {j.id: inserted[j.id] for j in item.jobs if j.id in inserted}
                    )
        if publishing is not None:
            try:
                await publishing
            except Exception as exc:  # the jobs are committed: the outbox publishes them
                log.warning("publishing committed jobs failed", extra={"error": repr(exc)})

    async def close(self) -> None:
        """Wait for the statements under way and what follows their commits."""
        while self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def _fail(batch: Sequence[_Waiting], exc: BaseException) -> None:
    """Answer `exc` to the submits of `batch` that have no answer yet."""
    for item in batch:
        if not item.done.done():
            item.done.set_exception(exc)
