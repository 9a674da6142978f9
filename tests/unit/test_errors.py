"""One error hierarchy: what a server raises comes back to the client as the same class,
with the same field, wait and reason; the HTTP API shows the same in its JSON."""

from __future__ import annotations

from datetime import timedelta

import grpc
import grpc.aio
import pytest
from google.rpc import status_pb2

from conveyor import client
from conveyor.core import errors
from conveyor.core.errors import (
    ConveyorError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    error_from_rpc,
)
from services.http.errors import body_of, from_rpc_error


def _failed_call(error: ConveyorError) -> grpc.aio.AioRpcError:
    """The AioRpcError a client sees when a server aborts with `error`'s status."""
    status = error.to_status()
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
    )


def test_the_client_raises_the_classes_the_servers_raise() -> None:
    for name in ("ConveyorError", "InvalidArgument", "NotFound", "ResourceExhausted"):
        assert getattr(client, name) is getattr(errors, name)


def test_invalid_argument_round_trips_with_its_field() -> None:
    back = error_from_rpc(_failed_call(InvalidArgument("messages[0].role", "must be user")))
    assert isinstance(back, InvalidArgument)
    assert back.code == grpc.StatusCode.INVALID_ARGUMENT
    assert back.details == "messages[0].role: must be user"
    assert back.field_violations == [("messages[0].role", "must be user")]
    assert (back.field, back.description) == ("messages[0].role", "must be user")
    assert str(back) == "INVALID_ARGUMENT: messages[0].role: must be user"


def test_resource_exhausted_round_trips_with_its_wait() -> None:
    back = error_from_rpc(_failed_call(ResourceExhausted("quota", retry_after_s=2.5)))
    assert isinstance(back, ResourceExhausted)
    assert back.retry_after_s == 2.5 and back.retry_after == timedelta(seconds=2.5)
    plain = error_from_rpc(_failed_call(ResourceExhausted("quota")))
    assert plain.retry_after is None


def test_error_info_round_trips_with_its_reason_and_metadata() -> None:
    error = ResourceExhausted("fell behind")
    error.reason, error.info = "WATCH_FELL_BEHIND", {"after_sequence": "41"}
    back = error_from_rpc(_failed_call(error))
    assert (back.reason, back.info) == ("WATCH_FELL_BEHIND", {"after_sequence": "41"})


def test_a_code_without_its_own_class_keeps_its_code() -> None:
    back = ConveyorError.from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "too slow")
    assert type(back) is ConveyorError
    assert back.code == grpc.StatusCode.DEADLINE_EXCEEDED and back.details == "too slow"
    assert type(ConveyorError.from_status(grpc.StatusCode.NOT_FOUND, "x")) is NotFound


def test_details_that_disagree_with_the_code_are_ignored() -> None:
    status = InvalidArgument("id", "bad").to_status()
    call = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details="gone",
    )
    back = error_from_rpc(call)
    assert isinstance(back, NotFound) and back.field_violations == []


def test_malformed_details_do_not_hide_the_error() -> None:
    call = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.aio.Metadata(),
        grpc.aio.Metadata((errors.STATUS_DETAILS_KEY, b"\xff\xff")),
        details="id: bad",
    )
    back = error_from_rpc(call)
    assert isinstance(back, InvalidArgument) and back.field == ""


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            InvalidArgument("max_tokens", "must be 1..128000"),
            {
                "code": "INVALID_ARGUMENT",
                "http_status": 400,
                "message": "max_tokens: must be 1..128000",
                "details": [{"field": "max_tokens", "description": "must be 1..128000"}],
            },
        ),
        (
            ResourceExhausted("quota", retry_after_s=1.5),
            {"code": "RESOURCE_EXHAUSTED", "http_status": 429, "message": "quota",
             "retry_after_s": 1.5},
        ),
        (NotFound("no job"), {"code": "NOT_FOUND", "http_status": 404, "message": "no job"}),
    ],
)  # fmt: skip
def test_http_shows_the_same_error_raised_here_or_over_grpc(
    error: ConveyorError, expected: dict[str, object]
) -> None:
    assert body_of(error) == {"error": expected}
    assert from_rpc_error(_failed_call(error)) == {"error": expected}


def test_http_error_info_becomes_reason_and_metadata() -> None:
    error = ResourceExhausted("fell behind")
    error.reason, error.info = "WATCH_FELL_BEHIND", {"after_sequence": "41"}
    body = from_rpc_error(_failed_call(error))["error"]
    assert (body["reason"], body["metadata"]) == ("WATCH_FELL_BEHIND", {"after_sequence": "41"})


def test_a_status_without_details_parses() -> None:
    empty = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="down")
    back = ConveyorError.from_status(grpc.StatusCode.UNAVAILABLE, "down", empty)
    assert isinstance(back, errors.Unavailable) and back.reason == "" and back.info == {}
