"""The local development stack: `python -m devtools.devstack {up,down,status,demo}`.

`up` applies the database migrations, then starts the simulator and the five
services (dispatcher, worker, notifier, gateway, http) as background processes, each
in its own session with `run/<name>.log` and `run/<name>.pid` (the run folder is
CONVEYOR_RUN_DIR, default ./run), and waits until each is ready: the simulator
and the HTTP API answer `GET /healthz`, the gateway and notifier answer the gRPC health check
SERVING, the worker and dispatcher are alive and have logged "ready". A service
whose pid file names a live process is not started twice. If one fails, the tail
of its log is printed, what this run started is stopped, and the exit status is 1.

`up` also makes sure the development tenant (`default`) has an API key: it
prints it and keeps it in `run/dev-api-key` (mode 0600), creating a new one when
the file is missing or its key no longer works. The services it starts let
calls without a key act as that tenant (CONVEYOR_ANONYMOUS_TENANT, unless the
environment sets it), so the README's plain grpcurl call works as written; a
wrong key is still refused. The development tenant's webhooks are signed with
its secret, kept in `run/dev-webhook-secret` (made when missing or no longer the
tenant's current one); the stored secrets are encrypted with
CONVEYOR_WEBHOOK_SECRETS_KEY, or unless it is set, with the key kept in
`run/dev-webhook-secrets-key`.

`down` stops, in reverse order, exactly the processes named by the pid files
(SIGTERM to the process group, SIGKILL after 10 s) and removes the pid files.
`status` prints a line per service. `demo` submits a job through
`ConveyorClient`, streams its tokens live and prints the outcome.

RabbitMQ and Postgres are not started here: they are expected at the
addresses of the settings (see deploy/ for a docker-compose file).

Modules: `services` (what runs, in start order), `processes` (pid and log files,
signals), `readiness` (health checks), `dev_tenant` (the development API key and
webhook secret), `commands` (up, down, status), `demo`. The tests and the sandbox
use the names exported here.
"""

from __future__ import annotations

from .processes import (
    PROJECT_ROOT,
    RunDir,
    Started,
    alive,
    child_env,
    log_tail,
    runs_module,
    signal_group,
    start,
    stop_pid,
)
from .readiness import endpoint_ready, wait_ready
from .services import Service, stack

__all__ = [
    "PROJECT_ROOT",
    "RunDir",
    "Service",
    "Started",
    "alive",
    "child_env",
    "endpoint_ready",
    "log_tail",
    "runs_module",
    "signal_group",
    "stack",
    "start",
    "stop_pid",
    "wait_ready",
]
