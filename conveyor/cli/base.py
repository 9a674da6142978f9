"""What every `conveyor` command shares: exit codes, the connection flags, argument
types, running a command's coroutine, and mapping errors to exit codes."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click
import grpc

from conveyor.client import ConveyorClient, ConveyorError, job_status_value
from conveyor.v1 import jobs_pb2

EXIT_OK = 0
EXIT_FAILED = 1
"""A watched job failed or is dead; an operator command's operation failed."""
EXIT_CANCELLED = 2
"""A watched job was cancelled."""
EXIT_USAGE = 2
"""A usage error or invalid input: a bad flag, or INVALID_ARGUMENT / OUT_OF_RANGE."""
EXIT_SERVER_ERROR = 3
"""The server failed or could not be reached: worth retrying later."""
EXIT_REFUSED = 4
"""The server refused: NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION, ..."""
EXIT_INTERRUPTED = 130

INVALID_INPUT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.CANCELLED,
    }
)


def exit_code_of_error(error: ConveyorError) -> int:
    """2 for invalid input, 3 for a server fault, 4 for any other refusal."""
    if error.code in INVALID_INPUT:
        return EXIT_USAGE
    if error.code in SERVER_FAULTS:
        return EXIT_SERVER_ERROR
    return EXIT_REFUSED


# --------------------------------------------------------------------------- connection

_CONNECTION_KEY = "conveyor.connection"


@dataclass
class Connection:
    """Where the commands connect: --gateway, --notifier, --tls (before or after the
    command; after wins)."""

    gateway: str | None = None
    notifier: str | None = None
    tls: bool = False

    def client(self) -> ConveyorClient:
        return ConveyorClient(self.gateway, self.notifier, secure=self.tls)


def connection(ctx: click.Context | None = None) -> Connection:
    """The connection of the running command."""
    ctx = ctx or click.get_current_context()
    meta = ctx.find_root().meta
    conn: Connection = meta.setdefault(_CONNECTION_KEY, Connection())
    return conn


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and param.name is not None:
        setattr(connection(ctx), param.name, value)
    return value


F = TypeVar("F", bound=Callable[..., Any])


def connection_options(f: F) -> F:
    """--gateway, --notifier and --tls, accepted by the group and by each command."""
    options = [
        click.option(
            "--gateway",
            metavar="HOST:PORT",
            default=None,
            expose_value=False,
            callback=_remember,
            help="gateway address (default CONVEYOR_GATEWAY_HOST:PORT, 127.0.0.1:50051)",
        ),
        click.option(
            "--notifier",
            metavar="HOST:PORT",
            default=None,
            expose_value=False,
            callback=_remember,
            help="notifier address (default CONVEYOR_NOTIFIER_HOST:PORT, 127.0.0.1:50052)",
        ),
        click.option(
            "--tls",
            is_flag=True,
            flag_value=True,
            default=None,
            expose_value=False,
            callback=_remember,
            help="use TLS for both connections",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# --------------------------------------------------------------------------- running


def run(coro_fn: Callable[..., Coroutine[Any, Any, int]]) -> Callable[..., int]:
    """A click callback that runs the async command body on a fresh event loop."""

    @functools.wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        return asyncio.run(coro_fn(*args, **kwargs))

    return wrapper


def fail(message: str, code: int = EXIT_USAGE) -> int:
    """Print `error: message` on stderr; return `code`."""
    print(f"error: {message}", file=sys.stderr)
    return code


def jaeger_url() -> str | None:
    """CONVEYOR_JAEGER_URL (read directly: the client install has no settings module)."""
    return os.environ.get("CONVEYOR_JAEGER_URL") or None


# --------------------------------------------------------------------------- argument types


def parse_key_value(text: str) -> tuple[str, str]:
    """`k=v` -> ("k", "v"); the value may contain "=" and may be empty, the key may not."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_statuses(text: str) -> list[jobs_pb2.JobStatus.ValueType]:
    """The JobStatus values of "running" or "failed,dead"."""
    return [job_status_value(part) for part in text.split(",") if part.strip()]


if TYPE_CHECKING:
    _ParamType = click.ParamType[Any, Any]  # generic in Click 8.5's stubs
else:
    _ParamType = click.ParamType


class _Converting(_ParamType):
    """A click type made of a parse function that raises ValueError."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default, already converted
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if value < 0:
        raise ValueError(f"must not be negative: {text}")
    return value


KEY_VALUE = _Converting("KEY=VALUE", parse_key_value)
STATUSES = _Converting("STATUS[,STATUS]", parse_statuses)
SECONDS = _Converting("SECONDS", _non_negative)
