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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import grpc

from conveyor.core.config import DEFAULT_TENANT, Settings, get_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_READY_MIN_AGE_S = 2.0
"""A service checked by its log must also have stayed alive this long."""
POLL_S = 0.2
TAIL_LINES = 40
READY_LINE = re.compile(rb"\bready\b", re.IGNORECASE)

DEMO_PROMPT = "Write a haiku about durable queues."
DEMO_MODEL = "claude-sonnet-4-5"
DEMO_MAX_TOKENS = 128
DEMO_TIMEOUT_S = 120.0

DEV_KEY_FILE = "dev-api-key"
"""The development tenant's API key, in the run folder."""
DEV_KEY_NAME = "dev"
DEV_WEBHOOK_SECRET_FILE = "dev-webhook-secret"
"""The development tenant's webhook signing secret (whsec_...), in the run folder."""
DEV_WEBHOOK_KEY_FILE = "dev-webhook-secrets-key"
"""The key that encrypts stored webhook secrets, unless CONVEYOR_WEBHOOK_SECRETS_KEY is set."""

JAEGER_UI = "http://127.0.0.1:16686"
RABBITMQ_UI = "http://127.0.0.1:15672"

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


# --------------------------------------------------------------------------- processes


class RunDir:
    """The run folder: `<name>.pid` and `<name>.log` per service."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()

    def pid_file(self, service: Service) -> Path:
        return self.path / f"{service.name}.pid"

    def log_file(self, service: Service) -> Path:
        return self.path / f"{service.name}.log"

    def read_pid(self, service: Service) -> int | None:
        try:
            return int(self.pid_file(service).read_text().strip())
        except (OSError, ValueError):
            return None

    def running_pid(self, service: Service) -> int | None:
        """The pid of the file if that process is alive and runs this service's module."""
        pid = self.read_pid(service)
        if pid is None or not alive(pid) or not runs_module(pid, service.module):
            return None
        return pid

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.split() or None


def runs_module(pid: int, module: str) -> bool:
    """Whether `pid` runs `python -m <module>` (true when the command line cannot be read)."""
    args = _cmdline(pid)
    if args is None:
        return True
    return any(a == "-m" and b == module for a, b in zip(args, args[1:], strict=False))


def child_env(run_dir: Path, settings: Settings) -> dict[str, str]:
    """The environment of a service: ours, unbuffered, with the project importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["CONVEYOR_RUN_DIR"] = str(run_dir)
    # A local stack: calls without an API key act as the development tenant.
    env.setdefault("CONVEYOR_ANONYMOUS_TENANT", DEFAULT_TENANT)
    # The simulator reads SIM_*; make it listen where the settings (and the worker) expect it.
    env["SIM_HOST"] = settings.simulator_host
    env["SIM_PORT"] = str(settings.simulator_port)
    paths = [str(PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


@dataclass
class Started:
    """A process this invocation started."""

    service: Service
    proc: subprocess.Popen[bytes]
    log_offset: int
    started_at: float


def start(service: Service, run: RunDir, settings: Settings) -> Started:
    """Start the service in its own session, output appended to its log, pid in its file."""
    log_path = run.log_file(service)
    with log_path.open("ab") as log:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        log.write(f"--- {stamp} started by devtools.devstack ---\n".encode())
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", service.module],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(run.path, settings),
            start_new_session=True,
        )
    run.pid_file(service).write_text(f"{proc.pid}\n")
    return Started(service, proc, offset, time.monotonic())


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group led by `pid` (to `pid` alone if it leads none)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_pid(pid: int, proc: subprocess.Popen[bytes] | None = None) -> str:
    """SIGTERM the group, wait up to STOP_TIMEOUT_S, then SIGKILL; "stopped" or "killed"."""

    def gone() -> bool:
        if proc is not None:
            return proc.poll() is not None
        return not alive(pid)

    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if gone():
            return "stopped"
        time.sleep(0.1)
    signal_group(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=5)
    return "killed"


def log_tail(path: Path, offset: int = 0, lines: int = TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    return b"\n".join(data.splitlines()[-lines:]).decode(errors="replace")


# --------------------------------------------------------------------------- readiness


def http_ok(address: str, path: str = "/healthz") -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _channel(address: str, tls_cert: Path | None) -> grpc.Channel:
    if tls_cert is None:
        return grpc.insecure_channel(address)
    roots = os.environ.get("CONVEYOR_TLS_ROOT_CERTS")
    cert, key = (
        os.environ.get("CONVEYOR_TLS_CLIENT_CERT_FILE"),
        os.environ.get("CONVEYOR_TLS_CLIENT_KEY_FILE"),
    )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(roots or tls_cert).read_bytes(),
        private_key=Path(key).read_bytes() if cert and key else None,
        certificate_chain=Path(cert).read_bytes() if cert and key else None,
    )
    return grpc.secure_channel(address, credentials)


def grpc_serving(address: str, tls_cert: Path | None = None) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with _channel(address, tls_cert) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
    except grpc.RpcError:
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def endpoint_ready(service: Service) -> bool:
    """For services with an address: whether something there answers healthy."""
    if service.check == "http":
        return http_ok(service.address)
    if service.check == "grpc":
        return grpc_serving(service.address, service.tls_cert)
    return False


def log_says_ready(path: Path, offset: int) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return READY_LINE.search(f.read()) is not None
    except OSError:
        return False


def wait_ready(
    service: Service,
    run: RunDir,
    deadline: float,
    started: Started | None,
    pid: int,
) -> str | None:
    """Poll until the service is ready; None when it is, else why not."""
    while True:
        if started is not None:
            code = started.proc.poll()
            if code is not None:
                return f"exited with status {code}"
        elif not alive(pid):
            return "exited"
        if service.check == "log":
            if started is None:
                return None  # it was running before: alive is all we can ask
            old_enough = time.monotonic() - started.started_at >= LOG_READY_MIN_AGE_S
            if old_enough and log_says_ready(run.log_file(service), started.log_offset):
                return None
        elif endpoint_ready(service):
            return None
        if time.monotonic() >= deadline:
            return "not ready in time"
        time.sleep(POLL_S)


# --------------------------------------------------------------------------- commands


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


def _write_private(path: Path, secret: str) -> None:
    """Replace `path` with a file only its owner can read (mode 0600, never wider)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


def dev_webhook_secrets_key(run: RunDir) -> str:
    """CONVEYOR_WEBHOOK_SECRETS_KEY, or unless the environment sets it, the key kept in
    `run/dev-webhook-secrets-key` (made once, mode 0600), exported to the services
    started here."""
    key = os.environ.get("CONVEYOR_WEBHOOK_SECRETS_KEY", "")
    if key:
        return key
    path = run.path / DEV_WEBHOOK_KEY_FILE
    key = path.read_text().strip() if path.exists() else ""
    if not key:
        key = secrets.token_urlsafe(32)
        _write_private(path, key)
    os.environ["CONVEYOR_WEBHOOK_SECRETS_KEY"] = key  # inherited by the services started here
    return key


async def ensure_dev_webhook_secret(settings: Settings, run: RunDir) -> str:
    """Sign the development tenant's webhooks on `make up`: its current secret is the
    one in `run/dev-webhook-secret` if that still holds, else a new one is made (the
    previous one stops signing at once) and written there. Returns what was done."""
    from conveyor.db import tenants as tenants_db
    from conveyor.db.engine import create_engine
    from conveyor.server.webhooks import SecretBox, new_secret, secret_bytes, secret_text

    box = SecretBox(dev_webhook_secrets_key(run))
    path = run.path / DEV_WEBHOOK_SECRET_FILE
    kept = path.read_text().strip() if path.exists() else ""
    engine = create_engine(settings.database_url.get_secret_value(), pool_size=1, pre_ping=True)
    try:
        async with engine.connect() as conn:
            signing = await tenants_db.signing_secrets(conn, DEFAULT_TENANT)
        if kept and signing:
            try:
                current = box.open(DEFAULT_TENANT, str(signing[0]["id"]), signing[0]["sealed"])
                if current == secret_bytes(kept):
                    return (
                        f"webhook signing secret of tenant {DEFAULT_TENANT}: {run.relative(path)}"
                    )
            except ValueError:
                pass  # another key, or the file was edited: make a new one
        secret = new_secret()
        await tenants_db.rotate_webhook_secret(
            engine,
            DEFAULT_TENANT,
            lambda secret_id: box.seal(DEFAULT_TENANT, str(secret_id), secret),
            0.0,
        )
    finally:
        await engine.dispose()
    _write_private(path, secret_text(secret))
    return f"created a webhook signing secret for tenant {DEFAULT_TENANT}: {run.relative(path)}"


async def ensure_dev_key(settings: Settings, run: RunDir) -> tuple[str, str]:
    """The development tenant's API key: the one in the run folder if it still works,
    else a new one (replacing the old key of that name). Returns (key, what was done)."""
    from conveyor.db import tenants as tenants_db
    from conveyor.db.admin import create_api_key
    from conveyor.db.engine import create_engine
    from conveyor.server.auth import hash_key

    path = run.path / DEV_KEY_FILE
    engine = create_engine(settings.database_url.get_secret_value(), pool_size=1, pre_ping=True)
    try:
        if path.exists():
            key = path.read_text().strip()
            owner = await tenants_db.resolve_key(engine, hash_key(key)) if key else None
            # An operator key (every tenant's stats on this machine); an older admin key
            # is replaced, as admin keys no longer read other tenants' stats.
            if owner is not None and owner.tenant == DEFAULT_TENANT and owner.role == "operator":
                return key, f"development API key: {run.relative(path)}"
        async with engine.connect() as conn:
            await tenants_db.revoke_named(conn, DEFAULT_TENANT, DEV_KEY_NAME)
        key, _ = await create_api_key(engine, DEFAULT_TENANT, DEV_KEY_NAME, "operator")
    finally:
        await engine.dispose()
    _write_private(path, key)
    return key, f"created a development API key for tenant {DEFAULT_TENANT}: {run.relative(path)}"


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


async def _demo(settings: Settings) -> int:
    from conveyor.cli import describe_job, stream_job
    from conveyor.client import ConveyorClient, ConveyorError, job_status_name
    from conveyor.v1 import jobs_pb2

    began = time.monotonic()
    key_file = settings.run_dir / DEV_KEY_FILE
    api_key = os.environ.get("CONVEYOR_API_KEY") or (
        key_file.read_text().strip() if key_file.exists() else None
    )
    try:
        async with ConveyorClient(
            settings.gateway_target, settings.notifier_target, api_key=api_key
        ) as client:
            job = await client.submit(
                DEMO_MODEL,
                DEMO_PROMPT,
                max_tokens=DEMO_MAX_TOKENS,
                labels={"source": "devstack-demo"},
            )
            print(f"submitted job {job.id} ({DEMO_MODEL}): {DEMO_PROMPT}", flush=True)
            print(flush=True)
            async with asyncio.timeout(DEMO_TIMEOUT_S):
                final = await stream_job(client, job.id, sys.stdout, None, final_line=False)
    except ConveyorError as exc:
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
        print("hint: is the stack up? (make up)", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"error: the job did not finish within {DEMO_TIMEOUT_S:.0f} s", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - began
    usage = final.usage
    print()
    print(f"status:  {job_status_name(final.status)}  (attempts {final.attempts})")
    print(
        f"usage:   {usage.input_tokens} input + {usage.output_tokens} output tokens"
        f"  stop_reason={final.stop_reason or '-'}"
    )
    print(f"elapsed: {elapsed:.2f} s from submit to finish")
    if final.status != jobs_pb2.JOB_STATUS_SUCCEEDED:
        print(f"error: the demo job did not succeed: {describe_job(final)}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(settings: Settings) -> int:
    return asyncio.run(_demo(settings))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.devstack",
        description="Run the Conveyor services locally in the background.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="migrate, start the simulator and the services, wait")
    up.add_argument(
        "--timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for readiness"
    )
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="a line per service")
    sub.add_parser("demo", help="submit a job and stream its tokens")
    args = parser.parse_args(argv)
    settings = get_settings()
    commands: dict[str, Callable[[], int]] = {
        "up": lambda: cmd_up(settings, args.timeout),
        "down": lambda: cmd_down(settings),
        "status": lambda: cmd_status(settings),
        "demo": lambda: cmd_demo(settings),
    }
    try:
        return commands[args.command]()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
