"""What every benchmark scenario shares: the stack under test, load generators,
process accounting (CPU, memory), the database queries that time jobs, and the
shape of a scenario's result.

A scenario is a module with `NAME` (its command-line name), `TITLE`, and

    async def run(ctx: Context) -> Result

`ctx` gives it the isolated stack (`ctx.stack`: gateway, notifier and simulator
addresses, start and stop of single services), the counts to use (`ctx.counts`,
smaller under `--quick`), the simulator's `/control` (`ctx.sim_set`), a
`ctx.reset()` that empties queues and tables between scenarios, a pool on the
run's database (`ctx.db`), and helpers to submit load and wait for the jobs.
The harness measures the CPU time of every process during `run` by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aio_pika
import aiohttp
import asyncpg
import grpc
import grpc.aio

from conveyor.bus import broker
from conveyor.client import error_from_rpc
from conveyor.v1 import jobs_pb2, jobs_pb2_grpc
from devtools import sandbox

MODEL = "claude-sonnet-4-5"
SERVICES = ("gateway", "worker", "notifier", "dispatcher")
"""The system's own processes; the simulator stands in for the provider."""
TERMINAL = ("succeeded", "failed", "cancelled", "dead")
SIM_DEFAULTS: dict[str, Any] = {
    "latency_ms": 0.0,
    "tokens_per_second": 0.0,
    "output_tokens": 24,
    "rate_429": 0.0,
    "rate_529": 0.0,
    "rate_500": 0.0,
    "rate_drop": 0.0,
    "rate_error_event": 0.0,
    "retry_after_s": 1.0,
    "seed": 1234,
}
"""The simulator's configuration at the start of every scenario."""

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class Counts:
    """How much work each scenario does; `quick()` is the smoke-test size."""

    submit_jobs: int = 5_000
    submit_clients: int = 50
    submit_rate: float = 1_500.0
    """Offered load of the paced SubmitJob run (jobs/s, spread over the clients)."""
    batch_size: int = 100
    e2e_jobs: int = 2_000
    latency_ms: float = 1_000.0
    """Simulator latency (time to first token) of end-to-end, storm and paced runs."""
    paced_rate: float = 50.0
    """Jobs/s of the unsaturated end-to-end run: well below what this machine completes
    (about 180 jobs/s with every service on its 2 cores), so no job waits for CPU."""
    paced_jobs: int = 500
    idle_rate: float = 10.0
    """Jobs/s of a second unsaturated run, nearer idle: on a virtual machine the
    overhead grows as the load falls, each process having gone idle between jobs."""
    idle_jobs: int = 200
    single_jobs: int = 100
    """Jobs of the one-at-a-time end-to-end run (simulator at 0 ms)."""
    hold_jobs: int = 1_200
    """Jobs of the held-open end-to-end run: more than the worker's concurrency."""
    hold_latency_ms: float = 15_000.0
    """A slow model (as real calls are), so the worker fills up before the first ends."""
    storm_jobs: int = 2_000
    storm_max_attempts: int = 10
    stream_jobs: int = 200
    backlog_jobs: int = 100_000
    backlog_clients: int = 8
    drain_limit_s: float = 120.0
    cost_jobs: int = 2_000
    job_timeout_s: float = 600.0
    """Longest a scenario waits for its jobs to finish."""

    @classmethod
    def quick(cls) -> Counts:
        return cls(
            submit_jobs=300,
            submit_clients=20,
            batch_size=20,
            e2e_jobs=100,
            latency_ms=200.0,
            paced_rate=50.0,
            paced_jobs=25,
            idle_jobs=5,
            single_jobs=10,
            hold_jobs=40,
            hold_latency_ms=1_000.0,
            storm_jobs=20,
            stream_jobs=10,
            backlog_jobs=300,
            backlog_clients=4,
            drain_limit_s=3.0,
            cost_jobs=100,
            job_timeout_s=60.0,
        )


# --------------------------------------------------------------------------- results


Verdict = Literal["met", "missed", ""]


@dataclass
class Figure:
    """One measured number, with its unit and, where DESIGN.md sets one, its target."""

    label: str
    value: float | int | str | None
    unit: str = ""
    target: str = ""
    """Human-readable target, e.g. "< 10 ms"."""
    met: bool | None = None

    @property
    def verdict(self) -> Verdict:
        if self.met is None:
            return ""
        return "met" if self.met else "missed"


@dataclass
class Result:
    """What a scenario reports: its figures (in table order), raw extras, notes."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping in the JSON file (distributions, counters)."""
    notes: list[str] = field(default_factory=list)
    status: Literal["ok", "skipped", "error", "interrupted"] = "ok"
    elapsed_s: float = 0.0
    resources: dict[str, Any] = field(default_factory=dict)
    """CPU and memory of every process over the scenario, filled in by the harness."""

    def add(
        self,
        label: str,
        value: float | int | str | None,
        unit: str = "",
        *,
        target: str = "",
        met: bool | None = None,
    ) -> Figure:
        fig = Figure(label, value, unit, target, met)
        self.figures.append(fig)
        return fig

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for fig, raw in zip(self.figures, out["figures"], strict=True):
            raw["verdict"] = fig.verdict
        return out


def median_of(runs: Sequence[Result]) -> Result:
    """One result from several runs of a scenario: each figure is the median of its
    runs' values (the lower middle one of an even count, so it is a value one run
    measured), with that run's verdict. Every run's values stay in `extra["runs"]`."""
    if len(runs) == 1:
        return runs[0]
    last = runs[-1]
    merged = Result(last.name, last.title, extra=dict(last.extra), resources=last.resources)
    merged.status = next((r.status for r in runs if r.status != "ok"), "ok")
    merged.elapsed_s = sum(r.elapsed_s for r in runs)
    merged.notes = list(dict.fromkeys(n for r in runs for n in r.notes))
    merged.notes.append(f"each figure is the median of {len(runs)} runs")
    # A label may stand twice in a run (a sub-row such as "  p99" under two runs of a
    # scenario): figures are matched by label and by how many times it came before.
    by_key: dict[tuple[str, int], list[Figure]] = {}
    for run in runs:
        seen: dict[str, int] = {}
        for fig in run.figures:
            n = seen[fig.label] = seen.get(fig.label, -1) + 1
            by_key.setdefault((fig.label, n), []).append(fig)
    for (label, _), figs in by_key.items():
        numeric = [f for f in figs if isinstance(f.value, int | float) and not math.isnan(f.value)]
        if len(numeric) < len(figs) or not numeric:
            merged.figures.append(figs[-1])
            continue
        middle = sorted(numeric, key=lambda f: float(f.value or 0))[(len(numeric) - 1) // 2]
        merged.figures.append(Figure(label, middle.value, middle.unit, middle.target, middle.met))
    merged.extra["runs"] = [[[f.label, f.value] for f in r.figures] for r in runs]
    return merged


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, linearly interpolated."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def summarize(values: Iterable[float], scale: float = 1.0) -> dict[str, float]:
    """count, mean, p50, p95, p99 and max of `values` times `scale` (e.g. 1000 for ms)."""
    data = sorted(v * scale for v in values)
    if not data:
        return {"count": 0}
    return {
        "count": len(data),
        "mean": sum(data) / len(data),
        "p50": percentile(data, 50),
        "p95": percentile(data, 95),
        "p99": percentile(data, 99),
        "max": data[-1],
    }


def rounded(value: float, digits: int = 2) -> float:
    return round(value, digits) if math.isfinite(value) else value


# --------------------------------------------------------------------------- processes


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


def _parent_is(ppid: int, comm: str) -> bool:
    try:
        return Path(f"/proc/{ppid}/comm").read_text().strip() == comm
    except OSError:
        return False


def rabbit_pid() -> int | None:
    pids = pids_named("beam.smp")
    return pids[0] if pids else None


class ResourceMeter:
    """CPU time of each process between `start()` and `stop()`, in milliseconds.

    `pids` maps a name to the pid of one of our services, or is a callable giving
    that mapping now (services restarted meanwhile are then followed: call `poll()`
    now and then; a process first seen after `start()` counts from its birth). A
    service's child processes (a supervised gateway's) count as the service. The
    RabbitMQ and Postgres servers are measured whole: they are shared with anything
    else that uses them on this machine. `client` is this benchmark process.
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


# --------------------------------------------------------------------------- the context


@dataclass
class JobTimes:
    """A finished job's timestamps (epoch seconds, the database's clock) and attempts."""

    status: str
    attempts: int
    created: float
    started: float | None
    finished: float | None


class Context:
    """The running stack and what scenarios need around it (see the module docstring)."""

    def __init__(
        self,
        stack: sandbox.Stack,
        counts: Counts,
        quick: bool,
        db: asyncpg.Pool,
        http: aiohttp.ClientSession,
    ) -> None:
        self.stack = stack
        self.counts = counts
        self.quick = quick
        self.db = db
        self.http = http
        self.results: dict[str, Result] = {}
        """Results of the scenarios that ran before, by name (storm compares to end-to-end)."""
        self._ids = itertools.count(1)

    # -- addresses

    @property
    def gateway(self) -> str:
        return self.stack.gateway

    @property
    def notifier(self) -> str:
        return self.stack.notifier

    @property
    def simulator_url(self) -> str:
        return self.stack.simulator_url

    @property
    def vhost(self) -> str:
        return self.stack.backing.vhost

    @property
    def worker_concurrency(self) -> int:
        return self.stack.settings.worker_concurrency

    def pids(self) -> dict[str, int]:
        """Pids of the simulator and the services running now."""
        return {n: p for n in ("simulator", *SERVICES) if (p := self.stack.pid(n)) is not None}

    # -- services

    def worker_running(self) -> bool:
        return self.stack.pid("worker") is not None

    async def start_worker(self) -> None:
        if not self.worker_running():
            await asyncio.to_thread(self.stack.start, "worker")

    async def stop_worker(self) -> None:
        if self.worker_running():
            await asyncio.to_thread(self.stack.stop, "worker")

    # -- simulator

    async def sim_set(self, **changes: Any) -> dict[str, Any]:
        """Change the simulator's configuration (POST /control); returns the new one."""
        async with self.http.post(f"{self.simulator_url}/control", json=changes) as resp:
            body: dict[str, Any] = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"simulator /control refused {changes}: {body}")
            return body

    async def sim_stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.simulator_url}/stats") as resp:
            stats: dict[str, Any] = await resp.json()
            return stats

    # -- between scenarios

    async def reset(self, *, worker: bool) -> None:
        """Empty the lanes and the tables, restore the simulator's defaults, and leave
        the worker running (`worker=True`) or stopped.

        A running worker is restarted only if jobs are unfinished (their messages may
        be unacked in it, out of reach of a purge)."""
        if not worker or (self.worker_running() and await self.unfinished_count() > 0):
            await self.stop_worker()
        async with self.db.acquire() as conn:
            tenants = [r["tenant"] for r in await conn.fetch("SELECT tenant FROM tenants")]
        lanes = self.stack.settings.lanes
        connection = await aio_pika.connect(self.stack.backing.amqp_url)
        try:
            for name in [
                *map(broker.lane_queue, lanes),
                *(broker.tenant_lane_queue(lane, t) for lane in lanes for t in tenants),
                broker.DEAD_LETTER_QUEUE,
            ]:
                # A channel each: declaring a queue that does not exist closes the channel.
                with contextlib.suppress(aio_pika.exceptions.ChannelNotFoundEntity):
                    async with connection.channel() as channel:
                        queue = await channel.declare_queue(name, passive=True)
                        await queue.purge()
        finally:
            await connection.close()
        async with self.db.acquire() as conn:
            # Tenants and keys stay: the gateway registers a tenant (and its queues) once
            # per process, and the next reset finds the tenant queues to purge by them.
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename NOT IN ('alembic_version', 'tenants', 'api_keys')"
            )
            if tables:
                names = ", ".join(f'"{t["tablename"]}"' for t in tables)
                await conn.execute(f"TRUNCATE {names} CASCADE")
            await conn.execute("UPDATE tenants SET running = 0")
        await self.sim_set(**SIM_DEFAULTS, reset_stats=True)
        if worker:
            await self.start_worker()

    # -- jobs

    def request(
        self, *, label: str, max_attempts: int = 0, labels: Mapping[str, str] | None = None
    ) -> jobs_pb2.SubmitJobRequest:
        """A small, distinct job (one user message, up to 64 output tokens)."""
        n = next(self._ids)
        return jobs_pb2.SubmitJobRequest(
            model=MODEL,
            messages=[jobs_pb2.Message(role="user", content=f"benchmark job {n}: say something")],
            max_tokens=64,
            max_attempts=max_attempts,
            labels={"bench": label, **(labels or {})},
        )

    async def counts_by_status(self) -> dict[str, int]:
        async with self.db.acquire() as conn:
            rows = await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    async def unfinished_count(self) -> int:
        async with self.db.acquire() as conn:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status <> ALL($1::text[])", list(TERMINAL)
            )
        return int(n)

    async def finished_count(self) -> int:
        async with self.db.acquire() as conn:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status = ANY($1::text[])", list(TERMINAL)
            )
        return int(n)

    async def wait_finished(
        self,
        expected: int,
        timeout_s: float | None = None,
        poll_s: float = 0.1,
        on_poll: Callable[[], Any] | None = None,
    ) -> int:
        """Wait until `expected` jobs are terminal (or the timeout); returns how many are."""
        deadline = time.monotonic() + (timeout_s or self.counts.job_timeout_s)
        done = 0
        while time.monotonic() < deadline:
            done = await self.finished_count()
            if on_poll is not None:
                on_poll()
            if done >= expected:
                return done
            await asyncio.sleep(poll_s)
        return done

    async def job_times(self) -> list[JobTimes]:
        async with self.db.acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT status, attempts,
                       extract(epoch FROM created_at)::float8 AS c,
                       extract(epoch FROM started_at)::float8 AS s,
                       extract(epoch FROM finished_at)::float8 AS f
                  FROM jobs
                """
            )
        return [JobTimes(r["status"], r["attempts"], r["c"], r["s"], r["f"]) for r in rows]

    @contextlib.asynccontextmanager
    async def in_flight_sampler(self, every_s: float = 0.05) -> AsyncIterator[dict[str, int]]:
        """Polls the simulator's open streams; the dict's `peak` is the most seen at once."""
        seen = {"peak": 0, "samples": 0}

        async def poll() -> None:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    stats = await self.sim_stats()
                    seen["peak"] = max(seen["peak"], int(stats.get("active_streams", 0)))
                    seen["samples"] += 1
                await asyncio.sleep(every_s)

        task = asyncio.create_task(poll())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    """What a load run saw from the client side."""

    calls: int = 0
    jobs: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    """Per call; for paced runs measured from the call's scheduled start."""
    service_s: list[float] = field(default_factory=list)
    """Per call, from the moment it was actually sent."""
    elapsed_s: float = 0.0
    job_ids: list[str] = field(default_factory=list)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.elapsed_s if self.elapsed_s > 0 else math.nan

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@contextlib.asynccontextmanager
async def gateway_clients(target: str, n: int) -> AsyncIterator[list[jobs_pb2_grpc.JobServiceStub]]:
    """`n` clients of the gateway, each with its own connection, connected before use."""
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 30)
        yield [jobs_pb2_grpc.JobServiceStub(c) for c in channels]
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


async def submit_load(
    target: str,
    requests: Sequence[jobs_pb2.SubmitJobRequest],
    clients: int,
    *,
    batch_size: int = 0,
    rate: float | None = None,
    keep_ids: bool = False,
) -> LoadResult:
    """Submit `requests` from `clients` concurrent clients and time every call.

    `batch_size` > 0 sends SubmitJobs batches of that size instead of SubmitJob.
    Closed loop (each client sends its next call when the last returns) unless a
    `rate` (calls/s, over all clients) is given: then call i is due at i / rate and
    its latency counts from then, so a stall is not hidden by the clients slowing
    down (no coordinated omission).
    """
    if batch_size > 0:
        calls: list[Any] = [
            jobs_pb2.SubmitJobsRequest(jobs=requests[i : i + batch_size])
            for i in range(0, len(requests), batch_size)
        ]
    else:
        calls = list(requests)
    result = LoadResult()
    next_call = iter(range(len(calls)))

    async def client(stub: jobs_pb2_grpc.JobServiceStub, t0: float) -> None:
        for i in next_call:
            due = t0 + i / rate if rate else None
            if due is not None:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent = time.perf_counter()
            try:
                if batch_size > 0:
                    response = await stub.SubmitJobs(calls[i], timeout=60)
                    jobs = len(response.results)
                    if keep_ids:
                        result.job_ids.extend(r.job.id for r in response.results)
                else:
                    one = await stub.SubmitJob(calls[i], timeout=60)
                    jobs = 1
                    if keep_ids:
                        result.job_ids.append(one.job.id)
            except grpc.aio.AioRpcError as exc:
                err = error_from_rpc(exc)
                result.errors[err.code.name] = result.errors.get(err.code.name, 0) + 1
                continue
            end = time.perf_counter()
            result.calls += 1
            result.jobs += jobs
            result.service_s.append(end - sent)
            result.latencies_s.append(end - (due if due is not None else sent))

    async with gateway_clients(target, clients) as stubs:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(stub, t0) for stub in stubs))
        result.elapsed_s = time.perf_counter() - t0
    return result


def latency_figures(
    result: Result, load: LoadResult, prefix: str, *, p99_target_ms: float | None = None
) -> None:
    """Add p50/p95/p99 (ms) of a load's latencies to `result`."""
    lat = summarize(load.latencies_s, 1000.0)
    result.add(f"{prefix} latency p50", rounded(lat.get("p50", math.nan)), "ms")
    result.add(f"{prefix} latency p95", rounded(lat.get("p95", math.nan)), "ms")
    p99 = lat.get("p99", math.nan)
    if p99_target_ms is None:
        result.add(f"{prefix} latency p99", rounded(p99), "ms")
    else:
        result.add(
            f"{prefix} latency p99",
            rounded(p99),
            "ms",
            target=f"< {p99_target_ms:g} ms",
            met=p99 < p99_target_ms,
        )
