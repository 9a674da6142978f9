"""The one error hierarchy of Conveyor, shared by the servers and the client.

Each class stands for a gRPC status code. Servers raise them and the edge of every
call turns them into statuses (`to_status`); the client raises the same classes,
built from a failed call's status (`error_from_rpc`). A status carries its details
as google.rpc messages, so callers in any language read them too:

- `field_violations` travel as a `google.rpc.BadRequest` (INVALID_ARGUMENT names the
  wrong field, e.g. `messages[0].role`);
- `retry_after_s` as a `google.rpc.RetryInfo` (RESOURCE_EXHAUSTED with a known wait);
- `reason` and `info` as a `google.rpc.ErrorInfo` (e.g. WATCH_FELL_BEHIND).

Only grpcio, grpcio-status and the google.rpc protos are imported here: the client's
base install has nothing else.
"""

from __future__ import annotations

from datetime import timedelta

import grpc
import grpc.aio
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "conveyor.v1"
"""The `domain` of the google.rpc.ErrorInfo details Conveyor sends."""
STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""Trailing metadata key of a status's google.rpc details."""

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def code_of(number: int) -> grpc.StatusCode:
    """The status code numbered `number` (UNKNOWN for a number gRPC does not define)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


class ConveyorError(Exception):
    """A failed call: its gRPC status `code`, the `message` (also `details`) and the
    google.rpc details the status carries, if any."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.field_violations: list[tuple[str, str]] = []
        """(field, description) pairs of a google.rpc.BadRequest."""
        self.retry_after_s: float | None = None
        """Seconds to wait before trying again, from a google.rpc.RetryInfo."""
        self.reason = ""
        """The reason of a google.rpc.ErrorInfo, e.g. "WATCH_FELL_BEHIND"."""
        self.info: dict[str, str] = {}
        """The metadata of that ErrorInfo (e.g. `after_sequence` to resume a watch from)."""

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @property
    def details(self) -> str:
        """The status message, as `grpc.aio.AioRpcError.details()` gives it."""
        return self.message

    @property
    def retry_after(self) -> timedelta | None:
        """`retry_after_s` as a timedelta (None when the status gave no wait)."""
        return None if self.retry_after_s is None else timedelta(seconds=self.retry_after_s)

    def to_status(self) -> grpc.Status:
        """The gRPC status of this error, with its google.rpc details."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.field_violations:
            status.details.add().Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.field_violations
                    ]
                )
            )
        if self.reason:
            status.details.add().Pack(
                error_details_pb2.ErrorInfo(
                    reason=self.reason, domain=ERROR_DOMAIN, metadata=self.info
                )
            )
        if self.retry_after_s is not None:
            delay = Duration()
            delay.FromNanoseconds(int(max(0.0, self.retry_after_s) * 1e9))
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return rpc_status.to_status(status)

    @staticmethod
    def from_status(
        code: grpc.StatusCode, message: str, status: status_pb2.Status | None = None
    ) -> ConveyorError:
        """The error (the class of `code`) of a status and its google.rpc details."""
        error = ConveyorError.__new__(_CLASSES.get(code, ConveyorError))
        ConveyorError.__init__(error, message)  # not the subclass's: its arguments differ
        error.code = code
        for detail in status.details if status is not None else ():
            bad = error_details_pb2.BadRequest()
            retry = error_details_pb2.RetryInfo()
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(bad):
                error.field_violations += [(v.field, v.description) for v in bad.field_violations]
            elif detail.Unpack(retry):
                error.retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
            elif detail.Unpack(info):
                error.reason, error.info = info.reason, dict(info.metadata)
        if isinstance(error, InvalidArgument):
            error.field, error.description = (error.field_violations or [("", message)])[0]
        return error


class InvalidArgument(ConveyorError):
    """INVALID_ARGUMENT: a request field is missing or wrong; `field` names it
    (e.g. `messages[0].role`), as does `field_violations`."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description
        self.field_violations = [(field, description)]


class NotFound(ConveyorError):
    """NOT_FOUND: no such job (or it belongs to another tenant)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ConveyorError):
    """ALREADY_EXISTS."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ConveyorError):
    """FAILED_PRECONDITION: e.g. cancelling a finished job, retrying a running one."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ConveyorError):
    """UNAVAILABLE: the server cannot be reached or is shutting down; worth retrying."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ConveyorError):
    """UNAUTHENTICATED: no API key, or one that is unknown or revoked."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ConveyorError):
    """PERMISSION_DENIED: the key does not allow this (e.g. another tenant's stats)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ConveyorError):
    """RESOURCE_EXHAUSTED: a limit is reached (e.g. the tenant's submit quota); with
    `retry_after_s`, the status says when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


_CLASSES: dict[grpc.StatusCode, type[ConveyorError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
    )
}


def status_of(exc: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The google.rpc.Status a failed call carries in its trailers, if any.

    None when there is none, when it does not parse, or when its code disagrees with
    the call's: a malformed detail must not hide the error itself."""
    for key, value in exc.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # any decode error: keep the code and message
            return None
        return status if status.code == exc.code().value[0] else None
    return None


def error_from_rpc(exc: grpc.aio.AioRpcError) -> ConveyorError:
    """The ConveyorError (the class of its status code) of a failed gRPC call."""
    return ConveyorError.from_status(exc.code(), exc.details() or "", status_of(exc))
