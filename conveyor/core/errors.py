"""Errors with a gRPC status, raised by service code and turned into statuses at the edge.

INVALID_ARGUMENT carries a `google.rpc.BadRequest` detail naming the field, so
generated clients in any language can read which field was wrong;
RESOURCE_EXHAUSTED with a known wait carries a `google.rpc.RetryInfo` detail.
"""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


class ConveyorError(Exception):
    """An error the caller should see, with its gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_status(self) -> grpc.Status:
        return rpc_status.to_status(
            status_pb2.Status(code=self.code.value[0], message=self.message)
        )


class InvalidArgument(ConveyorError):
    """A request field is missing or out of range; `field` names it (e.g. `messages[0].role`)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description

    def to_status(self) -> grpc.Status:
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=self.field, description=self.description
                )
            ]
        )
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=self.message)
        status.details.add().Pack(detail)
        return rpc_status.to_status(status)


class NotFound(ConveyorError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ConveyorError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ConveyorError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ConveyorError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ConveyorError):
    """No API key, or one that is unknown or revoked."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ConveyorError):
    """The caller's key does not allow this (e.g. another tenant's stats without admin)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ConveyorError):
    """A limit is reached; with `retry_after_s`, the status says when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def to_status(self) -> grpc.Status:
        if self.retry_after_s is None:
            return super().to_status()
        delay = Duration()
        delay.FromNanoseconds(int(max(0.0, self.retry_after_s) * 1e9))
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=self.message)
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return rpc_status.to_status(status)
