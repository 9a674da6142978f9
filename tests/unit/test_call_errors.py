"""The edge of every call (conveyor.server.runtime.CallInterceptor) answers a body that is not
the method's message INVALID_ARGUMENT, and a database error no servicer mapped
INVALID_ARGUMENT (a value Postgres refuses) or UNAVAILABLE, never UNKNOWN."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy.exc import DBAPIError

from conveyor.server.runtime import CallInterceptor
from conveyor.v1 import jobs_pb2


class Aborted(Exception):
    pass


class Context:
    """What the wrapped handler uses of a ServicerContext: abort_with_status."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise Aborted


def _fields(status: grpc.Status) -> list[str]:
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            out: list[str] = []
            for detail in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    out += [v.field for v in bad.field_violations]
            return out
    return []


def _wrapped(behaviour: Any, streaming: bool = False) -> grpc.RpcMethodHandler:
    make = (
        grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
    )
    handler = make(
        behaviour,
        request_deserializer=jobs_pb2.GetJobRequest.FromString,
        response_serializer=jobs_pb2.GetJobResponse.SerializeToString,
    )
    return CallInterceptor(cast(Any, None))._wrap(handler, authenticated=False)


async def _call(handler: grpc.RpcMethodHandler, body: bytes) -> Context:
    context = Context()
    with pytest.raises(Aborted):
        if handler.unary_unary is not None:
            await handler.unary_unary(body, context)
        else:
            async for _ in handler.unary_stream(body, context):
                pass
    return context


async def _ok(request: jobs_pb2.GetJobRequest, context: Any) -> jobs_pb2.GetJobResponse:
    return jobs_pb2.GetJobResponse(job=jobs_pb2.Job(id=request.id))


async def test_the_edge_decodes_a_good_body_itself() -> None:
    handler = _wrapped(_ok)
    assert handler.request_deserializer is None, "grpc would answer UNKNOWN for a bad body"
    body = jobs_pb2.GetJobRequest(id="abc").SerializeToString()
    response = await handler.unary_unary(body, Context())
    assert response.job.id == "abc"


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x0a\x05ab"])
async def test_a_body_that_is_not_the_message_is_invalid_argument(
    body: bytes, streaming: bool
) -> None:
    async def never(request: Any, context: Any) -> AsyncIterator[Any]:
        raise AssertionError("the handler must not run")
        yield  # pragma: no cover

    context = await _call(_wrapped(never if streaming else _ok, streaming), body)
    assert context.status is not None
    assert context.status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert _fields(context.status) == ["request"]


def _wrapped_by_sqlalchemy(exc: Exception) -> DBAPIError:
    try:
        raise DBAPIError("SELECT 1", {}, exc)
    except DBAPIError as wrapped:
        return wrapped


DATABASE_ERRORS: list[tuple[str, Exception, grpc.StatusCode]] = [
    (
        "a NUL Postgres refuses",
        asyncpg.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00'),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "the same through SQLAlchemy",
        _wrapped_by_sqlalchemy(asyncpg.UntranslatableCharacterError("unsupported escape")),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "a number out of range",
        asyncpg.NumericValueOutOfRangeError("smallint out of range"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("a refused connection", ConnectionRefusedError(111, "refused"), grpc.StatusCode.UNAVAILABLE),
    (
        "a lost connection",
        asyncpg.ConnectionDoesNotExistError("connection was closed"),
        grpc.StatusCode.UNAVAILABLE,
    ),
]


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("error", "code"),
    [(e, c) for _, e, c in DATABASE_ERRORS],
    ids=[name for name, _, _ in DATABASE_ERRORS],
)
async def test_a_database_error_no_servicer_mapped_is_never_unknown(
    error: Exception, code: grpc.StatusCode, streaming: bool
) -> None:
    async def failing(request: Any, context: Any) -> Any:
        raise error

    async def failing_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        raise error
        yield  # pragma: no cover

    handler = _wrapped(failing_stream if streaming else failing, streaming)
    context = await _call(handler, jobs_pb2.GetJobRequest(id="x").SerializeToString())
    assert context.status is not None and context.status.code == code
