"""Several processes of one gRPC service on one port: a supervisor and its children.

A Python process runs on one core, and a gateway busy with gRPC, Postgres and
RabbitMQ at once is CPU-bound in it. With `processes` > 1 the service's command
becomes a supervisor: it starts that many copies of the service (the same
module, with `CONVEYOR_GRPC_REUSE_PORT=1`), which all listen on the configured
port with SO_REUSEPORT, so the kernel spreads new connections over them. The
supervisor serves nothing itself but the metrics: the children record theirs
in a shared directory (prometheus_client's multiprocess mode) and the
supervisor's /metrics endpoint adds them up.

SIGTERM or SIGINT to the supervisor is passed on to every child, which shuts
down gracefully; the supervisor exits once they have. A child that dies
unexpectedly is started again after a pause.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

CHILD_ENV = "CONVEYOR_SUPERVISED"
"""Set in the children's environment: a child runs the service, never a supervisor."""
PR_SET_PDEATHSIG = 1
RESTART_PAUSE_S = 1.0
STOP_TIMEOUT_S = 30.0


def _die_with_parent() -> None:
    """In a child before it runs: SIGTERM it when the supervisor dies, however it dies
    (Linux's PR_SET_PDEATHSIG), so no process of the service outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def supervised() -> bool:
    """Whether this process is a child of a supervisor."""
    return os.environ.get(CHILD_ENV) == "1"


def supervise(
    module: str, processes: int, metrics_host: str, metrics_port: int, metrics_env: str
) -> int:
    """Run `processes` children of `python -m module` until SIGTERM/SIGINT; the exit code.

    `metrics_env` names the variable that sets the children's own metrics port
    (turned off: the supervisor serves their sum on `metrics_port`).
    """
    shared = Path(tempfile.mkdtemp(prefix="conveyor-metrics-"))
    env = {
        **os.environ,
        CHILD_ENV: "1",
        "CONVEYOR_GRPC_REUSE_PORT": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(shared),
        metrics_env: "0",
    }
    if metrics_port > 0:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(shared))  # type: ignore[no-untyped-call]
        try:
            start_http_server(metrics_port, addr=metrics_host, registry=registry)
        except OSError as exc:
            log.warning(
                "metrics endpoint not started", extra={"port": metrics_port, "error": repr(exc)}
            )

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", module], env=env, preexec_fn=_die_with_parent
        )

    children: list[subprocess.Popen[bytes]] = []
    try:
        children += [start() for _ in range(processes)]
        log.info("supervising", extra={"command": module, "pids": [c.pid for c in children]})
        while not stopping:
            time.sleep(0.2)
            for i, child in enumerate(children):
                code = child.poll()
                if code is None or stopping:
                    continue
                log.error(
                    "a process exited; starting another",
                    extra={"pid": child.pid, "exit_code": code},
                )
                time.sleep(RESTART_PAUSE_S)
                children[i] = start()
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(shared, ignore_errors=True)
    log.info("stopped")
    return 0
