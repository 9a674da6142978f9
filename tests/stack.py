"""The system under test: real RabbitMQ and Postgres, isolated per run, and the
simulator plus the four services as real processes talking over real sockets.

The pieces live in `conveyor.sandbox` (the benchmark uses them too); this module
adds the short timers that let recovery paths finish within a test.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from conveyor import devstack, sandbox
from conveyor.sandbox import (
    LOCAL_AMQP,
    LOCAL_PG,
    Backing,
    backing_services,
    docker_engine_available,
    free_port,
)

__all__ = [
    "LOCAL_AMQP",
    "LOCAL_PG",
    "TEST_ENV",
    "WEBHOOK_SECRET",
    "Backing",
    "Stack",
    "backing_services",
    "docker_engine_available",
    "free_port",
]

WEBHOOK_SECRET = "whsec-test-0123456789"
"""The webhook signing secret of the test stack (receivers in the tests verify with it)."""

# Short timers so recovery paths finish within a test.
TEST_ENV = {
    "CONVEYOR_LEASE_S": "4",
    "CONVEYOR_WORKER_HEARTBEAT_S": "1",
    "CONVEYOR_RETRY_BASE_S": "0.2",
    "CONVEYOR_RETRY_CAP_S": "1",
    "CONVEYOR_OUTBOX_AFTER_S": "1",
    "CONVEYOR_DISPATCHER_INTERVAL_S": "0.2",
    "CONVEYOR_WORKER_SHUTDOWN_GRACE_S": "5",
    "CONVEYOR_WORKER_CONCURRENCY": "64",
    "CONVEYOR_LOG_JSON": "1",
    # Authentication on: every call needs a key (the `api_key` fixture makes one).
    "CONVEYOR_ANONYMOUS_TENANT": "",
    "CONVEYOR_AUTH_CACHE_S": "1",
    # Webhooks: receivers run on 127.0.0.1 in the tests, so loopback is allowed (and only
    # loopback: other private addresses stay refused); short timers.
    "CONVEYOR_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "CONVEYOR_WEBHOOK_ALLOW_CIDRS": '["127.0.0.0/8", "::1/128"]',
    "CONVEYOR_WEBHOOK_TIMEOUT_S": "1",
    "CONVEYOR_WEBHOOK_RETRY_BASE_S": "0.2",
    "CONVEYOR_WEBHOOK_RETRY_CAP_S": "0.5",
    "CONVEYOR_WEBHOOK_RETRY_WINDOW_S": "4",
    "CONVEYOR_WEBHOOK_POLL_S": "0.05",
    # A small inbox per watch stream, so that a slow reader overflows it quickly.
    "CONVEYOR_NOTIFIER_WATCH_BUFFER": "256",
    "CONVEYOR_NOTIFIER_IDLE_CHECK_S": "1",
}


class Stack(sandbox.Stack):
    """The simulator and the four services, started as processes of this test run."""

    def __init__(
        self, backing: Backing, run_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(backing, run_dir, {**TEST_ENV, **(env or {})})

    def start_notifier(self, name: str) -> str:
        """Start one more notifier instance (its own port, bus queue and log) next to the
        stack's own; returns its address. `stop(name)` stops it."""
        port = free_port()
        address = f"{self.settings.notifier_host}:{port}"
        service = devstack.Service(name, "services.notifier", "grpc", address, "JobEvents")
        self.services[name] = service
        env = {"CONVEYOR_NOTIFIER_PORT": str(port), "CONVEYOR_NOTIFIER_METRICS_PORT": "0"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            started = devstack.start(service, self.run, self.settings)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.procs[name] = started
        why = devstack.wait_ready(
            service, self.run, time.monotonic() + sandbox.START_TIMEOUT_S, started, started.proc.pid
        )
        if why is not None:
            tail = devstack.log_tail(self.run.log_file(service), started.log_offset)
            raise RuntimeError(f"{name} did not start: {why}\n{tail}")
        return address
