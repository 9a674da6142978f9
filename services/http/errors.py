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

from conveyor.core.errors import ConveyorError, error_from_rpc

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


def body_of(error: ConveyorError, http_status: int | None = None) -> dict[str, Any]:
    """The JSON error object of an error (with what its google.rpc details say)."""
    body: dict[str, Any] = {
        "code": error.code.name,
        "http_status": http_status or HTTP_STATUS.get(error.code, 500),
        "message": error.message,
    }
    if error.field_violations:
        body["details"] = [{"field": f, "description": d} for f, d in error.field_violations]
    if error.retry_after_s is not None:
        body["retry_after_s"] = error.retry_after_s
    if error.reason:
        body["reason"] = error.reason
        if error.info:
            body["metadata"] = dict(error.info)
    return {"error": body}


def error_body(
    code: grpc.StatusCode, message: str, http_status: int | None = None
) -> dict[str, Any]:
    """The JSON error object of a bare status (no details)."""
    return body_of(ConveyorError.from_status(code, message), http_status)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The error object of a failed gRPC call."""
    error = error_from_rpc(exc)
    error.message = error.message or exc.code().name
    return body_of(error)


def from_conveyor_error(exc: ConveyorError) -> dict[str, Any]:
    """The error object of an error raised here (a bad query string, say)."""
    return body_of(exc)


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
