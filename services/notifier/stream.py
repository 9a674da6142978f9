"""One watch stream's bookkeeping: what makes it exact.

For each job it follows, a stream keeps a `Tracker`: the last sequence number
sent, the status, and which attempt's deltas are current. A job is opened in
this order, which is what leaves no gap and sends nothing twice:

1. the stream's watcher is registered with the hub (live events start queueing);
2. the job row is read (the snapshot);
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.catchup import TextSoFarClient
from conveyor.contract.convert import job_error, job_to_proto
from conveyor.core.errors import Unavailable
from conveyor.core.lifecycle import JobState
from conveyor.db import jobs as db
from conveyor.db.jobs import LOST_ATTEMPT_SEQ_GAP
from conveyor.db.schema import jobs
from conveyor.v1 import events_pb2, jobs_pb2

from .hub import Hub, JobLog, Watcher

log = logging.getLogger(__name__)

Row = Mapping[str, Any]
RUNNING = jobs_pb2.JOB_STATUS_RUNNING
TERMINAL_PROTO = frozenset(s.to_proto() for s in JobState if s.terminal)
ERROR_STATUSES = frozenset(
    s.to_proto() for s in (JobState.SCHEDULED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED)
)
"""Statuses whose change carries the error that caused it; on others an error is stale."""
ACTIVE = (JobState.PENDING.value, JobState.SCHEDULED.value, JobState.RUNNING.value)
MAX_LABEL_JOBS = 1000
FORGET_AFTER = 10_000
"""Finished jobs a label-filtered stream remembers (to drop their late events)."""
GAP_WAIT_S = 5.0
"""How long a stored status change may wait for its attempt's last deltas, still on
their way on the bus (the worker writes the change, then publishes what is left)."""
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


@dataclass
class Tracker:
    """One job as a stream has sent it so far."""

    job_id: str
    tenant: str
    last: int = 0
    status_seq: int = 0
    status: int = 0
    attempt: int = 0
    running: int | None = None
    """The attempt whose deltas are current (the job is running it)."""
    started_ns: int | None = None
    tokens: int = 0
    terminal: bool = False
    loose: bool = False
    """While catching up from a resume point, deltas are taken before their attempt's
    RUNNING event is known (the sources already hold only real attempts)."""
    progress_at: float = 0.0
    progress_tokens: int = -1
    waiting: list[events_pb2.JobEvent] = field(default_factory=list)
    """Stored changes read from Postgres and not sent yet: their attempt's last deltas
    are still on their way on the bus (see Stream.check)."""
    waiting_since: float | None = None
    """time.monotonic() when the change waiting for its deltas was first seen."""

    def set_row(self, row: Row) -> None:
        state = JobState(row["status"])
        self.status = state.to_proto()
        self.status_seq = max(self.status_seq, int(row["seq"]))
        self.attempt = int(row["attempts"])
        self.terminal = state.terminal
        if state is JobState.RUNNING:
            if self.running != self.attempt:
                self.tokens = 0
            self.running = self.attempt
            started = row.get("started_at")
            self.started_ns = int(started.timestamp() * 1e9) if started is not None else None
        else:
            self.running = None

    def accept(self, event: events_pb2.JobEvent) -> bool:
        """Take the event if it is the next to send; False if it is old or not current."""
        if event.sequence <= self.last:
            return False
        if event.HasField("token_delta"):
            delta = event.token_delta
            if not self.loose and self.running != delta.attempt:
                return False
            self.tokens = int(delta.output_tokens)
        elif event.HasField("status_changed"):
            change = event.status_changed
            self.status = change.status
            self.attempt = change.attempt
            self.status_seq = event.sequence
            self.terminal = change.status in TERMINAL_PROTO
            if change.status == RUNNING:
                self.running = change.attempt
                self.tokens = 0
                self.started_ns = event.time.ToNanoseconds() if event.HasField("time") else None
            else:
                self.running = None
        else:
            return False
        self.last = event.sequence
        return True


# --------------------------------------------------------------------------- events


def snapshot_event(row: Row) -> events_pb2.JobEvent:
    event = events_pb2.JobEvent(
        job_id=str(row["id"]), sequence=row["seq"], tenant=row["tenant"], snapshot=job_to_proto(row)
    )
    event.time.FromDatetime(row["updated_at"])
    return event


def history_event(entry: Row, row: Row) -> events_pb2.JobEvent:
    """A stored transition as the event that announced it; the latest one carries the job."""
    state = JobState(entry["status"])
    change = events_pb2.StatusChanged(status=state.to_proto(), attempt=entry["attempt"])
    if entry["previous"]:
        change.previous = JobState(entry["previous"]).to_proto()
    latest = entry["seq"] == row["seq"]
    detail = entry["detail"] if isinstance(entry["detail"], Mapping) else None
    error = job_error(detail) if detail and detail.get("code") else None
    if error is None and latest:
        error = job_error(row["error"])
    if error is not None and change.status in ERROR_STATUSES:
        change.error.CopyFrom(error)
    if state.terminal and latest:
        change.job.CopyFrom(job_to_proto(row))
    event = events_pb2.JobEvent(
        job_id=str(row["id"]), sequence=entry["seq"], tenant=row["tenant"], status_changed=change
    )
    event.time.FromDatetime(entry["created_at"])
    return event


def normalized(event: events_pb2.JobEvent) -> events_pb2.JobEvent:
    """A live status change without a stale error (as its stored form is replayed)."""
    if (
        event.HasField("status_changed")
        and event.status_changed.HasField("error")
        and event.status_changed.status not in ERROR_STATUSES
    ):
        copy = events_pb2.JobEvent()
        copy.CopyFrom(event)
        copy.status_changed.ClearField("error")
        return copy
    return event


def progress_event(tracker: Tracker, tokens: int) -> events_pb2.JobEvent:
    now_ns = time.time_ns()
    elapsed = Duration()
    if tracker.started_ns is not None:
        elapsed.FromNanoseconds(max(0, now_ns - tracker.started_ns))
    event = events_pb2.JobEvent(
        job_id=tracker.job_id,
        sequence=tracker.last,
        tenant=tracker.tenant,
        progress=events_pb2.Progress(
            attempt=tracker.running or tracker.attempt, output_tokens=tokens, elapsed=elapsed
        ),
    )
    event.time.FromNanoseconds(now_ns)
    return event


def delta_events(job_id: str, tenant: str, text: Any, after: int) -> list[events_pb2.JobEvent]:
    """A worker's answer (conveyor.bus.catchup.TextSoFar) as the deltas above `after`."""
    out = []
    now_ns = time.time_ns()
    for seq, delta in text.after(after):
        event = events_pb2.JobEvent(job_id=job_id, sequence=seq, tenant=tenant, token_delta=delta)
        event.time.FromNanoseconds(now_ns)
        out.append(event)
    return out


def _merged(events: Sequence[events_pb2.JobEvent]) -> list[events_pb2.JobEvent]:
    """By sequence number, one per number (a status change wins over a delta)."""
    by_seq: dict[int, events_pb2.JobEvent] = {}
    for event in events:
        held = by_seq.get(event.sequence)
        if held is None or (event.HasField("status_changed") and held.HasField("token_delta")):
            by_seq[event.sequence] = event
    return [by_seq[s] for s in sorted(by_seq)]


def gap_attempt(tracker: Tracker, event: events_pb2.JobEvent) -> int | None:
    """The attempt whose deltas fill the numbers between the last event sent and
    `event`, if `event` is the change its worker wrote right after its last delta
    (sequence - 1); None if nothing is missing or the numbers were skipped (an attempt
    ended by someone else jumps LOST_ATTEMPT_SEQ_GAP ahead: its late deltas are dropped)."""
    if not event.HasField("status_changed") or event.status_changed.previous != RUNNING:
        return None
    missing = event.sequence - tracker.last - 1
    if missing <= 0 or missing >= LOST_ATTEMPT_SEQ_GAP:
        return None
    return int(event.status_changed.attempt)


# --------------------------------------------------------------------------- reads


async def load_rows(
    engine: AsyncEngine, tenant: str, ids: Sequence[uuid.UUID]
) -> dict[str, dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.id.in_(list(ids)))
        )
        return {str(r["id"]): dict(r) for r in result.mappings()}


async def load_history(engine: AsyncEngine, job_id: str, after: int) -> list[Row]:
    async with engine.connect() as conn:
        return await db.history(conn, uuid.UUID(job_id), after)


async def active_with_labels(
    engine: AsyncEngine, tenant: str, labels: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The tenant's unfinished jobs carrying all `labels`, newest first (at most 1000)."""
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(jobs)
            .where(
                jobs.c.tenant == tenant,
                jobs.c.status.in_(ACTIVE),
                jobs.c.labels.contains(dict(labels)),
            )
            .order_by(jobs.c.created_at.desc())
            .limit(MAX_LABEL_JOBS)
        )
        return [dict(r) for r in result.mappings()]


# --------------------------------------------------------------------------- the stream


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
        return deltas, complete, not complete

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
            attempt = gap_attempt(tracker, event) if self.watcher.deltas else None
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
            event = normalized(event)
            if tracker.accept(event):
                out.append(event)
        return out

    # -- opening a job

    async def open(self, row: Row, after: int) -> list[events_pb2.JobEvent]:
        """The snapshot of a job and its events after the starting point (see the module)."""
        job_id = str(row["id"])
        state = JobState(row["status"])
        start = after if after > 0 else (row["seq"] - 1 if state.terminal else row["seq"])
        tracker = Tracker(job_id=job_id, tenant=row["tenant"], last=start, loose=True)
        self.trackers[job_id] = tracker
        self.forgotten.pop(job_id, None)
        out = [snapshot_event(row)]
        pending: list[events_pb2.JobEvent] = []
        if start < row["seq"]:
            pending += [
                history_event(h, row)
                for h in await load_history(self.services.engine, job_id, start)
                if h["seq"] <= row["seq"]
            ]
        if self.watcher.deltas:
            pending += await self._deltas_since(row, start)
        out += await self._in_order(tracker, _merged(pending), wait=True)
        tracker.loose = False
        tracker.set_row(row)
        if tracker.running is not None:
            tracker.tokens = max(tracker.tokens, self.hub.tokens(job_id, tracker.running) or 0, 0)
        return out

    async def _deltas_since(self, row: Row, start: int) -> list[events_pb2.JobEvent]:
        """Deltas above `start` from the hub's log, and the running attempt's from its
        worker when the log does not reach back that far."""
        job_id, attempt = str(row["id"]), int(row["attempts"])
        copy: JobLog | None = self.hub.log_copy(job_id)
        if copy is not None and copy.attempt > attempt:
            copy = None  # newer than the row: its events are queued live behind us
        out = copy.after(start) if copy is not None else []
        if row["status"] != JobState.RUNNING:
            return out
        need = max(start, int(row["seq"]))
        if copy is not None and copy.attempt == attempt and copy.covers(need):
            return out
        text = await self._ask_worker(row, attempt)
        if text is None:
            return out
        # The answer is piece by piece; the log's deltas may carry several pieces each, so
        # the answer replaces them up to where it ends (a boundary of the worker's sends).
        cut = text.last_seq
        kept = [e for e in out if e.sequence <= need or e.sequence > cut]
        return kept + delta_events(job_id, row["tenant"], text, need)

    async def _ask_worker(self, row: Row, attempt: int) -> Any:
        job_id = str(row["id"])
        client = self.services.text
        text = None
        if client is not None:
            text = await client.fetch(
                row["tenant"], job_id, attempt, self.services.settings.catchup_timeout_s
            )
        if text is not None:
            self.hub.merge(text, row["tenant"])
            return text
        # No answer: fine if the attempt is over (what follows comes from Postgres).
        now = (await load_rows(self.services.engine, row["tenant"], [uuid.UUID(job_id)])).get(
            job_id
        )
        if now is not None and now["status"] == JobState.RUNNING and now["attempts"] == attempt:
            raise Unavailable(
                f"the text so far of job {job_id} is not available right now; try again"
            )
        return None

    # -- live events

    async def handle(self, event: events_pb2.JobEvent) -> list[events_pb2.JobEvent]:
        """What to send for a live event (nothing, it, or it after what it skipped)."""
        job_id = event.job_id
        tracker = self.trackers.get(job_id)
        out: list[events_pb2.JobEvent] = []
        if tracker is None:
            if self.watcher.labels is None or job_id in self.excluded:
                return out
            if self.forgotten.get(job_id, -1) >= event.sequence:
                return out
            rows = await load_rows(self.services.engine, self.tenant, [uuid.UUID(job_id)])
            row = rows.get(job_id)
            labels = (row or {}).get("labels") or {}
            if row is None or any(labels.get(k) != v for k, v in self.watcher.labels.items()):
                self._exclude(job_id)
                return out
            out += await self.open(row, 0)
            tracker = self.trackers[job_id]
        event = normalized(event)
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
        rows = await load_rows(engine, tracker.tenant, [uuid.UUID(job_id)])
        row = rows.get(job_id)
        items: list[events_pb2.JobEvent] = [event]
        if row is not None:
            items += [
                history_event(h, row)
                for h in await load_history(engine, job_id, tracker.last)
                if h["seq"] < event.sequence
            ]
        if event.HasField("token_delta") and self.watcher.deltas:
            # The attempt's RUNNING event was missed (it is in the history read above).
            delta = event.token_delta
            need = max(tracker.last, event.sequence - int(delta.output_tokens))
            held = self.hub.logs.get(job_id)
            if held is not None and held.attempt == delta.attempt and held.covers(need):
                items += [e for e in held.after(need) if e.sequence < event.sequence]
            elif row is not None:
                text = await self._ask_worker({**row, "attempts": delta.attempt}, delta.attempt)
                if text is not None:
                    items += delta_events(job_id, tracker.tenant, text, need)
                    if event.sequence <= text.last_seq:
                        items.remove(event)  # its pieces are in the answer
            return [e for e in _merged(items) if tracker.accept(normalized(e))]
        # A status change: each stored change before it, after its attempt's deltas.
        return await self._in_order(tracker, _merged(items), wait=True)

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
            out.append(progress_event(tracker, tokens))
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
        for job_id, row in (await load_rows(engine, self.tenant, open_ids)).items():
            found = self.trackers.get(job_id)
            if found is None or row["seq"] <= found.status_seq:
                continue
            history = await load_history(engine, job_id, found.last)
            out += await self._in_order(found, [history_event(h, row) for h in history], wait=False)
        return out
