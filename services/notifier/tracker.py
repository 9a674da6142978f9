"""What a watch stream knows of one job it follows: the last event it sent, the status,
and which attempt's deltas are current (see services.notifier.stream)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from conveyor.bus.events import RUNNING, TERMINAL_PROTO
from conveyor.core.lifecycle import Job, JobState
from conveyor.db.jobs import LOST_ATTEMPT_SEQ_GAP
from conveyor.v1 import events_pb2


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

    def set_job(self, job: Job) -> None:
        """Take the status of `job` as read from Postgres."""
        self.status = job.status.to_proto()
        self.status_seq = max(self.status_seq, job.seq)
        self.attempt = job.attempts
        self.terminal = job.terminal
        if job.status is JobState.RUNNING:
            if self.running != self.attempt:
                self.tokens = 0
            self.running = self.attempt
            started = job.started_at
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

    def gap_attempt(self, event: events_pb2.JobEvent) -> int | None:
        """The attempt whose deltas fill the numbers between the last event sent and
        `event`, if `event` is the change its worker wrote right after its last delta
        (sequence - 1); None if nothing is missing or the numbers were skipped (an attempt
        ended by someone else jumps LOST_ATTEMPT_SEQ_GAP ahead: its late deltas are dropped)."""
        if not event.HasField("status_changed") or event.status_changed.previous != RUNNING:
            return None
        missing = event.sequence - self.last - 1
        if missing <= 0 or missing >= LOST_ATTEMPT_SEQ_GAP:
            return None
        return int(event.status_changed.attempt)


def merged(events: Sequence[events_pb2.JobEvent]) -> list[events_pb2.JobEvent]:
    """By sequence number, one per number (a status change wins over a delta)."""
    by_seq: dict[int, events_pb2.JobEvent] = {}
    for event in events:
        held = by_seq.get(event.sequence)
        if held is None or (event.HasField("status_changed") and held.HasField("token_delta")):
            by_seq[event.sequence] = event
    return [by_seq[s] for s in sorted(by_seq)]
