"""The client's connection: targets, channels (plain or TLS), stubs, call metadata, and
the one place a unary call's failure becomes a ConveyorError.

Two `grpc.aio` channels are opened lazily, one to the gateway and one to the notifier.
With an API key every call carries `authorization: Bearer <key>`; when OpenTelemetry is
installed and a span is active, its `traceparent` travels along too.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeAlias, TypeVar, cast

import grpc
import grpc.aio

from conveyor import __version__
from conveyor.core.errors import error_from_rpc
from conveyor.v1 import (
    events_pb2_grpc,
    jobs_pb2_grpc,
    operations_pb2_grpc,
    schedules_pb2_grpc,
)

if TYPE_CHECKING:
    from conveyor.v1.events_pb2_grpc import JobEventsAsyncStub
    from conveyor.v1.jobs_pb2_grpc import JobServiceAsyncStub
    from conveyor.v1.operations_pb2_grpc import OperationsServiceAsyncStub
    from conveyor.v1.schedules_pb2_grpc import ScheduleServiceAsyncStub

Metadata: TypeAlias = tuple[tuple[str, str], ...]
Response = TypeVar("Response")

API_KEY_ENV = "CONVEYOR_API_KEY"
"""Environment variable holding the API key sent as `authorization: Bearer <key>`."""
ROOT_CERTS_ENV = "CONVEYOR_TLS_ROOT_CERTS"
"""PEM file of the certificates that sign the servers' (with `secure=True`)."""
CLIENT_CERT_ENV = "CONVEYOR_TLS_CLIENT_CERT_FILE"
CLIENT_KEY_ENV = "CONVEYOR_TLS_CLIENT_KEY_FILE"


def _env_target(service: str, default_port: int) -> str:
    """host:port from CONVEYOR_<SERVICE>_HOST and _PORT, the variables the settings read
    (read here directly: the client installs without the server's pydantic settings)."""
    host = os.environ.get(f"CONVEYOR_{service}_HOST") or "127.0.0.1"
    port = os.environ.get(f"CONVEYOR_{service}_PORT") or str(default_port)
    return f"{host}:{port}"


def _trace_metadata() -> list[tuple[str, str]]:
    """W3C trace context of the current span as gRPC metadata (empty without OpenTelemetry)."""
    try:
        from opentelemetry.propagate import inject
    except ImportError:  # the base install has no OpenTelemetry
        return []
    carrier: dict[str, str] = {}
    inject(carrier)
    return [(k.lower(), v) for k, v in carrier.items()]


class Connection:
    """Channels to the gateway and the notifier, their stubs, and `_call`.

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
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[Any, Any] = {}

    def __repr__(self) -> str:  # never shows the key
        auth = "api_key=***" if self._api_key else "no api key"
        return f"ConveyorClient(gateway={self.gateway!r}, notifier={self.notifier!r}, {auth})"

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
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels:
            await channel.close()

    def _channel(self, service: str) -> grpc.aio.Channel:
        """The channel to "gateway" or "notifier" (opened on first use)."""
        channel = self._channels.get(service)
        if channel is not None:
            return channel
        target = self.gateway if service == "gateway" else self.notifier
        options: list[tuple[str, str | int]] = [
            ("grpc.primary_user_agent", f"conveyor-client/{__version__}"),
            # A job's request body and answer can be many MiB (gRPC's default is 4 MiB).
            ("grpc.max_receive_message_length", -1),
        ]
        if self.secure:
            channel = grpc.aio.secure_channel(target, self._credentials(), options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        self._channels[service] = channel
        return channel

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

    def _stub(self, stub_class: Callable[[grpc.aio.Channel], Any], service: str) -> Any:
        """The stub of `stub_class` on the channel to `service`, made once per channel."""
        stub = self._stubs.get(stub_class)
        if stub is None:
            stub = self._stubs[stub_class] = stub_class(self._channel(service))
        return stub

    # The stubs' overloads need a typed channel to pick the async variant: hence the casts.

    @property
    def _jobs(self) -> JobServiceAsyncStub:
        return cast("JobServiceAsyncStub", self._stub(jobs_pb2_grpc.JobServiceStub, "gateway"))

    @property
    def _schedules(self) -> ScheduleServiceAsyncStub:
        stub = self._stub(schedules_pb2_grpc.ScheduleServiceStub, "gateway")
        return cast("ScheduleServiceAsyncStub", stub)

    @property
    def _operations(self) -> OperationsServiceAsyncStub:
        stub = self._stub(operations_pb2_grpc.OperationsServiceStub, "gateway")
        return cast("OperationsServiceAsyncStub", stub)

    @property
    def _events(self) -> JobEventsAsyncStub:
        return cast("JobEventsAsyncStub", self._stub(events_pb2_grpc.JobEventsStub, "notifier"))

    def _metadata(self) -> Metadata:
        pairs = _trace_metadata()
        if self._api_key:
            pairs.append(("authorization", f"Bearer {self._api_key}"))
        return tuple(pairs)

    async def _call(self, method: Callable[..., Awaitable[Response]], request: Any) -> Response:
        """Call a unary method with this client's metadata and timeout; a failed call
        raises its ConveyorError (the class of its status code)."""
        try:
            return await method(request, metadata=self._metadata(), timeout=self.rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
