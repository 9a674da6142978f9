"""What every service process shares: start-up, gRPC servers (authenticated, TLS when
configured), and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from aio_pika.abc import AbstractRobustConnection
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker
from conveyor.contract.validation import METADATA_KEYS, Limits
from conveyor.core.config import ConfigError, Settings, get_settings
from conveyor.core.errors import ConveyorError, InvalidArgument, Unavailable
from conveyor.core.logs import setup_logging
from conveyor.core.metrics import serve_metrics
from conveyor.core.telemetry import exporting, setup_tracing
from conveyor.db.engine import DATABASE_ERRORS, create_engine, is_data_error, migrate
from conveyor.server.auth import OPEN_METHODS, Authenticator, authenticate
from conveyor.server.processes import supervise, supervised

log = logging.getLogger(__name__)


Handler = Callable[[Any, grpc.aio.ServicerContext], Any]


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """What every call of our servers goes through: the caller is authenticated
    (`conveyor.server.auth`; health and reflection stay open), and a ConveyorError raised
    by the handler becomes its gRPC status.

    The wrapped handler of each method is made once and reused, not made per call.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method or ""
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: not cached, so random names cost nothing
            return handler
        wrapped = self._wrap(handler, not method.startswith(OPEN_METHODS))
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, authenticated: bool) -> grpc.RpcMethodHandler:
        authenticator = self.authenticator
        # A single request message is decoded here, not by grpc (which answers UNKNOWN
        # when its deserializer raises): a body that is not the message is INVALID_ARGUMENT.
        decode = handler.request_deserializer
        single = handler.unary_unary is not None or handler.unary_stream is not None
        deserializer = None if single and decode is not None else decode
        if handler.unary_unary is not None or handler.stream_unary is not None:
            call: Handler = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if authenticated:
                        await authenticate(authenticator, context)
                    if deserializer is None and decode is not None:
                        request = _decoded(decode, request)
                    return await call(request, context)
                except ConveyorError as exc:
                    await context.abort_with_status(exc.to_status())
                except DATABASE_ERRORS as exc:
                    await context.abort_with_status(_database_error(exc).to_status())

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary is not None
                else grpc.stream_unary_rpc_method_handler
            )
            return make(
                unary,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        produce: Handler = handler.unary_stream or handler.stream_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                if authenticated:
                    await authenticate(authenticator, context)
                if deserializer is None and decode is not None:
                    request = _decoded(decode, request)
                async for item in produce(request, context):
                    yield item
            except ConveyorError as exc:
                await context.abort_with_status(exc.to_status())
            except DATABASE_ERRORS as exc:
                await context.abort_with_status(_database_error(exc).to_status())

        make_stream = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream is not None
            else grpc.stream_stream_rpc_method_handler
        )
        return make_stream(
            stream,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )


def _decoded(decode: Callable[[bytes], Any], body: bytes) -> Any:
    """The request message in `body`, or InvalidArgument when it is not one."""
    try:
        return decode(body)
    except Exception:  # DecodeError, and whatever else a parser raises on garbage
        raise InvalidArgument("request", "is not a valid protobuf message of this method") from None


def _database_error(exc: BaseException) -> ConveyorError:
    """What a caller is told of a database error no servicer mapped: a value Postgres
    refuses is the request's fault; anything else a passing failure (never UNKNOWN)."""
    log.warning("database error reached the call's edge", extra={"error": repr(exc)})
    if is_data_error(exc):
        return InvalidArgument("request", "holds a value the job store cannot take")
    return Unavailable("the job store is unavailable; try again")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials of the gRPC servers, or None when TLS is not configured.

    With `tls_client_ca_file`, clients must present a certificate signed by it.
    """
    if not settings.tls:
        return None
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


UTF8_MAX_BYTES = 4
"""Bytes one character takes in UTF-8 at most (limits count characters)."""
FIELD_OVERHEAD = 16
"""Bytes of protobuf framing (tag, length) one field or entry costs, generously."""
FIXED_FIELDS_BYTES = 4096
"""The scalar fields of a request (durations, timestamps, numbers, model, lane)."""
MIN_RECEIVE_BYTES = 1024 * 1024
"""Floor of the receive size: the notifier's largest WatchJobs (1000 ids and their
sequences) and other small requests fit whatever the input limits say."""


def max_request_bytes(settings: Settings) -> int:
    """The largest request the input limits allow, in bytes: one SubmitJobRequest at
    every limit (texts at 4 bytes a character, plus framing; or a request body of
    CONVEYOR_MAX_REQUEST_BYTES), at least 1 MiB.

    It is the gRPC servers' receive size: a larger message is refused
    RESOURCE_EXHAUSTED before it is decoded, so nothing bigger is ever held. A
    SubmitJobs batch must fit in it too (send a big batch in pieces).
    """
    lim = Limits.from_settings(settings)
    text = UTF8_MAX_BYTES * lim.max_text_chars + lim.max_messages * (
        2 * FIELD_OVERHEAD + len("assistant")
    )
    labels = lim.max_labels * (2 * UTF8_MAX_BYTES * lim.max_label_chars + 3 * FIELD_OVERHEAD)
    metadata = len(METADATA_KEYS) * (
        UTF8_MAX_BYTES * (lim.max_metadata_chars + 64) + 3 * FIELD_OVERHEAD
    )
    stops = lim.max_stop_sequences * (UTF8_MAX_BYTES * lim.max_stop_sequence_chars + FIELD_OVERHEAD)
    strings = UTF8_MAX_BYTES * (lim.max_url_chars + lim.max_key_chars) + 2 * FIELD_OVERHEAD
    # The call is the short form or the whole body (request_json), never both.
    call = max(text + metadata + stops, settings.max_request_bytes + FIELD_OVERHEAD)
    total = call + labels + strings + FIXED_FIELDS_BYTES
    return max(MIN_RECEIVE_BYTES, total)


def is_loopback(host: str) -> bool:
    """Whether a listener bound to `host` is reachable from this machine only.

    An empty host or a wildcard (0.0.0.0, ::) is every interface; a name counts
    as loopback only if every address it resolves to is one.
    """
    host = host.strip().removeprefix("[").removesuffix("]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses
    )


def check_anonymous(settings: Settings, host: str, listener: str, *, warn: bool = True) -> None:
    """Refuse (ConfigError) an anonymous tenant on a listener other machines reach,
    unless allow_anonymous_on_network says so; log a warning whenever it is on."""
    if settings.anonymous_tenant is None:
        return
    if not is_loopback(host) and not settings.allow_anonymous_on_network:
        raise ConfigError(
            f"CONVEYOR_ANONYMOUS_TENANT is set and the {listener} listens on {host!r},"
            " which is not a loopback address: anyone who reaches it would act as tenant"
            f" {settings.anonymous_tenant!r} without a key. Unset it and use API keys"
            " (`conveyor keys create`), bind the listener to 127.0.0.1, or set"
            " CONVEYOR_ALLOW_ANONYMOUS_ON_NETWORK=true if something in front authenticates."
        )
    if not warn:
        return
    log.warning(
        "calls without an API key act as the anonymous tenant",
        extra={
            "tenant": settings.anonymous_tenant,
            "listener": listener,
            "host": host,
            "on_network": not is_loopback(host),
        },
    )


def grpc_server(
    service_names: Iterable[str],
    register: Callable[[grpc.aio.Server], None],
    address: str,
    *,
    settings: Settings | None = None,
    engine: AsyncEngine | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A gRPC server with our services, health checking and reflection, bound to `address`.

    Every call but health and reflection is authenticated (see conveyor.server.auth): the
    API keys are looked up through `engine`, or through a small pool of the
    server's own. The port serves TLS when the settings name a certificate.
    With an anonymous tenant, a non-loopback `address` is refused (ConfigError;
    see `check_anonymous`). The server takes at most grpc_max_concurrent_rpcs
    calls at once and messages of at most `max_request_bytes`.
    Returns the server, its health servicer and the bound port (useful with port 0).
    """
    settings = settings or get_settings()
    names = list(service_names)
    check_anonymous(settings, address.rpartition(":")[0], f"gRPC server of {', '.join(names)}")
    if engine is None:
        engine = create_engine(settings.database_url.get_secret_value(), pool_size=2)
    authenticator = Authenticator(
        engine, settings.anonymous_tenant, settings.auth_cache_s, settings.auth_cache_size
    )
    interceptors: list[grpc.aio.ServerInterceptor] = [CallInterceptor(authenticator)]
    if exporting():
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptors.insert(0, aio_server_interceptor())  # type: ignore[no-untyped-call]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 1 if settings.grpc_reuse_port else 0),
            ("grpc.max_receive_message_length", max_request_bytes(settings)),
        ],
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    credentials = server_credentials(settings)
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, health_servicer, port


async def mark_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str]) -> None:
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


@contextlib.asynccontextmanager
async def serving(
    service_names: Sequence[str],
    register: Callable[[grpc.aio.Server], None],
    address: str,
    *,
    settings: Settings,
    engine: AsyncEngine,
    grace_s: float,
) -> AsyncIterator[int]:
    """A started `grpc_server`, reported SERVING by its health service; yields the bound
    port. On exit the health service reports NOT_SERVING first (load balancers stop
    sending calls), then the server stops, giving calls in flight `grace_s` to end."""
    server, health_servicer, port = grpc_server(
        service_names, register, address, settings=settings, engine=engine
    )
    await server.start()
    await mark_serving(health_servicer, service_names)
    try:
        yield port
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=grace_s)


@contextlib.asynccontextmanager
async def backing_services(
    settings: Settings, service: str
) -> AsyncIterator[tuple[AsyncEngine, AbstractRobustConnection]]:
    """The database engine and broker connection of a service, closed on exit.

    Applies the migrations first when CONVEYOR_MIGRATE_ON_START is set.
    """
    db_url = settings.database_url.get_secret_value()
    if settings.migrate_on_start:
        await migrate(db_url)
    engine = create_engine(db_url, settings.db_pool_size)
    try:
        connection = await broker.connect(
            settings.amqp_url.get_secret_value(), f"conveyor-{service}"
        )
        try:
            yield engine, connection
        finally:
            await connection.close()
    finally:
        await engine.dispose()


def install_stop_signals(stop: asyncio.Event) -> None:
    """Set `stop` on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def freeze_startup_heap() -> None:
    """Keep what start-up made out of the garbage collector's sight.

    Modules, metadata, descriptors, the request-body validator, the server and its
    connections live as long as the process; a full collection that walks them
    stalls every call in flight (bench/README.md). Called before the event loop
    starts (the imports) and by each service once it is ready (what `serve` built:
    the validator alone pulls in thousands of the SDK's modules)."""
    gc.collect()
    gc.freeze()


def run_service(
    name: str,
    serve: Callable[[Settings, asyncio.Event], Awaitable[None]],
    processes: int = 1,
) -> None:
    """Entry point of a service process: logging, uvloop, signals, then `serve` until stopped.

    With `processes` > 1 this process supervises that many processes of the service
    instead (conveyor.server.processes), all on the same port.
    """
    settings = get_settings()
    setup_logging(name, settings.log_level, settings.log_json)
    grpc_host: str | None = getattr(settings, f"{name}_host", None)
    try:
        # Before anything starts (and before a supervisor would restart children that fail).
        if grpc_host is not None:
            check_anonymous(settings, grpc_host, f"{name}'s gRPC listener", warn=False)
    except ConfigError as exc:
        log.error("refusing to start: %s", exc)
        sys.exit(2)
    if processes > 1 and not supervised():
        sys.exit(
            supervise(
                f"services.{name}",
                processes,
                settings.metrics_host,
                settings.metrics_port(name),
                f"CONVEYOR_{name.upper()}_METRICS_PORT",
            )
        )
    provider = setup_tracing(name)
    serve_metrics(settings.metrics_host, settings.metrics_port(name))

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        try:
            await serve(settings, stop)
        finally:
            provider.shutdown()  # flush the spans still buffered

    freeze_startup_heap()  # the imports; the service calls it again once ready
    try:
        try:
            import uvloop

            uvloop.run(main())
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            asyncio.run(main())
    except ConfigError as exc:  # settings it cannot run with: say why, exit 2
        log.error("refusing to start: %s", exc)
        sys.exit(2)
    log.info("stopped")
