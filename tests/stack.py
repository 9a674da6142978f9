"""The system under test: real RabbitMQ and Postgres, isolated per run, and the
simulator plus the four services and the HTTP API as real processes talking over
real sockets.

The pieces live in `devtools.sandbox` (the benchmark uses them too); this module
adds the short timers that let recovery paths finish within a test.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from devtools import devstack, sandbox
from devtools.sandbox import (
    LOCAL_AMQP,
    LOCAL_PG,
    Backing,
    backing_services,
    docker_engine_available,
    free_port,
    free_ports,
)

__all__ = [
    "LOCAL_AMQP",
    "LOCAL_PG",
    "TEST_ENV",
    "WEBHOOK_SECRETS_KEY",
    "Backing",
    "Stack",
    "backing_services",
    "docker_engine_available",
    "free_port",
    "free_ports",
]

WEBHOOK_SECRETS_KEY = "test-webhook-secrets-key-0123456789abcdef"
"""Encrypts the tenants' webhook secrets in the test stack; tests make a tenant's secret
with `conveyor.db.admin.rotate_webhook_secret` under the same key."""

# Short timers so recovery paths finish within a test.
TEST_ENV = {
    "CONVEYOR_LEASE_S": "4",
    "CONVEYOR_WORKER_HEARTBEAT_S": "1",
    "CONVEYOR_RETRY_BASE_S": "0.2",
    "CONVEYOR_RETRY_CAP_S": "1",
    "CONVEYOR_OUTBOX_AFTER_S": "1",
    "CONVEYOR_PENDING_REPUBLISH_S": "5",
    "CONVEYOR_DISPATCHER_INTERVAL_S": "0.2",
    "CONVEYOR_RETENTION_INTERVAL_S": "0.5",  # the retention tests wait for a purge
    "CONVEYOR_WORKER_SHUTDOWN_GRACE_S": "5",
    "CONVEYOR_WORKER_CONCURRENCY": "64",
    "CONVEYOR_LOG_JSON": "1",
    # Authentication on: every call needs a key (the `api_key` fixture makes one).
    "CONVEYOR_ANONYMOUS_TENANT": "",
    "CONVEYOR_AUTH_CACHE_S": "1",
    # The rate-limit tests make up model names; they get state of their own, not `other`'s.
    "CONVEYOR_KNOWN_MODELS": '["claude-limited-*"]',
    # Webhooks: receivers run on 127.0.0.1 in the tests, so loopback is allowed (and only
    # loopback: other private addresses stay refused); short timers.
    "CONVEYOR_WEBHOOK_SECRETS_KEY": WEBHOOK_SECRETS_KEY,
    "CONVEYOR_WEBHOOK_SECRETS_CACHE_S": "0",  # a rotation signs the next attempt
    "CONVEYOR_WEBHOOK_ALLOW_CIDRS": '["127.0.0.0/8", "::1/128"]',
    "CONVEYOR_WEBHOOK_TIMEOUT_S": "1",
    "CONVEYOR_WEBHOOK_RETRY_BASE_S": "0.2",
    "CONVEYOR_WEBHOOK_RETRY_CAP_S": "0.5",
    "CONVEYOR_WEBHOOK_RETRY_WINDOW_S": "4",
    "CONVEYOR_WEBHOOK_POLL_S": "0.05",
    # Small caps, so that the webhook tests reach them with a few silent receivers.
    "CONVEYOR_WEBHOOK_PER_HOST": "3",
    "CONVEYOR_WEBHOOK_PER_TENANT": "4",
    # A small inbox per watch stream, so that a slow reader overflows it quickly.
    "CONVEYOR_NOTIFIER_WATCH_BUFFER": "256",
    "CONVEYOR_NOTIFIER_IDLE_CHECK_S": "1",
}


class Stack(sandbox.Stack):
    """The simulator, the four services and the HTTP API, started as processes of this
    test run."""

    def __init__(
        self, backing: Backing, run_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(backing, run_dir, {**TEST_ENV, **(env or {})})

    def start_notifier(self, name: str) -> str:
        """Start one more notifier instance (its own port, bus queue and log) next to the
        stack's own; returns its address. `stop(name)` stops it."""
        port = free_port()
        address = f"{self.settings.notifier_host}:{port}"
        self.start_extra(
            devstack.Service(name, "services.notifier", "grpc", address, "JobEvents"),
            CONVEYOR_NOTIFIER_PORT=str(port),
            CONVEYOR_NOTIFIER_METRICS_PORT="0",
        )
        return address

    def start_extra(self, service: devstack.Service, **env: str) -> None:
        """Start one more instance of a service next to the stack's own and wait until it
        is ready; `env` overrides its settings, `stop(service.name)` stops it."""
        self.services[service.name] = service
        self.start(service.name, **env)
