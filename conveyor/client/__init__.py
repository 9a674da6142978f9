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

Two `grpc.aio` channels are opened lazily, one to the gateway (`JobService`) and
one to the notifier (`JobEvents`); they are closed by `close()` or on leaving the
`async with` block. With an API key (argument or `CONVEYOR_API_KEY`) every call
carries `authorization: Bearer <key>`; when OpenTelemetry is installed and a span
is active, its `traceparent` travels along too. With `secure=True` the channels
use TLS, verifying the servers against `root_certificates` (PEM bytes, or the
file named by `CONVEYOR_TLS_ROOT_CERTS`, or the system's roots) and presenting a
client certificate when one is given (or named by `CONVEYOR_TLS_CLIENT_CERT_FILE`
and `CONVEYOR_TLS_CLIENT_KEY_FILE`). Server errors surface as `ConveyorError`
(or a subclass per status code) with `.code` and `.details`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeAlias, cast

import grpc
import grpc.aio

from conveyor import __version__
from conveyor.v1 import (
    events_pb2,
    events_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
    schedules_pb2,
    schedules_pb2_grpc,
)

if TYPE_CHECKING:
    import anthropic

    from conveyor.v1.events_pb2_grpc import JobEventsAsyncStub
    from conveyor.v1.jobs_pb2_grpc import JobServiceAsyncStub

__all__ = [
    "TERMINAL_STATUSES",
    "AlreadyExists",
    "ConveyorClient",
    "ConveyorError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "content_blocks",
    "job_status_name",
    "message_of",
    "job_status_value",
]

JobStatus: TypeAlias = jobs_pb2.JobStatus.ValueType
MessagesArg: TypeAlias = str | Sequence[Mapping[str, str]] | Sequence[jobs_pb2.Message]
JobList: TypeAlias = list[jobs_pb2.Job]
History: TypeAlias = list[jobs_pb2.JobHistoryEntry]
Schedules: TypeAlias = list[schedules_pb2.Schedule]
LanePauses: TypeAlias = list[operations_pb2.LanePause]
Workers: TypeAlias = list[operations_pb2.Worker]
Metadata: TypeAlias = tuple[tuple[str, str], ...]

CATCH_UP_VALUES: dict[str, schedules_pb2.CatchUp.ValueType] = {
    "skip": schedules_pb2.CATCH_UP_SKIP,
    "once": schedules_pb2.CATCH_UP_ONCE,
    "all": schedules_pb2.CATCH_UP_ALL,
}
"""A schedule's catch-up policy by name (create_schedule's `catch_up`)."""

TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {
        jobs_pb2.JOB_STATUS_SUCCEEDED,
        jobs_pb2.JOB_STATUS_FAILED,
        jobs_pb2.JOB_STATUS_CANCELLED,
        jobs_pb2.JOB_STATUS_DEAD,
    }
)
"""Statuses a job does not leave on its own (RetryJob can replay failed and dead jobs)."""

API_KEY_ENV = "CONVEYOR_API_KEY"
"""Environment variable holding the API key sent as `authorization: Bearer <key>`."""
ROOT_CERTS_ENV = "CONVEYOR_TLS_ROOT_CERTS"
"""PEM file of the certificates that sign the servers' (with `secure=True`)."""
CLIENT_CERT_ENV = "CONVEYOR_TLS_CLIENT_CERT_FILE"
CLIENT_KEY_ENV = "CONVEYOR_TLS_CLIENT_KEY_FILE"

MAX_BATCH = 500
"""Most jobs one SubmitJobs call takes; `submit_many` splits longer lists."""

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


# --------------------------------------------------------------------------- errors


class ConveyorError(Exception):
    """A failed call: the gRPC status `code` and the server's `details`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field_violations: list[tuple[str, str]] = []
        """(field, description) pairs from a google.rpc.BadRequest detail, if any."""
        self.reason = ""
        """The reason of a google.rpc.ErrorInfo detail, e.g. "WATCH_FELL_BEHIND"."""
        self.info: dict[str, str] = {}
        """The metadata of that ErrorInfo (e.g. `after_sequence` to resume a watch from)."""


class InvalidArgument(ConveyorError):
    """INVALID_ARGUMENT: a request field is wrong; `field_violations` names it."""


class NotFound(ConveyorError):
    """NOT_FOUND: no such job (or it belongs to another tenant)."""


class AlreadyExists(ConveyorError):
    """ALREADY_EXISTS."""


class FailedPrecondition(ConveyorError):
    """FAILED_PRECONDITION: e.g. cancelling a finished job, retrying a running one."""


class Unavailable(ConveyorError):
    """UNAVAILABLE: the server cannot be reached or is shutting down; worth retrying."""


class Unauthenticated(ConveyorError):
    """UNAUTHENTICATED: no API key, or an unknown or revoked one."""


class PermissionDenied(ConveyorError):
    """PERMISSION_DENIED: the key does not allow this (e.g. other tenants' stats)."""


class ResourceExhausted(ConveyorError):
    """RESOURCE_EXHAUSTED: e.g. the tenant's submit quota; `retry_after` says when to retry."""

    retry_after: timedelta | None = None
    """From the google.rpc.RetryInfo detail, when the server sent one."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[ConveyorError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}


def _field_violations(exc: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """Field violations of a google.rpc.BadRequest in the status details, if any."""
    try:
        from google.rpc import error_details_pb2, status_pb2

        for key, value in exc.trailing_metadata() or ():
            if key != "grpc-status-details-bin" or not isinstance(value, bytes):
                continue
            status = status_pb2.Status.FromString(value)
            out: list[tuple[str, str]] = []
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    out.extend((v.field, v.description) for v in bad.field_violations)
            return out
    except Exception:  # a malformed detail must not hide the error itself
        return []
    return []


def _retry_after(exc: grpc.aio.AioRpcError) -> timedelta | None:
    """The delay of a google.rpc.RetryInfo in the status details, if any."""
    try:
        from google.rpc import error_details_pb2, status_pb2

        for key, value in exc.trailing_metadata() or ():
            if key != "grpc-status-details-bin" or not isinstance(value, bytes):
                continue
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    delay: timedelta = info.retry_delay.ToTimedelta()
                    return delay
    except Exception:  # a malformed detail must not hide the error itself
        return None
    return None


def error_from_rpc(exc: grpc.aio.AioRpcError) -> ConveyorError:
    """The ConveyorError (subclass by status code) for a failed gRPC call."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    error = _ERROR_CLASSES.get(code, ConveyorError)(code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        error.field_violations = _field_violations(exc)
    if isinstance(error, ResourceExhausted):
        error.retry_after = _retry_after(exc)
    error.reason, error.info = _error_info(exc)
    return error


def _error_info(exc: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """Reason and metadata of a google.rpc.ErrorInfo in the status details, if any."""
    try:
        from google.rpc import error_details_pb2, status_pb2

        for key, value in exc.trailing_metadata() or ():
            if key != "grpc-status-details-bin" or not isinstance(value, bytes):
                continue
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason, dict(info.metadata)
    except Exception:  # a malformed detail must not hide the error itself
        return "", {}
    return "", {}


WATCH_FELL_BEHIND = "WATCH_FELL_BEHIND"
"""ErrorInfo reason of a watch cut off because its reader fell too far behind."""


def _resumable(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a broken watch is worth reopening from the last sequence seen."""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    return (
        exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and _error_info(exc)[0] == WATCH_FELL_BEHIND
    )


def _is_event(event: events_pb2.JobEvent) -> bool:
    """Status changes and token deltas are numbered events (snapshots and progress are not)."""
    return event.WhichOneof("payload") in ("status_changed", "token_delta")


def _terminal_change(event: events_pb2.JobEvent) -> bool:
    return (
        event.WhichOneof("payload") == "status_changed"
        and event.status_changed.status in TERMINAL_STATUSES
    )


# --------------------------------------------------------------------------- helpers


def build_messages(messages: MessagesArg) -> list[jobs_pb2.Message]:
    """Messages from a prompt string (one user turn), dicts with role/content, or Messages."""
    if isinstance(messages, str):
        return [jobs_pb2.Message(role="user", content=messages)]
    out: list[jobs_pb2.Message] = []
    for item in messages:
        if isinstance(item, jobs_pb2.Message):
            out.append(item)
        else:
            out.append(jobs_pb2.Message(role=item.get("role", "user"), content=item["content"]))
    return out


def _jsonable(value: Any) -> Any:
    """What json cannot write itself: the SDK's Iterable params (tuples, generators),
    other mappings, and pydantic models (e.g. an SDK block passed back in a new turn)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _json_bytes(body: Any) -> bytes:
    """Compact UTF-8 JSON (the stdlib's: the client installs without orjson)."""
    return json.dumps(
        body, default=_jsonable, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode()


def _env_target(service: str, default_port: int) -> str:
    """host:port from CONVEYOR_<SERVICE>_HOST and _PORT, the variables the settings read
    (read here directly: the client installs without the server's pydantic settings)."""
    host = os.environ.get(f"CONVEYOR_{service}_HOST") or "127.0.0.1"
    port = os.environ.get(f"CONVEYOR_{service}_PORT") or str(default_port)
    return f"{host}:{port}"


def content_blocks(job: jobs_pb2.Job) -> list[dict[str, Any]]:
    """The final message's content blocks of a finished job ([] when it has none)."""
    return cast(list[dict[str, Any]], json.loads(job.content_json)) if job.content_json else []


def message_of(job: jobs_pb2.Job) -> anthropic.types.Message:
    """A succeeded job's answer as the SDK's Message, as `messages.create` returns it."""
    import anthropic  # here: importing the SDK takes a while, and few callers need it

    usage = (
        json.loads(job.usage.usage_json)
        if job.usage.usage_json
        else {
            "input_tokens": job.usage.input_tokens,
            "output_tokens": job.usage.output_tokens,
        }
    )
    return anthropic.types.Message.model_validate(
        {
            "id": job.response_id,
            "type": "message",
            "role": "assistant",
            "model": job.response_model or job.model,
            "content": content_blocks(job),
            "stop_reason": job.stop_reason or None,
            "stop_sequence": job.stop_sequence or None,
            "usage": usage,
        }
    )


def _aware(value: datetime) -> datetime:
    """`value` with a time zone; a naive datetime is read as local time."""
    return value if value.tzinfo is not None else value.astimezone()


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


def _trace_metadata() -> list[tuple[str, str]]:
    """W3C trace context of the current span as gRPC metadata (empty without OpenTelemetry)."""
    try:
        from opentelemetry.propagate import inject
    except ImportError:  # pragma: no cover - opentelemetry is a dependency
        return []
    carrier: dict[str, str] = {}
    inject(carrier)
    return [(k.lower(), v) for k, v in carrier.items()]


# --------------------------------------------------------------------------- client


class ConveyorClient:
    """Async client of the gateway (JobService) and the notifier (JobEvents).

    `gateway` and `notifier` are `host:port` targets, by default those of the
    settings (CONVEYOR_GATEWAY_HOST/PORT, CONVEYOR_NOTIFIER_HOST/PORT).
    `rpc_timeout` bounds every unary call (seconds; None for no limit).
    """

    def __init__(
        self,
        gateway: str | None = None,
        notifier: str | None = None,
        *,
        api_key: str | None = None,
        secure: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
        rpc_timeout: float | None = 30.0,
    ) -> None:
        """`client_certificate` is (certificate chain, private key), both PEM, for servers
        that require one (mutual TLS)."""
        self.gateway = gateway or _env_target("GATEWAY", 50051)
        self.notifier = notifier or _env_target("NOTIFIER", 50052)
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.secure = secure
        self.root_certificates = root_certificates
        self.client_certificate = client_certificate
        self.rpc_timeout = rpc_timeout
        self._gateway_channel: grpc.aio.Channel | None = None
        self._notifier_channel: grpc.aio.Channel | None = None
        self._jobs_stub: JobServiceAsyncStub | None = None
        self._events_stub: JobEventsAsyncStub | None = None

    def __repr__(self) -> str:  # never shows the key
        auth = "api_key=***" if self._api_key else "no api key"
        return f"ConveyorClient(gateway={self.gateway!r}, notifier={self.notifier!r}, {auth})"

    # -- lifecycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close both channels; calls in progress are cancelled. Safe to call twice."""
        channels = [self._gateway_channel, self._notifier_channel]
        self._gateway_channel = self._notifier_channel = None
        self._jobs_stub = None
        self._events_stub = None
        for channel in channels:
            if channel is not None:
                await channel.close()

    def _channel(self, target: str) -> grpc.aio.Channel:
        options: list[tuple[str, str | int]] = [
            ("grpc.primary_user_agent", f"conveyor-client/{__version__}"),
            # A job's request body and answer can be many MiB (gRPC's default is 4 MiB).
            ("grpc.max_receive_message_length", -1),
        ]
        if self.secure:
            return grpc.aio.secure_channel(target, self._credentials(), options=options)
        return grpc.aio.insecure_channel(target, options=options)

    def _credentials(self) -> grpc.ChannelCredentials:
        roots = self.root_certificates
        if roots is None and os.environ.get(ROOT_CERTS_ENV):
            roots = Path(os.environ[ROOT_CERTS_ENV]).read_bytes()
        chain, key = self.client_certificate or (None, None)
        if chain is None and os.environ.get(CLIENT_CERT_ENV) and os.environ.get(CLIENT_KEY_ENV):
            chain = Path(os.environ[CLIENT_CERT_ENV]).read_bytes()
            key = Path(os.environ[CLIENT_KEY_ENV]).read_bytes()
        return grpc.ssl_channel_credentials(
            root_certificates=roots, private_key=key, certificate_chain=chain
        )

    @property
    def _jobs(self) -> JobServiceAsyncStub:
        if self._jobs_stub is None:
            self._gateway_channel = self._channel(self.gateway)
            # The stub's overloads need a typed channel to pick the async variant.
            self._jobs_stub = cast(
                "JobServiceAsyncStub", jobs_pb2_grpc.JobServiceStub(self._gateway_channel)
            )
        return self._jobs_stub

    @property
    def _events(self) -> JobEventsAsyncStub:
        if self._events_stub is None:
            self._notifier_channel = self._channel(self.notifier)
            self._events_stub = cast(
                "JobEventsAsyncStub", events_pb2_grpc.JobEventsStub(self._notifier_channel)
            )
        return self._events_stub

    def _metadata(self) -> Metadata:
        pairs = _trace_metadata()
        if self._api_key:
            pairs.append(("authorization", f"Bearer {self._api_key}"))
        return tuple(pairs)

    # -- JobService

    async def submit(
        self,
        model: str,
        messages: MessagesArg,
        *,
        max_tokens: int = 1024,
        system: str = "",
        temperature: float | None = None,
        stop_sequences: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        priority: int = 0,
        lane: str = "",
        idempotency_key: str = "",
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        max_attempts: int = 0,
        timeout: timedelta | None = None,  # noqa: ASYNC109 - the job's limit, not this call's
        webhook_url: str = "",
        labels: Mapping[str, str] | None = None,
        webhook_events: jobs_pb2.WebhookEvents.ValueType = jobs_pb2.WEBHOOK_EVENTS_UNSPECIFIED,
    ) -> jobs_pb2.Job:
        """Submit one LLM call as a job and return it as stored (usually pending).

        `messages` is the conversation, or a string for one user message. With an
        `idempotency_key` seen before, the first job is returned. `webhook_url` is
        POSTed on terminal statuses, or on every status change with
        `webhook_events=WEBHOOK_EVENTS_ALL`.
        """
        request = jobs_pb2.SubmitJobRequest(
            model=model,
            system=system,
            messages=build_messages(messages),
            max_tokens=max_tokens,
            stop_sequences=list(stop_sequences),
            metadata=dict(metadata or {}),
            priority=priority,
            lane=lane,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            webhook_url=webhook_url,
            labels=dict(labels or {}),
            webhook_events=webhook_events,
        )
        if temperature is not None:
            request.temperature = temperature
        if run_at is not None:
            request.run_at.FromDatetime(_aware(run_at))
        if delay is not None:
            request.delay.FromTimedelta(delay)
        if timeout is not None:
            request.timeout.FromTimedelta(timeout)
        response = await self.submit_request(request)
        return response.job

    async def create(
        self,
        *,
        model: str,
        max_tokens: int,
        messages: Iterable[Mapping[str, Any]],
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109 - the job's limit
        priority: int = 0,
        lane: str = "",
        idempotency_key: str = "",
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        max_attempts: int = 0,
        webhook_url: str = "",
        labels: Mapping[str, str] | None = None,
        webhook_events: jobs_pb2.WebhookEvents.ValueType = jobs_pb2.WEBHOOK_EVENTS_UNSPECIFIED,
        **params: Any,
    ) -> jobs_pb2.Job:
        """Submit a Messages API call as a job, with the keyword arguments of
        `anthropic.AsyncAnthropic().messages.create` (tools, tool_choice, thinking,
        system blocks, output_config, cache_control, metadata, ...; `extra_body` merged
        into the body as the SDK does), plus Conveyor's own as keyword-only extras.

        The body travels whole (`request_json`) and is checked by the gateway against
        its SDK's types. `timeout` (seconds or a timedelta) is the limit on the job's
        model call. `stream` is Conveyor's (it always streams): watch the job instead.
        The answer: `await wait(job.id)`, then `message_of(job)` for an SDK Message.
        """
        for name in ("stream", "extra_headers", "extra_query"):
            if name in params:
                raise TypeError(f"create() does not take {name!r}: Conveyor owns it")
        body = {"model": model, "max_tokens": max_tokens, "messages": messages, **params}
        body.update(extra_body or {})
        request = jobs_pb2.SubmitJobRequest(
            request_json=_json_bytes(body),
            priority=priority,
            lane=lane,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            webhook_url=webhook_url,
            labels=dict(labels or {}),
            webhook_events=webhook_events,
        )
        if run_at is not None:
            request.run_at.FromDatetime(_aware(run_at))
        if delay is not None:
            request.delay.FromTimedelta(delay)
        if timeout is not None:
            limit = timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout)
            request.timeout.FromTimedelta(limit)
        response = await self.submit_request(request)
        return response.job

    async def submit_request(self, req: jobs_pb2.SubmitJobRequest) -> jobs_pb2.SubmitJobResponse:
        """Send a prepared SubmitJobRequest; the response tells an idempotent replay apart."""
        try:
            response: jobs_pb2.SubmitJobResponse = await self._jobs.SubmitJob(
                req, metadata=self._metadata(), timeout=self.rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return response

    async def submit_many(self, reqs: Iterable[jobs_pb2.SubmitJobRequest]) -> JobList:
        """Submit jobs in batches of up to 500 (each batch all or none); jobs in request order."""
        pending = list(reqs)
        jobs: JobList = []
        for start in range(0, len(pending), MAX_BATCH):
            batch = jobs_pb2.SubmitJobsRequest(jobs=pending[start : start + MAX_BATCH])
            try:
                response: jobs_pb2.SubmitJobsResponse = await self._jobs.SubmitJobs(
                    batch, metadata=self._metadata(), timeout=self.rpc_timeout
                )
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc) from None
            jobs.extend(result.job for result in response.results)
        return jobs

    async def get(self, job_id: str) -> jobs_pb2.Job:
        """The job with this id; NotFound if there is none (for this tenant)."""
        try:
            response: jobs_pb2.GetJobResponse = await self._jobs.GetJob(
                jobs_pb2.GetJobRequest(id=job_id),
                metadata=self._metadata(),
                timeout=self.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return response.job

    async def list(
        self,
        statuses: Iterable[JobStatus] = (),
        lane: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 100,
        page_token: str = "",
        *,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        full: bool = False,
    ) -> tuple[JobList, str]:
        """One page of jobs, newest first, and the token of the next page ("" on the last).

        Without `full` (the BASIC view) the jobs come without content_json and
        request_json; with it, as GetJob returns them."""
        request = jobs_pb2.ListJobsRequest(
            statuses=list(statuses),
            lane=lane,
            labels=dict(labels or {}),
            page_size=page_size,
            page_token=page_token,
            view=jobs_pb2.JOB_VIEW_FULL if full else jobs_pb2.JOB_VIEW_BASIC,
        )
        if created_after is not None:
            request.created_after.FromDatetime(_aware(created_after))
        if created_before is not None:
            request.created_before.FromDatetime(_aware(created_before))
        try:
            response: jobs_pb2.ListJobsResponse = await self._jobs.ListJobs(
                request, metadata=self._metadata(), timeout=self.rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return list(response.jobs), response.next_page_token

    async def iter_jobs(
        self,
        statuses: Iterable[JobStatus] = (),
        lane: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 100,
        *,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> AsyncIterator[jobs_pb2.Job]:
        """Every matching job, newest first, fetching pages as needed."""
        wanted = tuple(statuses)
        token = ""
        while True:
            jobs, token = await self.list(
                wanted,
                lane,
                labels,
                page_size,
                token,
                created_after=created_after,
                created_before=created_before,
            )
            for job in jobs:
                yield job
            if not token:
                return

    async def cancel(self, job_id: str, reason: str = "") -> jobs_pb2.Job:
        """Cancel a job; returns it (a running job may still show running until it stops).

        FailedPrecondition if the job has already finished.
        """
        try:
            response: jobs_pb2.CancelJobResponse = await self._jobs.CancelJob(
                jobs_pb2.CancelJobRequest(id=job_id, reason=reason),
                metadata=self._metadata(),
                timeout=self.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return response.job

    async def retry(self, job_id: str) -> jobs_pb2.Job:
        """Replay a failed or dead job as a new attempt; returns the requeued job."""
        try:
            response: jobs_pb2.RetryJobResponse = await self._jobs.RetryJob(
                jobs_pb2.RetryJobRequest(id=job_id),
                metadata=self._metadata(),
                timeout=self.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return response.job

    async def stats(
        self,
        tenant: str = "",
        *,
        all_tenants: bool = False,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> jobs_pb2.GetStatsResponse:
        """Counts by status and lane, queue depths, run-time percentiles and token totals,
        and cost per tenant, model and lane of the jobs finished in [since, until)
        (default: the last 24 hours).

        Of the caller's tenant; another `tenant`'s, or `all_tenants`, need an admin key.
        """
        request = jobs_pb2.GetStatsRequest(tenant=tenant, all_tenants=all_tenants)
        if since is not None:
            request.since.FromDatetime(since)
        if until is not None:
            request.until.FromDatetime(until)
        try:
            response: jobs_pb2.GetStatsResponse = await self._jobs.GetStats(
                request,
                metadata=self._metadata(),
                timeout=self.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return response

    async def history(self, job_id: str) -> History:
        """The job's stored transitions, oldest first, each naming who caused it."""
        try:
            response: jobs_pb2.GetJobHistoryResponse = await self._jobs.GetJobHistory(
                jobs_pb2.GetJobHistoryRequest(id=job_id),
                metadata=self._metadata(),
                timeout=self.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return list(response.entries)

    # -- JobEvents

    async def watch(
        self,
        job_id: str,
        after_sequence: int = 0,
        *,
        resume: bool = True,
        max_reconnects: int = 10,
        progress_interval: timedelta | None = None,
    ) -> AsyncIterator[events_pb2.JobEvent]:
        """The job's events: a snapshot first, then status changes, token deltas and
        progress reports, from `after_sequence` on (see JobEvents.WatchJob).

        The iterator ends after the event that reports a terminal status; a fresh
        watch (`after_sequence` 0) of a finished job ends with its snapshot. With
        `resume`, a stream that breaks (notifier restart, UNAVAILABLE, or cut off
        because this reader fell behind) is reopened after the last sequence number
        seen, up to `max_reconnects` times in a row without progress; each reopened
        stream starts with a fresh snapshot, and no event is repeated or skipped.
        Other errors raise ConveyorError (NotFound for an unknown job).
        """
        last = after_sequence
        failures = 0
        while True:
            request = events_pb2.WatchJobRequest(id=job_id, after_sequence=last)
            if progress_interval is not None:
                request.progress_interval.FromTimedelta(progress_interval)
            call = self._events.WatchJob(request, metadata=self._metadata())
            ended_terminal = False
            try:
                async for event in call:
                    if _is_event(event) and event.sequence <= last:
                        continue  # already seen before a reconnect
                    if _is_event(event):
                        last = event.sequence
                        failures = 0
                    yield event
                    if _terminal_change(event):
                        return
                    if event.WhichOneof("payload") == "snapshot":
                        ended_terminal = event.snapshot.status in TERMINAL_STATUSES
                        if ended_terminal and last == 0:
                            return  # a finished job: its snapshot says it all
            except grpc.aio.AioRpcError as exc:
                if not resume or not _resumable(exc):
                    raise error_from_rpc(exc) from None
                failures += 1
                if failures > max_reconnects:
                    raise error_from_rpc(exc) from None
            else:
                if ended_terminal or not resume:
                    return  # finished before the resume point: nothing more to say
                # The stream ended without a terminal event: the notifier went away.
                failures += 1
                if failures > max_reconnects:
                    raise Unavailable(
                        grpc.StatusCode.UNAVAILABLE,
                        f"watch of job {job_id} kept ending before the job finished",
                    )
            finally:
                call.cancel()
            await asyncio.sleep(min(0.1 * 2**failures, 5.0))

    async def watch_jobs(
        self,
        ids: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        *,
        token_deltas: bool = False,
        after_sequences: Mapping[str, int] | None = None,
        resume: bool = True,
        max_reconnects: int = 10,
        progress_interval: timedelta | None = None,
    ) -> AsyncIterator[events_pb2.JobEvent]:
        """Many jobs on one stream: the jobs `ids`, or every job of the caller's tenant
        carrying all `labels` (see JobEvents.WatchJobs). Each job's events come in
        sequence order after its snapshot; with `token_deltas`, the tokens too.

        With ids, the iterator ends when every job is terminal; with labels, when the
        caller stops iterating. With `resume`, a broken stream is reopened from the last
        sequence number seen of each job, as `watch` does.
        """
        wanted = list(dict.fromkeys(ids))
        last: dict[str, int] = dict(after_sequences or {})
        failures = 0
        while True:
            request = events_pb2.WatchJobsRequest(
                ids=wanted,
                labels=dict(labels or {}),
                after_sequences=last,
                token_deltas=token_deltas,
            )
            if progress_interval is not None:
                request.progress_interval.FromTimedelta(progress_interval)
            call = self._events.WatchJobs(request, metadata=self._metadata())
            try:
                async for event in call:
                    if _is_event(event):
                        if event.sequence <= last.get(event.job_id, 0):
                            continue
                        last[event.job_id] = event.sequence
                        failures = 0
                    yield event
                return
            except grpc.aio.AioRpcError as exc:
                if not resume or not _resumable(exc):
                    raise error_from_rpc(exc) from None
                failures += 1
                if failures > max_reconnects:
                    raise error_from_rpc(exc) from None
            finally:
                call.cancel()
            await asyncio.sleep(min(0.1 * 2**failures, 5.0))

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 - part of the public API
    ) -> jobs_pb2.Job:
        """Watch the job until it reaches a terminal status and return the final job.

        Raises TimeoutError after `timeout` seconds (None waits as long as it takes).
        """
        async with asyncio.timeout(timeout):
            async for event in self.watch(job_id):
                job = terminal_job(event)
                if job is None:
                    continue
                change = event.status_changed
                if event.WhichOneof("payload") == "status_changed" and not change.HasField("job"):
                    return await self.get(job_id)  # a terminal transition without the full job
                return job
            return await self.get(job_id)

    # -- Operations: schedules, erasure, priority, bulk actions, lanes, workers (gateway)

    async def _gateway_unary(self, stub_class: Any, method: str, request: Any) -> Any:
        """Call a unary method of another gateway service on the gateway's channel."""
        _ = self._jobs  # opens the gateway channel
        stub = stub_class(self._gateway_channel)
        try:
            return await getattr(stub, method)(
                request, metadata=self._metadata(), timeout=self.rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    async def create_schedule(
        self,
        template: jobs_pb2.SubmitJobRequest,
        *,
        cron: str = "",
        time_zone: str = "",
        interval: timedelta | None = None,
        name: str = "",
        catch_up: str = "skip",
        max_catch_up: int = 0,
        start_time: datetime | None = None,
        paused: bool = False,
    ) -> schedules_pb2.Schedule:
        """A schedule submitting `template` at each occurrence: a cron expression (in
        `time_zone`, default UTC) or an `interval`. `catch_up`: skip, once or all."""
        request = schedules_pb2.CreateScheduleRequest(
            name=name,
            cron=cron,
            time_zone=time_zone,
            template=template,
            catch_up=CATCH_UP_VALUES[catch_up],
            max_catch_up=max_catch_up,
            paused=paused,
        )
        if interval is not None:
            request.interval.FromTimedelta(interval)
        if start_time is not None:
            request.start_time.FromDatetime(_aware(start_time))
        response = cast(
            schedules_pb2.CreateScheduleResponse,
            await self._gateway_unary(
                schedules_pb2_grpc.ScheduleServiceStub, "CreateSchedule", request
            ),
        )
        return response.schedule

    async def get_schedule(self, schedule_id: str) -> schedules_pb2.Schedule:
        response = cast(
            schedules_pb2.GetScheduleResponse,
            await self._gateway_unary(
                schedules_pb2_grpc.ScheduleServiceStub,
                "GetSchedule",
                schedules_pb2.GetScheduleRequest(id=schedule_id),
            ),
        )
        return response.schedule

    async def list_schedules(
        self, page_size: int = 100, page_token: str = ""
    ) -> tuple[Schedules, str]:
        """One page of the tenant's schedules, oldest first, and the next page's token."""
        response = cast(
            schedules_pb2.ListSchedulesResponse,
            await self._gateway_unary(
                schedules_pb2_grpc.ScheduleServiceStub,
                "ListSchedules",
                schedules_pb2.ListSchedulesRequest(page_size=page_size, page_token=page_token),
            ),
        )
        return list(response.schedules), response.next_page_token

    async def pause_schedule(self, schedule_id: str) -> schedules_pb2.Schedule:
        response = cast(
            schedules_pb2.PauseScheduleResponse,
            await self._gateway_unary(
                schedules_pb2_grpc.ScheduleServiceStub,
                "PauseSchedule",
                schedules_pb2.PauseScheduleRequest(id=schedule_id),
            ),
        )
        return response.schedule

    async def resume_schedule(self, schedule_id: str) -> schedules_pb2.Schedule:
        response = cast(
            schedules_pb2.ResumeScheduleResponse,
            await self._gateway_unary(
                schedules_pb2_grpc.ScheduleServiceStub,
                "ResumeSchedule",
                schedules_pb2.ResumeScheduleRequest(id=schedule_id),
            ),
        )
        return response.schedule

    async def delete_schedule(self, schedule_id: str) -> None:
        await self._gateway_unary(
            schedules_pb2_grpc.ScheduleServiceStub,
            "DeleteSchedule",
            schedules_pb2.DeleteScheduleRequest(id=schedule_id),
        )

    async def delete(self, job_id: str) -> None:
        """Erase a finished job with its history and deliveries (NotFound afterwards);
        FailedPrecondition for a job not finished."""
        try:
            await self._jobs.DeleteJob(
                jobs_pb2.DeleteJobRequest(id=job_id),
                metadata=self._metadata(),
                timeout=self.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    async def set_priority(self, job_id: str, priority: int) -> jobs_pb2.Job:
        """Change a pending or scheduled job's priority; returns the job."""
        try:
            response: jobs_pb2.UpdateJobPriorityResponse = await self._jobs.UpdateJobPriority(
                jobs_pb2.UpdateJobPriorityRequest(id=job_id, priority=priority),
                metadata=self._metadata(),
                timeout=self.rpc_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return response.job

    @staticmethod
    def job_filter(
        statuses: Iterable[JobStatus] = (),
        lane: str = "",
        labels: Mapping[str, str] | None = None,
        model: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> operations_pb2.JobFilter:
        """A JobFilter for cancel_jobs and retry_jobs."""
        flt = operations_pb2.JobFilter(
            statuses=list(statuses), lane=lane, labels=dict(labels or {}), model=model
        )
        if created_after is not None:
            flt.created_after.FromDatetime(_aware(created_after))
        if created_before is not None:
            flt.created_before.FromDatetime(_aware(created_before))
        return flt

    async def cancel_jobs(
        self,
        flt: operations_pb2.JobFilter | None = None,
        *,
        dry_run: bool = False,
        limit: int = 0,
        reason: str = "",
    ) -> operations_pb2.BulkActionResponse:
        """Cancel the live jobs a filter matches (see `job_filter`); a dry run counts them."""
        return cast(
            operations_pb2.BulkActionResponse,
            await self._gateway_unary(
                operations_pb2_grpc.OperationsServiceStub,
                "CancelJobs",
                operations_pb2.CancelJobsRequest(
                    filter=flt, dry_run=dry_run, limit=limit, reason=reason
                ),
            ),
        )

    async def retry_jobs(
        self, flt: operations_pb2.JobFilter | None = None, *, dry_run: bool = False, limit: int = 0
    ) -> operations_pb2.BulkActionResponse:
        """Replay the failed and dead jobs a filter matches; a dry run counts them."""
        return cast(
            operations_pb2.BulkActionResponse,
            await self._gateway_unary(
                operations_pb2_grpc.OperationsServiceStub,
                "RetryJobs",
                operations_pb2.RetryJobsRequest(filter=flt, dry_run=dry_run, limit=limit),
            ),
        )

    async def redrive_dead(
        self, tenant: str = "", *, dry_run: bool = False, limit: int = 0
    ) -> operations_pb2.BulkActionResponse:
        """Replay every dead job of the tenant (another tenant's with an operator key)."""
        return cast(
            operations_pb2.BulkActionResponse,
            await self._gateway_unary(
                operations_pb2_grpc.OperationsServiceStub,
                "RedriveDeadJobs",
                operations_pb2.RedriveDeadJobsRequest(tenant=tenant, dry_run=dry_run, limit=limit),
            ),
        )

    async def pause_lane(
        self, lane: str, *, tenant: str = "", all_tenants: bool = False, reason: str = ""
    ) -> operations_pb2.LanePause:
        """Stop workers taking a lane's jobs (they wait, pending)."""
        response = cast(
            operations_pb2.PauseLaneResponse,
            await self._gateway_unary(
                operations_pb2_grpc.OperationsServiceStub,
                "PauseLane",
                operations_pb2.PauseLaneRequest(
                    lane=lane, tenant=tenant, all_tenants=all_tenants, reason=reason
                ),
            ),
        )
        return response.pause

    async def resume_lane(self, lane: str, *, tenant: str = "", all_tenants: bool = False) -> bool:
        """Let workers take a paused lane's jobs again; False if it was not paused."""
        response = cast(
            operations_pb2.ResumeLaneResponse,
            await self._gateway_unary(
                operations_pb2_grpc.OperationsServiceStub,
                "ResumeLane",
                operations_pb2.ResumeLaneRequest(lane=lane, tenant=tenant, all_tenants=all_tenants),
            ),
        )
        return response.resumed

    async def lane_pauses(self) -> LanePauses:
        response = cast(
            operations_pb2.ListLanePausesResponse,
            await self._gateway_unary(
                operations_pb2_grpc.OperationsServiceStub,
                "ListLanePauses",
                operations_pb2.ListLanePausesRequest(),
            ),
        )
        return list(response.pauses)

    async def workers(self) -> Workers:
        """The live workers (operator keys)."""
        response = cast(
            operations_pb2.ListWorkersResponse,
            await self._gateway_unary(
                operations_pb2_grpc.OperationsServiceStub,
                "ListWorkers",
                operations_pb2.ListWorkersRequest(),
            ),
        )
        return list(response.workers)

    async def drain_worker(self, worker_id: str) -> operations_pb2.Worker:
        """Ask a worker to finish its calls and exit (operator keys)."""
        response = cast(
            operations_pb2.DrainWorkerResponse,
            await self._gateway_unary(
                operations_pb2_grpc.OperationsServiceStub,
                "DrainWorker",
                operations_pb2.DrainWorkerRequest(id=worker_id),
            ),
        )
        return response.worker
