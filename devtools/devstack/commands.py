"""`up`, `down` and `status`."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence

from conveyor.core.config import DEFAULT_TENANT, Settings

from .dev_tenant import DEV_KEY_FILE, ensure_dev_key, ensure_dev_webhook_secret
from .processes import RunDir, Started, alive, log_tail, runs_module, start, stop_pid
from .readiness import endpoint_ready, wait_ready
from .services import Service, stack

JAEGER_UI = "http://127.0.0.1:16686"
RABBITMQ_UI = "http://127.0.0.1:15672"


def migrate(settings: Settings) -> str | None:
    """Apply the migrations; None on success, else the error (without the URL)."""
    from conveyor.db.engine import migrate as run_migrations

    try:
        asyncio.run(run_migrations(settings.database_url.get_secret_value()))
    except Exception as exc:  # reported to the developer; the URL may hold a password
        return f"{type(exc).__name__}: {exc}"
    return None


def cmd_up(settings: Settings, timeout: float) -> int:
    run = RunDir(settings.run_dir)
    run.path.mkdir(parents=True, exist_ok=True)

    print("applying database migrations ...", flush=True)
    error = migrate(settings)
    if error is not None:
        print(f"error: migrations failed: {error}", file=sys.stderr)
        print(
            "hint: is Postgres running where CONVEYOR_DATABASE_URL points"
            " (default 127.0.0.1:5432)?",
            file=sys.stderr,
        )
        return 1

    try:
        dev_key, key_note = asyncio.run(ensure_dev_key(settings, run))
    except Exception as exc:  # reported to the developer; the URL may hold a password
        print(
            f"error: cannot create the development API key: {type(exc).__name__}", file=sys.stderr
        )
        return 1
    print(key_note, flush=True)
    try:
        secret_note = asyncio.run(ensure_dev_webhook_secret(settings, run))
    except Exception as exc:  # reported to the developer; the URL may hold a password
        print(
            f"error: cannot set up the webhook signing secret: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    print(secret_note, flush=True)

    deadline = time.monotonic() + timeout
    started: list[Started] = []
    try:
        lines = _start_all(settings, run, deadline, started)
    except KeyboardInterrupt:
        print("interrupted; stopping what was started", file=sys.stderr)
        _stop_started(started, run)
        return 130
    if lines is None:
        _stop_started(started, run)
        return 1

    print()
    print("Conveyor is up:")
    for line in lines:
        print(line)
    print(f"  provider    {settings.provider_base_url}")
    key_file = run.relative(run.path / DEV_KEY_FILE)
    print(f"  api key     {dev_key}  (tenant {DEFAULT_TENANT}; kept in {key_file})")
    print(f"              export CONVEYOR_API_KEY=$(cat {key_file})")
    print(f"  logs        {run.relative(run.path)}/<service>.log   (stop with: make down)")
    print("  try         conveyor submit 'Hello there' --watch   |   conveyor list")
    print(f"  http api    http://{settings.http_target}/v1/jobs   (OpenAPI: /openapi.json)")
    print(f"  traces      Jaeger UI {JAEGER_UI} (when Jaeger runs)")
    print(f"  queues      RabbitMQ management UI {RABBITMQ_UI} (when enabled)")
    return 0


def _start_all(
    settings: Settings, run: RunDir, deadline: float, started: list[Started]
) -> list[str] | None:
    """Start what is not running yet, in order, each until ready; summary lines or None.

    Every process started is appended to `started` (for the caller to stop on failure).
    """
    lines: list[str] = []
    for service in stack(settings):
        pid = run.running_pid(service)
        launched: Started | None = None
        if pid is not None:
            state = f"already running (pid {pid})"
        elif service.address and endpoint_ready(service):
            # Something not started by us (compose, a terminal) already serves here.
            run.pid_file(service).unlink(missing_ok=True)
            print(f"{service.name}: {service.address} is already served; not starting it")
            lines.append(_summary(service, "served by another process"))
            continue
        else:
            run.pid_file(service).unlink(missing_ok=True)  # stale, if any
            print(f"starting {service.name} ...", flush=True)
            launched = start(service, run, settings)
            started.append(launched)
            pid = launched.proc.pid
            state = f"pid {pid}"
        reason = wait_ready(service, run, deadline, launched, pid)
        if reason is not None:
            log = run.log_file(service)
            print(f"error: {service.name} failed to start: {reason}", file=sys.stderr)
            print(f"--- last lines of {run.relative(log)} ---", file=sys.stderr)
            print(log_tail(log, launched.log_offset if launched else 0), file=sys.stderr)
            print("---", file=sys.stderr)
            return None
        lines.append(_summary(service, state))
    return lines


def _summary(service: Service, state: str) -> str:
    where = service.address
    if service.check == "http":
        where = f"http://{service.address}"
    desc = f"{where}  {service.role}".strip() if where else service.role
    return f"  {service.name:<11} {desc:<48} {state}"


def _stop_started(started: Sequence[Started], run: RunDir) -> None:
    for item in reversed(started):
        outcome = stop_pid(item.proc.pid, item.proc)
        run.pid_file(item.service).unlink(missing_ok=True)
        print(f"{item.service.name}: {outcome}", file=sys.stderr)


def cmd_down(settings: Settings) -> int:
    run = RunDir(settings.run_dir)
    for service in reversed(stack(settings)):
        pid_file = run.pid_file(service)
        pid = run.read_pid(service)
        if pid is None:
            if pid_file.exists():
                pid_file.unlink()
            continue
        if not alive(pid):
            print(f"{service.name}: not running (removed stale pid file)")
        elif not runs_module(pid, service.module):
            print(f"{service.name}: pid {pid} is not {service.module}; left alone")
        else:
            print(f"{service.name}: {stop_pid(pid)} (pid {pid})", flush=True)
        pid_file.unlink(missing_ok=True)
    return 0


def cmd_status(settings: Settings) -> int:
    run = RunDir(settings.run_dir)
    all_up = True
    for service in stack(settings):
        pid = run.running_pid(service)
        health = ""
        if service.address:
            health = "healthy" if endpoint_ready(service) else "not answering"
        if pid is not None:
            state = f"running  pid {pid}"
        elif run.read_pid(service) is not None:
            state, all_up = "dead     (stale pid file)", False
        elif health == "healthy":
            state = "external (not started by devstack)"
        else:
            state, all_up = "stopped", False
        where = service.address or "-"
        print(f"{service.name:<11} {state:<36} {where:<16} {health}".rstrip())
    return 0 if all_up else 1
