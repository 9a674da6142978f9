"""Job statuses on the client side: names both ways, the terminal set, terminal events."""

from __future__ import annotations

from typing import TypeAlias

from conveyor.core import lifecycle
from conveyor.v1 import events_pb2, jobs_pb2

JobStatus: TypeAlias = jobs_pb2.JobStatus.ValueType

TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    state.to_proto() for state in lifecycle.TERMINAL
)
"""Statuses a job does not leave on its own (RetryJob can replay failed and dead jobs)."""

_STATUS_PREFIX = "JOB_STATUS_"


def job_status_name(status: int) -> str:
    """The short lower-case name of a JobStatus: 4 -> "succeeded", 0 -> "unspecified"."""
    try:
        name = jobs_pb2.JobStatus.Name(jobs_pb2.JobStatus.ValueType(status))
    except ValueError:
        return str(status)
    return name.removeprefix(_STATUS_PREFIX).lower()


def job_status_value(name: str) -> JobStatus:
    """The JobStatus named `name` ("succeeded", "SUCCEEDED" or "JOB_STATUS_SUCCEEDED").

    Raises ValueError for an unknown name.
    """
    key = name.strip().upper()
    if not key.startswith(_STATUS_PREFIX):
        key = _STATUS_PREFIX + key
    try:
        return jobs_pb2.JobStatus.Value(key)
    except ValueError:
        known = ", ".join(
            n.removeprefix(_STATUS_PREFIX).lower()
            for n in jobs_pb2.JobStatus.keys()  # noqa: SIM118 - an enum wrapper, not a dict
            if n != "JOB_STATUS_UNSPECIFIED"
        )
        raise ValueError(f"unknown job status {name!r} (one of: {known})") from None


def terminal_job(event: events_pb2.JobEvent) -> jobs_pb2.Job | None:
    """The final job an event carries when it reports a terminal status, else None.

    A terminal StatusChanged without its `job` gives a Job with only id and status.
    """
    kind = event.WhichOneof("payload")
    if kind == "snapshot" and event.snapshot.status in TERMINAL_STATUSES:
        return event.snapshot
    if kind == "status_changed" and event.status_changed.status in TERMINAL_STATUSES:
        change = event.status_changed
        if change.HasField("job"):
            return change.job
        return jobs_pb2.Job(id=event.job_id, status=change.status)
    return None
