"""One watch stream's bookkeeping: what makes it exact.

For each job it follows, a stream keeps a `Tracker`: the last sequence number
sent, the status, and which attempt's deltas are current. A job is opened in
this order, which is what leaves no gap and sends nothing twice:

1. the stream's watcher is registered with the hub (live events start queueing);
2. the job is read (the snapshot);
3. the stored status changes after the starting point are read, and the running
   attempt's deltas are taken from the hub's log or, if it does not reach back
   far enough, asked from the worker; all of it is merged by sequence number;
4. queued live events follow; those at or below the last sequence sent are dropped.

A status change that does not follow the last event sent (another publisher's
change overtook it) is repaired: the missing status changes are read from
Postgres and everything is sent in order. The running attempt's deltas follow
each other (one publisher, one connection); deltas of an attempt that is over (a
lost worker still streaming) are dropped. A notifier whose bus connection broke
ends its streams instead (see services.notifier.hub).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.catchup import TextSoFar, TextSoFarClient
from conveyor.bus.events import RUNNING, history_event, progress_event, snapshot_event
from conveyor.core.errors import Unavailable
from conveyor.core.lifecycle import Job, JobState
from conveyor.db import watches
from conveyor.v1 import events_pb2

from .hub import Hub, JobLog, Watcher
from .interest import Interest
from .tracker import Tracker, merged

log = logging.getLogger(__name__)

FORGET_AFTER = 10_000
"""Finished jobs a label-filtered stream remembers (to drop their late events)."""
GAP_WAIT_S = 5.0
"""How long a stored status change may wait for its attempt's last deltas, still on
their way on the bus (the worker writes the change, then publishes what is left)."""
ENDED_ASK_S = 20.0
"""An attempt that ended at most this long ago, its deltas not all seen, is asked of its
worker (which keeps them longer: services.worker.runner.ENDED_KEPT_S)."""
GAP_POLL_S = 0.05
"""While waiting for them: how often the hub's log is looked at again."""
GAP_RECHECK_S = 0.2
"""The same for a stream's idle check (it looks at the hub's log only, not Postgres)."""


@dataclass
class Settings:
    """What a stream needs from the configuration."""

    catchup_timeout_s: float = 2.0
    idle_check_s: float = 5.0


@dataclass
class Services:
    """Shared by every stream of a notifier."""

    engine: AsyncEngine
    hub: Hub
    text: TextSoFarClient | None
    settings: Settings = field(default_factory=Settings)
    interest: Interest | None = None
    """The watches registered with the workers (None: every delta is assumed published)."""


class Stream:
    """The jobs of one WatchJob or WatchJobs call (see the module docstring)."""

    def __init__(
        self,
        services: Services,
        watcher: Watcher,
        progress_s: float,
    ) -> None:
        self.services = services
        self.hub = services.hub
        self.watcher = watcher
        self.tenant = watcher.tenant
        self.progress_s = progress_s
        self.trackers: dict[str, Tracker] = {}
        self.forgotten: OrderedDict[str, int] = OrderedDict()
        self.excluded: OrderedDict[str, None] = OrderedDict()
        self.checked_at = time.monotonic()
        self.next_check_at = self.checked_at + services.settings.idle_check_s
        """When the live loop calls `check` next (sooner while a change waits for deltas);
        Postgres is read again idle_check_s after `checked_at`."""

    # -- sending stored changes in order

    def _held_before(
        self, tracker: Tracker, attempt: int, event: events_pb2.JobEvent
    ) -> tuple[list[events_pb2.JobEvent], bool, bool]:
        """The attempt's deltas the hub holds between the last event sent and `event`;
        whether that is all of them (the log reaches `event`'s sequence - 1); whether the
        bus may still bring the rest (this notifier's log may still reach them)."""
        held = self.hub.logs.get(tracker.job_id)
        if held is None or held.attempt < attempt:
            # The attempt's events have not arrived yet, unless they came before this
            # notifier saw the bus (the change was written earlier).
            return [], False, event.time.ToNanoseconds() > self.hub.since_ns
        if held.attempt > attempt or not held.covers(tracker.last):
            return [], False, False  # replaced or trimmed: not from this log
        deltas = [e for e in held.after(tracker.last) if e.sequence < event.sequence]
        complete = held.last_seq >= event.sequence - 1
        # Once the change that ended the attempt came on the bus, every delta published
        # before it has too (one publisher, one connection): an attempt nobody watched
        # at its end published the rest of its deltas nowhere.
        return deltas, complete, not complete and held.ended is None

    def _gap_deadline(self, tracker: Tracker, event: events_pb2.JobEvent) -> float:
        """time.monotonic() until which the deltas before a stored change may still come
        on the bus: GAP_WAIT_S after the stream first saw the change (the worker writes it,
        then publishes its last deltas), unless it is older than the hub keeps an ended
        attempt's log (then they are in the log or nowhere)."""
        now = time.monotonic()
        age_s = (time.time_ns() - event.time.ToNanoseconds()) / 1e9
        if event.HasField("time") and age_s > self.hub.linger_s:
            return now
        if tracker.waiting_since is None:
            tracker.waiting_since = now
        return tracker.waiting_since + GAP_WAIT_S

    async def _in_order(
        self, tracker: Tracker, events: Sequence[events_pb2.JobEvent], *, wait: bool
    ) -> list[events_pb2.JobEvent]:
        """`events` (by sequence number) that follow what was sent, each status change
        after its attempt's last deltas: those the bus has not brought yet are waited
        for (GAP_WAIT_S after the change at most; with `wait` False, by returning early
        and checking again soon). What never comes (a publish lost) is left out: the
        change that ends the job carries its whole result."""
        out: list[events_pb2.JobEvent] = []
        tracker.waiting = []
        for event in events:
            if event.sequence <= tracker.last:
                continue
            attempt = tracker.gap_attempt(event) if self.watcher.deltas else None
            if attempt is not None:
                deadline = self._gap_deadline(tracker, event)
                while True:
                    deltas, complete, coming = self._held_before(tracker, attempt, event)
                    if complete or not coming or time.monotonic() >= deadline:
                        break
                    if not wait:  # `check` tries again soon, from the hub's log only
                        tracker.waiting = [e for e in events if e.sequence >= event.sequence]
                        return out
                    await asyncio.sleep(GAP_POLL_S)
                if not complete and not coming:
                    asked = await self._ended_unwatched(tracker, attempt, event)
                    if asked is not None:
                        deltas, complete = asked, True
                if not complete and coming:  # lost on the way (a failed publish)
                    log.warning(
                        "token deltas before a status change never arrived; sent without them",
                        extra={
                            "job_id": tracker.job_id,
                            "attempt": attempt,
                            "after": tracker.last,
                            "sequence": event.sequence,
                        },
                    )
                out += [d for d in deltas if tracker.accept(d)]
                tracker.waiting_since = None
            if tracker.accept(event):
                out.append(event)
        return out

    async def _ended_unwatched(
        self, tracker: Tracker, attempt: int, event: events_pb2.JobEvent
    ) -> list[events_pb2.JobEvent] | None:
        """The deltas before `event` of an attempt that ended before this notifier's watch
        of it reached its worker (a fast job watched from pending): it published them
        nowhere, and its worker keeps them a while (services.worker.runner,
        ENDED_KEPT_S). None if the hub's log does not show that attempt ended lately."""
        held = self.hub.logs.get(tracker.job_id)
        if held is None or held.attempt != attempt or held.ended is None:
            return None
        if time.monotonic() - held.ended > ENDED_ASK_S or self.services.text is None:
            return None
        text = await self.services.text.fetch(
            tracker.tenant, tracker.job_id, attempt, self.services.settings.catchup_timeout_s
        )
        if text is None:
            return None
        return [
            e
            for e in text.events(tracker.tenant, tracker.last)
            if tracker.last < e.sequence < event.sequence
        ]

    # -- opening a job

    async def open(self, job: Job, after: int) -> list[events_pb2.JobEvent]:
        """The snapshot of a job and its events after the starting point (see the module)."""
        job_id = str(job.id)
        start = after if after > 0 else (job.seq - 1 if job.terminal else job.seq)
        tracker = Tracker(job_id=job_id, tenant=job.tenant, last=start, loose=True)
        self.trackers[job_id] = tracker
        self.forgotten.pop(job_id, None)
        out = [snapshot_event(job)]
        pending: list[events_pb2.JobEvent] = []
        if start < job.seq:
            pending += [
                history_event(h, job)
                for h in await watches.history(self.services.engine, job_id, start)
                if h["seq"] <= job.seq
            ]
        if self.watcher.deltas:
            pending += await self._deltas_since(job, start)
        elif job.status is JobState.RUNNING and self.watcher.labels is None:
            await self._want(job_id, job.tenant, job.attempts)  # for its progress reports
        out += await self._in_order(tracker, merged(pending), wait=True)
        tracker.loose = False
        tracker.set_job(job)
        if tracker.running is not None:
            tracker.tokens = max(tracker.tokens, self.hub.tokens(job_id, tracker.running) or 0, 0)
        return out

    async def _deltas_since(self, job: Job, start: int) -> list[events_pb2.JobEvent]:
        """Deltas above `start` from the hub's log, and the running attempt's from its
        worker when the log does not reach back that far."""
        job_id, attempt = str(job.id), job.attempts
        copy: JobLog | None = self.hub.log_copy(job_id)
        if copy is not None and copy.attempt > attempt:
            copy = None  # newer than the row: its events are queued live behind us
        out = copy.after(start) if copy is not None else []
        if job.status is not JobState.RUNNING:
            return out
        need = max(start, job.seq)
        if (
            copy is not None
            and copy.attempt == attempt
            and copy.covers(need)
            and self._published(job_id, job.tenant, attempt)
        ):
            return out
        text = await self._ask_worker(job_id, job.tenant, attempt)
        if text is None:
            return out
        # The answer is piece by piece; the log's deltas may carry several pieces each, so
        # the answer replaces them up to where it ends (a boundary of the worker's sends).
        cut = text.last_seq
        kept = [e for e in out if e.sequence <= need or e.sequence > cut]
        return kept + text.events(job.tenant, need)

    async def _ask_worker(self, job_id: str, tenant: str, attempt: int) -> TextSoFar | None:
        """The attempt's deltas so far from its worker; None if the attempt is over.
        Unavailable if it still runs and its worker did not answer."""
        client = self.services.text
        text = None
        if client is not None:
            text = await client.fetch(
                tenant, job_id, attempt, self.services.settings.catchup_timeout_s
            )
        if text is not None:
            self.hub.merge(text, tenant)
            if self.services.interest is not None:
                self.services.interest.note(job_id, tenant, attempt)
            return text
        # No answer: fine if the attempt is over (what follows comes from Postgres).
        now = await watches.job_by_id(self.services.engine, tenant, uuid.UUID(job_id))
        if now is not None and now.status is JobState.RUNNING and now.attempts == attempt:
            raise Unavailable(
                f"the text so far of job {job_id} is not available right now; try again"
            )
        return None

    # -- interest (services.notifier.interest)

    def _published(self, job_id: str, tenant: str, attempt: int) -> bool:
        """Whether every delta of the attempt is published (so a log that saw its
        RUNNING event holds them all, and the bus brings the rest)."""
        interest = self.services.interest
        if interest is None:
            return True
        if self.watcher.labels is not None and interest.leased_for(tenant):
            return True
        return interest.has(job_id, attempt)

    async def _want(self, job_id: str, tenant: str, attempt: int) -> None:
        if self.services.interest is not None:
            await self.services.interest.want(job_id, tenant, attempt)

    async def _register_started(self, sent: list[events_pb2.JobEvent]) -> None:
        """A stream of given jobs registers each new attempt it sends the RUNNING event of
        (a tenant-wide stream has its tenant's lease)."""
        if self.watcher.labels is not None or self.services.interest is None:
            return
        for event in sent:
            if event.HasField("status_changed") and event.status_changed.status == RUNNING:
                tracker = self.trackers.get(event.job_id)
                attempt = event.status_changed.attempt
                if tracker is not None and tracker.running == attempt:
                    await self._want(event.job_id, tracker.tenant, attempt)

    # -- live events

    async def handle(self, event: events_pb2.JobEvent) -> list[events_pb2.JobEvent]:
        """What to send for a live event (nothing, it, or it after what it skipped)."""
        out = await self._handle(event)
        await self._register_started(out)
        return out

    async def _handle(self, event: events_pb2.JobEvent) -> list[events_pb2.JobEvent]:
        job_id = event.job_id
        tracker = self.trackers.get(job_id)
        out: list[events_pb2.JobEvent] = []
        if tracker is None:
            if self.watcher.labels is None or job_id in self.excluded:
                return out
            if self.forgotten.get(job_id, -1) >= event.sequence:
                return out
            job = await watches.job_by_id(self.services.engine, self.tenant, uuid.UUID(job_id))
            labels = (job.labels if job is not None else None) or {}
            if job is None or any(labels.get(k) != v for k, v in self.watcher.labels.items()):
                self._exclude(job_id)
                return out
            out += await self.open(job, 0)
            tracker = self.trackers[job_id]
        if event.sequence <= tracker.last:
            return out
        if event.HasField("token_delta"):
            attempt = event.token_delta.attempt
            if attempt == tracker.running:
                tracker.accept(event)  # deltas of the running attempt follow each other
                out.append(event)
                return out
            if attempt < tracker.attempt or (
                attempt == tracker.attempt and tracker.running is None
            ):
                return out  # an attempt that is over (a lost worker's late deltas)
        elif event.sequence == tracker.last + 1 and tracker.accept(event):
            out.append(event)
            return out
        out += await self._repair(tracker, event)
        return out

    async def _repair(
        self, tracker: Tracker, event: events_pb2.JobEvent
    ) -> list[events_pb2.JobEvent]:
        """`event` skips sequence numbers: send what is missing first, then it."""
        engine = self.services.engine
        job_id = tracker.job_id
        job = await watches.job_by_id(engine, tracker.tenant, uuid.UUID(job_id))
        items: list[events_pb2.JobEvent] = [event]
        if job is not None:
            items += [
                history_event(h, job)
                for h in await watches.history(engine, job_id, tracker.last)
                if h["seq"] < event.sequence
            ]
        if event.HasField("token_delta") and self.watcher.deltas:
            # The attempt's RUNNING event was missed (it is in the history read above).
            delta = event.token_delta
            need = max(tracker.last, event.sequence - int(delta.output_tokens))
            held = self.hub.logs.get(job_id)
            if held is not None and held.attempt == delta.attempt and held.covers(need):
                items += [e for e in held.after(need) if e.sequence < event.sequence]
            elif job is not None:
                text = await self._ask_worker(job_id, tracker.tenant, delta.attempt)
                if text is not None:
                    items += text.events(tracker.tenant, need)
                    if event.sequence <= text.last_seq:
                        items.remove(event)  # its pieces are in the answer
            return [e for e in merged(items) if tracker.accept(e)]
        # A status change: each stored change before it, after its attempt's deltas.
        return await self._in_order(tracker, merged(items), wait=True)

    def _exclude(self, job_id: str) -> None:
        self.excluded[job_id] = None
        if len(self.excluded) > FORGET_AFTER:
            self.excluded.popitem(last=False)

    def forget(self, job_id: str) -> None:
        """Stop tracking a finished job (label-filtered streams), remembering its sequence."""
        tracker = self.trackers.pop(job_id, None)
        if tracker is not None:
            self.forgotten[job_id] = tracker.last
            if len(self.forgotten) > FORGET_AFTER:
                self.forgotten.popitem(last=False)

    # -- quiet periods

    def progress(self, many: bool) -> list[events_pb2.JobEvent]:
        """Progress reports due now for the running jobs."""
        now = time.monotonic()
        out = []
        for tracker in self.trackers.values():
            if tracker.running is None or now - tracker.progress_at < self.progress_s:
                continue
            tokens = tracker.tokens
            if not self.watcher.deltas:
                tokens = max(tokens, self.hub.tokens(tracker.job_id, tracker.running) or 0)
            if (
                many
                and tokens == tracker.progress_tokens
                and (now - tracker.progress_at < 5 * self.progress_s)
            ):
                continue
            tracker.progress_at, tracker.progress_tokens = now, tokens
            out.append(
                progress_event(
                    tracker.job_id,
                    tracker.tenant,
                    tracker.last,
                    tracker.running or tracker.attempt,
                    tokens,
                    tracker.started_ns,
                )
            )
        return out

    def next_progress_in(self) -> float:
        now = time.monotonic()
        due = [
            tracker.progress_at + self.progress_s - now
            for tracker in self.trackers.values()
            if tracker.running is not None
        ]
        return max(0.0, min(due)) if due else self.progress_s

    async def check(self) -> list[events_pb2.JobEvent]:
        """Re-read the unfinished jobs: send status changes the bus did not bring, each
        after the deltas before it. A change whose deltas are still on their way on the
        bus waits for them (in `Tracker.waiting`): the next check comes soon and looks
        at the hub's log only; Postgres is read every idle_check_s."""
        idle_s = self.services.settings.idle_check_s
        out: list[events_pb2.JobEvent] = []
        for tracker in list(self.trackers.values()):
            if tracker.waiting:
                out += await self._in_order(tracker, tracker.waiting, wait=False)
        now = time.monotonic()
        if now >= self.checked_at + idle_s:
            self.checked_at = now
            out += await self._read_changes()
        self.next_check_at = self.checked_at + idle_s
        if any(t.waiting for t in self.trackers.values()):
            self.next_check_at = min(self.next_check_at, time.monotonic() + GAP_RECHECK_S)
        await self._register_started(out)
        return out

    async def _read_changes(self) -> list[events_pb2.JobEvent]:
        """The stored changes of the unfinished jobs that the bus did not bring."""
        engine = self.services.engine
        open_ids = [
            uuid.UUID(t.job_id) for t in self.trackers.values() if not t.terminal and not t.waiting
        ]
        if not open_ids:
            return []
        out: list[events_pb2.JobEvent] = []
        for job_id, job in (await watches.jobs_by_id(engine, self.tenant, open_ids)).items():
            found = self.trackers.get(job_id)
            if found is None or job.seq <= found.status_seq:
                continue
            history = await watches.history(engine, job_id, found.last)
            out += await self._in_order(found, [history_event(h, job) for h in history], wait=False)
        return out
