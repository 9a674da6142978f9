"""The job's lifecycle: its typed record, its states, the transitions between them, and
the rules that choose a transition (retry with backoff, dead, cancel).

Every service and the SQL (conveyor/db) take their states and rules from here.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from conveyor.v1 import jobs_pb2


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

CLAIMABLE = (JobState.PENDING,)
"""States a worker may move to running."""

CANCELLABLE = (JobState.PENDING, JobState.SCHEDULED, JobState.RUNNING)
"""States CancelJob acts on; the rest answer FAILED_PRECONDITION."""

RETRYABLE = (JobState.FAILED, JobState.DEAD)
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
