"""A typed async client for Conveyor: submit jobs to the gateway, read them back, watch them live.

    async with ConveyorClient() as conveyor:
        job = await conveyor.submit("claude-sonnet-4-5", "Write a haiku.", max_tokens=128)
        async for event in conveyor.watch(job.id):
            if event.WhichOneof("payload") == "token_delta" and event.token_delta.kind == TEXT:
                print(event.token_delta.text, end="", flush=True)
        final = await conveyor.wait(job.id)

(TEXT is `conveyor.v1.events_pb2.DELTA_KIND_TEXT`: deltas also carry tool input,
thinking and citations, each with its content block's index.) A whole Messages API
body goes through `create(**body)`, with the SDK's keyword arguments.

The client talks to the gateway (JobService, ScheduleService, OperationsService) and
the notifier (JobEvents) over two lazily opened `grpc.aio` channels, closed by
`close()` or on leaving the `async with` block. With an API key (argument or
`CONVEYOR_API_KEY`) every call carries `authorization: Bearer <key>`. With
`secure=True` the channels use TLS, verifying the servers against `root_certificates`
(PEM bytes, or the file named by `CONVEYOR_TLS_ROOT_CERTS`, or the system's roots)
and presenting a client certificate when one is given (or named by
`CONVEYOR_TLS_CLIENT_CERT_FILE` and `CONVEYOR_TLS_CLIENT_KEY_FILE`).

Server errors surface as `ConveyorError` (a subclass per status code, the same classes
the servers raise: `conveyor.core.errors`) with `.code` and `.details`.

The modules, by concern: `channel` (channels, metadata, the one unary-call wrapper),
`jobs` (JobService), `watching` (JobEvents streams, `wait`), `schedules`,
`operations`, `messages` (request bodies, `message_of`), `statuses`, and `sync`
(the blocking client).
"""

from __future__ import annotations

from conveyor.core.errors import (
    AlreadyExists,
    ConveyorError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    error_from_rpc,
)

from .channel import API_KEY_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV, ROOT_CERTS_ENV, Metadata
from .jobs import MAX_BATCH, History, JobList
from .messages import MessagesArg, build_messages, content_blocks, message_of
from .messages import _jsonable as _jsonable  # tests check it directly
from .operations import LanePauses, OperationCalls, Workers
from .schedules import CATCH_UP_VALUES, ScheduleCalls, Schedules
from .statuses import (
    TERMINAL_STATUSES,
    JobStatus,
    job_status_name,
    job_status_value,
    terminal_job,
)
from .watching import WATCH_FELL_BEHIND, Watching

__all__ = [
    "API_KEY_ENV",
    "CATCH_UP_VALUES",
    "CLIENT_CERT_ENV",
    "CLIENT_KEY_ENV",
    "MAX_BATCH",
    "ROOT_CERTS_ENV",
    "TERMINAL_STATUSES",
    "WATCH_FELL_BEHIND",
    "AlreadyExists",
    "ConveyorClient",
    "ConveyorError",
    "FailedPrecondition",
    "History",
    "InvalidArgument",
    "JobList",
    "JobStatus",
    "LanePauses",
    "MessagesArg",
    "Metadata",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Schedules",
    "Unauthenticated",
    "Unavailable",
    "Workers",
    "build_messages",
    "content_blocks",
    "error_from_rpc",
    "job_status_name",
    "job_status_value",
    "message_of",
    "terminal_job",
]


class ConveyorClient(Watching, ScheduleCalls, OperationCalls):
    """Async client of the gateway (JobService, ScheduleService, OperationsService) and
    the notifier (JobEvents).

    `gateway` and `notifier` are `host:port` targets, by default those of the
    settings (CONVEYOR_GATEWAY_HOST/PORT, CONVEYOR_NOTIFIER_HOST/PORT).
    `rpc_timeout` bounds every unary call (seconds; None for no limit).
    """
