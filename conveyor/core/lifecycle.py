"""The job's lifecycle: its typed record, its states, the transitions between them, and
the rules that choose a transition (retry with backoff, dead, cancel).

Every service and the SQL (conveyor/db) take their states and rules from here.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import date, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from conveyor.v1 import jobs_pb2

if TYPE_CHECKING:
    from conveyor.core.config import Settings

log = logging.getLogger(__name__)


class JobState(StrEnum):
    """A job's status as stored in Postgres (lower-case names)."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    def to_proto(self) -> jobs_pb2.JobStatus.ValueType:
        return _TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: jobs_pb2.JobStatus.ValueType) -> JobState:
        return _FROM_PROTO[value]


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.DEAD})
"""States a job never leaves (except through RetryJob for failed and dead)."""

LIVE = tuple(s for s in JobState if s not in TERMINAL)
"""States a job can still leave by itself: pending, scheduled, running."""


@dataclass(frozen=True)
class Transition:
    """One row of the transition table: who moves a job from which states to which,
    and when. `from_states` empty: a new job."""

    name: str
    from_states: tuple[JobState, ...]
    to: tuple[JobState, ...]
    actor: str
    condition: str


_P, _S, _R = JobState.PENDING, JobState.SCHEDULED, JobState.RUNNING
_OK, _FAIL, _X, _DEAD = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.DEAD

TRANSITIONS = (
    Transition(
        "submit",
        (),
        (_P, _S),
        "gateway",
        "SubmitJob; `scheduled` when `delay` or `run_at` lies in the future",
    ),
    Transition(
        "release", (_S,), (_P,), "dispatcher", "`run_at` reached; the job is then published"
    ),
    Transition(
        "claim",
        (_P,),
        (_R,),
        "worker",
        "claim: attempts + 1, new lease; skipped if a cancel was requested; not made while"
        " the tenant runs its `max_running` (the message goes back to the queue, no attempt"
        " used)",
    ),
    Transition(
        "succeed",
        (_R,),
        (_OK,),
        "worker",
        "the model answered; result, stop reason and usage are stored",
    ),
    Transition(
        "fail",
        (_R,),
        (_FAIL,),
        "worker",
        "permanent error: 400, 401, 403, 404 and any other non-transient status",
    ),
    Transition(
        "retry",
        (_R,),
        (_S,),
        "worker",
        "transient error with attempts left (408, 409, 429, 5xx, 529, transient SSE `error`"
        " events, timeouts, connection errors, dropped streams); `run_at` = now + backoff",
    ),
    Transition(
        "exhaust",
        (_R,),
        (_DEAD,),
        "worker",
        "transient error on the last attempt; the message is acked (the row holds the reason"
        " and last error), so a RetryJob right after cannot be undone by a late dead letter",
    ),
    Transition(
        "recover",
        (_R,),
        (_P, _DEAD),
        "dispatcher",
        "no heartbeat within `CONVEYOR_LEASE_S`: requeued, or `dead` if it was the last attempt",
    ),
    Transition(
        "hand_back",
        (_R,),
        (_P,),
        "worker",
        "SIGTERM and the call did not finish within the grace period: the job is handed back"
        " and the attempt is not counted",
    ),
    Transition(
        "dead_letter",
        LIVE,
        (_DEAD,),
        "dispatcher",
        "its message reached `conveyor.dead`, for example when a worker hit an unexpected error",
    ),
    Transition("cancel", (_P, _S), (_X,), "gateway", "CancelJob"),
    Transition(
        "cancel_running",
        (_R,),
        (_X,),
        "worker",
        "CancelJob flags the row and sends `control.cancel.<tenant>` on `conveyor.events`;"
        " the worker aborts the stream and keeps the partial text",
    ),
    Transition(
        "cancel_delivered",
        (_P,),
        (_X,),
        "worker",
        "a delivered job whose cancel was requested while it ran and whose attempt then ended"
        " without its worker (handed back or recovered): cancelled instead of claimed",
    ),
    Transition(
        "replay",
        (_FAIL, _DEAD),
        (_P,),
        "gateway",
        "RetryJob: `CONVEYOR_DEFAULT_MAX_ATTEMPTS` more attempts; history is kept",
    ),
)
"""The transition table (README.md, "Job states", says the same, row for row; a unit
test holds the two together). Each conditional UPDATE in conveyor/db takes its
from-states from here."""

_BY_NAME = {t.name: t for t in TRANSITIONS}


def transition(name: str) -> Transition:
    """The table's transition called `name` (KeyError for none)."""
    return _BY_NAME[name]


def sources(to: JobState, actor: str | None = None) -> tuple[JobState, ...]:
    """The states a job can move to `to` from (by `actor`, or by anyone), in state order."""
    found = {
        s for t in TRANSITIONS if to in t.to and actor in (None, t.actor) for s in t.from_states
    }
    return tuple(s for s in JobState if s in found)


CLAIMABLE = transition("claim").from_states
"""States a worker may move to running."""

QUEUED = transition("cancel").from_states
"""States a job waits in for a worker (pending, scheduled): CancelJob cancels it at once,
and its priority can still change."""

CANCELLABLE = sources(JobState.CANCELLED)
"""States CancelJob acts on (queued ones at once, a running one through its worker);
the rest answer FAILED_PRECONDITION."""

RETRYABLE = transition("replay").from_states
"""States RetryJob replays."""

_TO_PROTO: dict[JobState, jobs_pb2.JobStatus.ValueType] = {
    JobState.PENDING: jobs_pb2.JOB_STATUS_PENDING,
    JobState.SCHEDULED: jobs_pb2.JOB_STATUS_SCHEDULED,
    JobState.RUNNING: jobs_pb2.JOB_STATUS_RUNNING,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATUS_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATUS_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATUS_CANCELLED,
    JobState.DEAD: jobs_pb2.JOB_STATUS_DEAD,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}


def backoff_s(
    attempt: int, base_s: float, cap_s: float, retry_after_s: float | None = None
) -> float:
    """The wait before the attempt after `attempt` (1-based), for a job's model call and a
    webhook delivery alike: exponential with jitter (half to all of base·2^(attempt-1), at
    most the cap), never shorter than the wait the other side asked for (itself capped)."""
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, cap_s))
    return delay


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """The seconds an HTTP response's Retry-After header asks for (None without one, or
    with an HTTP date, which neither the Messages API nor most receivers send)."""
    value = headers.get("retry-after") or headers.get("Retry-After") if headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Job:
    """A job as stored (one row of `jobs`), typed. Built from a row by `Job.from_row`;
    columns a query did not select keep their defaults."""

    id: uuid.UUID
    tenant: str
    status: JobState
    lane: str
    model: str
    priority: int = 0
    request: Mapping[str, Any] | None = None
    labels: Mapping[str, str] | None = None
    idempotency_key: str | None = None
    request_hash: str = ""
    max_attempts: int = 1
    attempts: int = 0
    timeout_ms: int = 0
    webhook_url: str | None = None
    webhook_all_events: bool = False
    run_at: datetime | None = None
    published_at: datetime | None = None
    lease_id: uuid.UUID | None = None
    heartbeat_at: datetime | None = None
    result_text: str | None = None
    stop_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    result: Mapping[str, Any] | None = None
    """The final message but its text: id, model, content blocks, stop_sequence, usage."""
    error: Mapping[str, Any] | None = None
    dead_reason: str | None = None
    trace_id: str | None = None
    traceparent: str | None = None
    seq: int = 0
    """The sequence number of the job's last event (status change)."""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    cancel_requested_by: str | None = None
    cost_micros: int | None = None
    budget_micros: int | None = None
    budget_day: date | None = None
    previous_status: JobState | None = None
    """Set by a transition: the state the job left (not a column)."""

    TIMESTAMPS = (
        "created_at",
        "updated_at",
        "run_at",
        "started_at",
        "finished_at",
        "cancel_requested_at",
    )
    """The fields that hold points in time, in the order the contract shows them."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        values = {name: row[name] for name in _JOB_FIELDS if name in row}
        values["status"] = JobState(values["status"])
        if values.get("previous_status") is not None:
            values["previous_status"] = JobState(values["previous_status"])
        return cls(**values)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


_JOB_FIELDS = tuple(f.name for f in fields(Job))


@dataclass(frozen=True)
class Outcome:
    """What an attempt produced, written by the worker under its lease
    (conveyor.db.transitions.finish)."""

    status: JobState
    result_text: str | None = None
    stop_reason: str | None = None
    usage: Mapping[str, int] | None = None
    result: Mapping[str, Any] | None = None
    """The final message but its text: id, model, content blocks, stop_sequence, usage."""
    error: Mapping[str, Any] | None = None
    dead_reason: str | None = None
    retry_in_s: float | None = None
    """For a retry: the wait, counted from the moment this outcome is written."""
    cost_micros: int | None = None
    """What this attempt cost (conveyor.core.pricing.cost_micros: 0 without usage); None:
    the model is unpriced. Attempts' costs add up on the job."""


class AttemptError(Protocol):
    """What the failure rule needs to know of a failed attempt's error
    (conveyor.llm.provider.ProviderError)."""

    @property
    def retryable(self) -> bool: ...

    @property
    def retry_after_s(self) -> float | None: ...

    def as_dict(self) -> dict[str, Any]: ...


def failure_outcome(job: Job, error: AttemptError, settings: Settings) -> Outcome:
    """The outcome of a failed attempt of `job` (as claimed): failed when permanent,
    dead when its attempts are exhausted, else scheduled after `backoff_s`. The worker
    and the batch lane (services/dispatcher/batcher.py) both decide with it."""
    attempt, max_attempts = job.attempts, job.max_attempts
    extra = {"job_id": str(job.id), "attempt": attempt, "error": str(error)}
    if not error.retryable:
        log.info("permanent failure", extra=extra)
        return Outcome(status=JobState.FAILED, error=error.as_dict())
    if attempt >= max_attempts:
        log.info("attempts exhausted", extra=extra)
        return Outcome(
            status=JobState.DEAD,
            error=error.as_dict(),
            dead_reason=f"attempts exhausted ({attempt} of {max_attempts})",
        )
    delay = backoff_s(attempt, settings.retry_base_s, settings.retry_cap_s, error.retry_after_s)
    log.info("transient failure; retry scheduled", extra={**extra, "retry_in_s": round(delay, 3)})
    return Outcome(status=JobState.SCHEDULED, error=error.as_dict(), retry_in_s=delay)
