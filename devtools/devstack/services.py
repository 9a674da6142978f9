"""The processes of the local stack, in start order, and how to tell each is ready."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from conveyor.core.config import Settings

Check = Literal["http", "grpc", "log"]


@dataclass(frozen=True)
class Service:
    """One process of the stack and how to tell that it is ready."""

    name: str
    module: str
    check: Check
    address: str = ""
    """host:port it listens on, for the http and grpc checks."""
    role: str = ""
    tls_cert: Path | None = None
    """For a gRPC service serving TLS: its certificate (the check trusts it, or
    CONVEYOR_TLS_ROOT_CERTS)."""


def stack(settings: Settings) -> list[Service]:
    """The services in start order (`down` stops them in reverse)."""
    return [
        Service(
            "simulator",
            "devtools.simulator",
            "http",
            f"{settings.simulator_host}:{settings.simulator_port}",
            "Messages API simulator",
        ),
        Service("dispatcher", "services.dispatcher", "log", role="timers, DLQ, outbox, sweeper"),
        Service("worker", "services.worker", "log", role="runs the LLM calls"),
        Service(
            "notifier",
            "services.notifier",
            "grpc",
            settings.notifier_target,
            "JobEvents (gRPC)",
            settings.tls_cert_file if settings.tls else None,
        ),
        Service(
            "gateway",
            "services.gateway",
            "grpc",
            settings.gateway_target,
            "JobService (gRPC)",
            settings.tls_cert_file if settings.tls else None,
        ),
        # After the gateway and notifier it calls; ready when GET /healthz answers.
        Service("http", "services.http", "http", settings.http_target, "HTTP/JSON API, SSE"),
    ]
