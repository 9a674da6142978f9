"""Starting and stopping the stack's processes: the run folder (`<name>.pid`,
`<name>.log`), liveness by pid and command line, process-group signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from conveyor.core.config import DEFAULT_TENANT, Settings

from .services import Service

PROJECT_ROOT = Path(__file__).resolve().parents[2]


STOP_TIMEOUT_S = 10.0


TAIL_LINES = 40


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
