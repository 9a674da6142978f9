"""What earlier chaos runs killed outright left behind: private servers, services, run folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from devtools import devstack

ROOT = Path(__file__).resolve().parents[2]
RUN_ROOT = ROOT / "run" / "chaos"
SERVERS_PREFIX = "conveyor-chaos-"
"""The private servers live in /tmp/conveyor-chaos-<pid>-*/ (the postgres user must
be able to reach its data directory, which a home or work directory may not allow)."""
KEEP_RUN_DIRS = 3


def _alive(pid: int) -> bool:
    return pid == os.getpid() or devstack.alive(pid)


def clean_leftovers() -> list[str]:
    """Stop and remove what chaos runs killed outright left behind (their private
    servers and services); returns what was done."""
    done: list[str] = []
    for root in Path("/tmp").glob(f"{SERVERS_PREFIX}*"):
        owner = root.name[len(SERVERS_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        data = root / "postgres" / "data"
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                pid = int((data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
        with contextlib.suppress(Exception):
            pid = int((root / "rabbitmq" / "rabbit.pid").read_text().strip())
            if devstack.alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        done.append(f"removed the servers of run {owner}")
    if RUN_ROOT.is_dir():
        runs = sorted(
            (d for d in RUN_ROOT.iterdir() if d.is_dir() and d.name.isdigit()),
            key=lambda d: d.stat().st_mtime,
        )
        for run_dir in runs:
            if _alive(int(run_dir.name)):
                continue
            for pid_file in run_dir.glob("*.pid"):
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pid_file.read_text().strip())
                    module = "services." + pid_file.stem.split("-")[0]
                    if pid_file.stem == "simulator":
                        module = "devtools.simulator"
                    if devstack.alive(pid) and devstack.runs_module(pid, module):
                        devstack.stop_pid(pid)
                        done.append(f"stopped {pid_file.stem} (pid {pid}) of run {run_dir.name}")
                pid_file.unlink(missing_ok=True)
        for old in runs[:-KEEP_RUN_DIRS]:
            if not _alive(int(old.name)):
                shutil.rmtree(old, ignore_errors=True)
    return done
