"""Errors of the HTTP API: one JSON shape, gRPC codes mapped to HTTP statuses.

    {"error": {"code": "INVALID_ARGUMENT", "http_status": 400,
               "message": "max_tokens: must be 1..128000",
               "details": [{"field": "max_tokens", "description": "must be 1..128000"}],
               "retry_after_s": 1.5,            # RESOURCE_EXHAUSTED with a known wait
               "reason": "WATCH_FELL_BEHIND",   # google.rpc.ErrorInfo, when there is one
               "metadata": {"after_sequence": "41"}}}

`code` is the gRPC status code's name and `http_status` the standard google.rpc
mapping of it (google/rpc/code.proto); `details` are the google.rpc.BadRequest
field violations, the same as a gRPC caller reads. The optional members are left
out when the status has nothing to say there.
"""

from __future__ import annotations

from typing import Any

import grpc
import orjson
from aiohttp import web
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from conveyor.core.errors import ConveyorError, InvalidArgument, ResourceExhausted

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
"""google.rpc.Code to HTTP status, as google/rpc/code.proto gives it."""
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_body(
    code: grpc.StatusCode,
    message: str,
    status: status_pb2.Status | None = None,
    http_status: int | None = None,
) -> dict[str, Any]:
    """The JSON error object of a status (with its google.rpc details, if any)."""
    error: dict[str, Any] = {
        "code": code.name,
        "http_status": http_status or HTTP_STATUS.get(code, 500),
        "message": message,
    }
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(bad):
            error.setdefault("details", []).extend(
                {"field": v.field, "description": v.description} for v in bad.field_violations
            )
        elif detail.Unpack(retry):
            delay = retry.retry_delay
            error["retry_after_s"] = delay.seconds + delay.nanos / 1e9
        elif detail.Unpack(info):
            error["reason"] = info.reason
            if info.metadata:
                error["metadata"] = dict(info.metadata)
    return {"error": error}


def from_rpc_error(exc: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The error object of a failed gRPC call."""
    status: status_pb2.Status | None
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # details that disagree with the code: keep the code
        status = None
    return error_body(exc.code(), exc.details() or exc.code().name, status)


def from_conveyor_error(exc: ConveyorError) -> dict[str, Any]:
    """The error object of an error raised here (a bad query string, say)."""
    status = status_pb2.Status(code=exc.code.value[0], message=exc.message)
    if isinstance(exc, InvalidArgument):
        status.details.add().Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=exc.field, description=exc.description
                    )
                ]
            )
        )
    body = error_body(exc.code, exc.message, status)
    if isinstance(exc, ResourceExhausted) and exc.retry_after_s is not None:
        body["error"]["retry_after_s"] = exc.retry_after_s
    return body


def code_of(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def response(body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    """The HTTP answer carrying an error object."""
    error = body["error"]
    extra = dict(headers or {})
    retry = error.get("retry_after_s")
    if retry is not None:
        extra["Retry-After"] = str(max(1, round(retry)))
    return web.Response(
        body=orjson.dumps(body),
        status=int(error["http_status"]),
        content_type="application/json",
        headers=extra,
    )
