"""Job states, the transitions between them, and their mapping to the contract."""

from __future__ import annotations

from enum import StrEnum

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
