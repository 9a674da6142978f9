"""What the system costs while a scenario runs: CPU time and memory of every process
(from /proc), Postgres' and RabbitMQ's included."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

SERVICES = ("gateway", "worker", "notifier", "dispatcher")
"""The system's own processes; the simulator stands in for the provider."""

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def cpu_ticks(pid: int, children: bool = False) -> int:
    """utime + stime of a process (all its threads), plus its reaped children's if asked."""
    fields = _proc_stat(pid)
    if fields is None:
        return 0
    # Fields after the command: state is [0], utime [11], stime [12], cutime [13], cstime [14].
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants now (a supervised service's processes)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except (OSError, ValueError):
                continue
    return found


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process and its descendants
    (summed), in KiB."""
    out: dict[str, int] = {}
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = out.get(key, 0) + int(rest.split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def pids_named(comm: str) -> list[int]:
    """Pids whose command name (`/proc/<pid>/comm`) is `comm`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == comm:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def postgres_ticks() -> int:
    """CPU ticks of the whole Postgres server: live processes plus the backends the
    postmaster has reaped (its children's times)."""
    total = 0
    for pid in pids_named("postgres"):
        fields = _proc_stat(pid)
        if fields is None:
            continue
        is_postmaster = fields[1] == "1" or not _parent_is(int(fields[1]), "postgres")
        total += cpu_ticks(pid, children=is_postmaster)
    return total


def machine_busy_ticks() -> int:
    """CPU ticks the whole machine has spent busy since boot, all cores and processes
    (/proc/stat: user, nice, system, irq and softirq; not idle, iowait or steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[0] + fields[1] + fields[2] + fields[5] + fields[6]


def _parent_is(ppid: int, comm: str) -> bool:
    try:
        return Path(f"/proc/{ppid}/comm").read_text().strip() == comm
    except OSError:
        return False


def rabbit_pid() -> int | None:
    """The RabbitMQ node's Erlang VM: the oldest `beam.smp` (a `rabbitmqctl` call runs
    one of its own for a moment, which must not be measured instead)."""
    pids = pids_named("beam.smp")
    return min(pids, key=_start_ticks) if pids else None


def _start_ticks(pid: int) -> int:
    """When the process started, in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 1 << 62
    return int(stat.rsplit(")", 1)[1].split()[19])


class ResourceMeter:
    """CPU time of each process between `start()` and `stop()`, in milliseconds.

    `pids` maps a name to the pid of one of our services, or is a callable giving
    that mapping now (services restarted meanwhile are then followed: call `poll()`
    now and then; a process first seen after `start()` counts from its birth). A
    service's child processes (a supervised gateway's) count as the service. The
    RabbitMQ and Postgres servers are measured whole: they are shared with anything
    else that uses them on this machine. `client` is this benchmark process, `machine`
    the whole machine's busy CPU (every process, a load generator's too).
    """

    def __init__(self, pids: Mapping[str, int] | Callable[[], Mapping[str, int]]) -> None:
        self._pids = pids
        self._first: dict[tuple[str, int], int] = {}
        self._last: dict[tuple[str, int], int] = {}
        self._t0 = 0.0

    def _current(self) -> dict[tuple[str, int], int]:
        pids = self._pids() if callable(self._pids) else self._pids
        ticks = {
            (name, member): cpu_ticks(member)
            for name, pid in pids.items()
            for member in process_tree(pid)
        }
        rabbit = rabbit_pid()
        if rabbit is not None:
            ticks[("rabbitmq", rabbit)] = cpu_ticks(rabbit)
        ticks[("postgres", 0)] = postgres_ticks()
        ticks[("client", os.getpid())] = cpu_ticks(os.getpid())
        ticks[("machine", 0)] = machine_busy_ticks()
        return ticks

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._first = self._current()
        self._last = dict(self._first)

    def poll(self) -> None:
        for key, ticks in self._current().items():
            self._first.setdefault(key, 0)
            if ticks > 0:
                self._last[key] = ticks

    def stop(self) -> dict[str, float]:
        """CPU ms per process name since `start()`, plus `wall` (ms)."""
        self.poll()
        out: dict[str, float] = {}
        for key, last in self._last.items():
            name = key[0]
            out[name] = out.get(name, 0.0) + (last - self._first[key]) * 1000.0 / CLK_TCK
        out["wall"] = (time.monotonic() - self._t0) * 1000.0
        return out


def system_cpu_ms(cpu: Mapping[str, float]) -> float:
    """CPU of Conveyor itself: its services, RabbitMQ and Postgres (not simulator, not client)."""
    return sum(cpu.get(name, 0.0) for name in (*SERVICES, "rabbitmq", "postgres"))


# --------------------------------------------------------------------------- RabbitMQ


async def _command(*args: str, limit_s: float = 60.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


async def rabbit_memory(vhost: str) -> dict[str, int]:
    """Memory of the broker: the node's totals (erlang, rss) and this vhost's queues."""
    import orjson

    out: dict[str, int] = {}
    try:
        status = orjson.loads(await _command("rabbitmqctl", "-q", "status", "--formatter", "json"))
        total = status.get("memory", {}).get("total", {})
        out["node_erlang_bytes"] = int(total.get("erlang", 0))
        out["node_rss_bytes"] = int(total.get("rss", 0))
    except (RuntimeError, OSError, ValueError, TimeoutError):
        pass
    try:
        queues = orjson.loads(
            await _command(
                "rabbitmqctl",
                "-q",
                "list_queues",
                "-p",
                vhost,
                "name",
                "messages",
                "memory",
                "--formatter",
                "json",
            )
        )
        out["vhost_queue_bytes"] = sum(int(q.get("memory") or 0) for q in queues)
        out["vhost_messages"] = sum(int(q.get("messages") or 0) for q in queues)
    except (RuntimeError, OSError, ValueError, TimeoutError):
        pass
    return out
