"""`python -m bench [scenario ...] [--quick] [--repeat N] [--out FILE]`: run the benchmark.
(`python -m bench compare REF [scenario ...]`: before and after, see bench/compare.py.)

It creates its own RabbitMQ vhost and Postgres database on the local servers
(named `conveyor-bench-<pid>-…`), starts the simulator and the four services on
free ports of 127.0.0.1 (never those of `make up`), runs the scenarios in order,
stops everything it started and removes the vhost and the database — on Ctrl-C
or SIGTERM too — then prints the table and writes the figures with the machine's
description to `bench/results/<UTC time>.json`. Leftovers of a run that was
killed outright are cleaned up by the next run.

With `--repeat N` each scenario runs N times in a row and the table gives each
figure's median (these machines are shared: one run moves by ±15% or more).

The services read `CONVEYOR_*` variables as usual, so a tuning (e.g.
`CONVEYOR_DB_POOL_SIZE=20`) can be benchmarked; the values used are recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import asyncpg

from bench import (
    backlog,
    batch_lane,
    cost,
    end_to_end,
    http_api,
    report,
    storm,
    streaming,
    submit,
)
from bench.harness import (
    Context,
    Counts,
    ResourceMeter,
    Result,
    median_of,
    memory_kb,
    system_cpu_ms,
)
from conveyor.core.config import Settings
from devtools import devstack, sandbox

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
RUN_ROOT = ROOT / "run" / "bench"
VHOST_PREFIX = "conveyor-bench"
KEEP_RUN_DIRS = 3

SCENARIOS: dict[str, ModuleType] = {
    m.NAME: m for m in (submit, http_api, end_to_end, storm, streaming, backlog, cost, batch_lane)
}
"""Every scenario, in the order `make bench` runs them."""

BACKGROUND_SERVICES = ("simulator", "dispatcher", "notifier", "gateway", "http")
"""Started once for the whole run; the worker is started by the scenarios that need it."""


def bench_env(worker_concurrency: int, quick: bool = False) -> dict[str, str]:
    """The services' environment: the defaults a user gets, but for the worker's
    concurrency (DESIGN.md asks for 1,000+ calls in flight per worker) and a gateway
    process per core, as the README advises for a busy machine. A quick run also
    caps the retry backoff at 2 s, to keep the smoke run short."""
    env = {
        "CONVEYOR_WORKER_CONCURRENCY": str(worker_concurrency),
        "CONVEYOR_GATEWAY_PROCESSES": os.environ.get(
            "CONVEYOR_GATEWAY_PROCESSES", str(os.cpu_count() or 1)
        ),
        "CONVEYOR_LOG_JSON": "1",
        "CONVEYOR_WORKER_SHUTDOWN_GRACE_S": os.environ.get(
            "CONVEYOR_WORKER_SHUTDOWN_GRACE_S", "10"
        ),
    }
    # A batch lane (bench/batch_lane.py); workers keep to the interactive lanes.
    env["CONVEYOR_LANES"] = '["interactive", "default", "bulk", "batch"]'
    env["CONVEYOR_WORKER_LANES"] = '["interactive", "default", "bulk"]'
    env["CONVEYOR_BATCH_LANES"] = '["batch"]'
    env["CONVEYOR_BATCH_MAX_WAIT_S"] = "1"
    env["CONVEYOR_BATCH_POLL_S"] = "0.5"
    env["CONVEYOR_BATCH_POLL_MAX_S"] = "1"
    if quick:
        env["CONVEYOR_RETRY_CAP_S"] = "2"
    return env


@contextlib.contextmanager
def bench_stack(worker_concurrency: int, quick: bool = False) -> Iterator[sandbox.Stack]:
    """The stack under test, in a vhost and database of its own (named after this
    process, so that a later run cleans up after one killed outright), with the
    background services started and the worker not; stopped and removed afterwards."""
    with sandbox.backing_services(f"{VHOST_PREFIX}-{os.getpid()}") as backing:
        stack = sandbox.Stack(
            backing, RUN_ROOT / str(os.getpid()), bench_env(worker_concurrency, quick)
        )
        try:
            print(f"vhost and database: {backing.vhost}; logs in {stack.run.path}", flush=True)
            for name in BACKGROUND_SERVICES:
                stack.start(name)
            yield stack
        finally:
            stack.stop_all()


# --------------------------------------------------------------------------- leftovers


def _bench_alive(pid: int) -> bool:
    """Whether `pid` is a live benchmark run (python -m bench)."""
    if pid == os.getpid():
        return True
    if not devstack.alive(pid):
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return b"bench" in args


def _owner(name: str, sep: str) -> int | None:
    """The pid in `conveyor-bench-<pid>-<hex>` (or with underscores)."""
    prefix = VHOST_PREFIX.replace("-", sep) + sep
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(sep, 1)[0]
    return int(head) if head.isdigit() else None


def clean_leftovers() -> list[str]:
    """Stop the processes and remove the vhosts and databases of benchmark runs that
    died without cleaning up (kill -9); returns what was done."""
    done: list[str] = []
    if RUN_ROOT.is_dir():
        for run_dir in RUN_ROOT.iterdir():
            if not run_dir.name.isdigit() or _bench_alive(int(run_dir.name)):
                continue
            for pid_file in run_dir.glob("*.pid"):
                service = next(
                    (s for s in devstack.stack(Settings()) if s.name == pid_file.stem),
                    None,
                )
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pid_file.read_text().strip())
                    if (
                        service
                        and devstack.alive(pid)
                        and devstack.runs_module(pid, service.module)
                    ):
                        devstack.stop_pid(pid)
                        done.append(f"stopped {service.name} (pid {pid}) of run {run_dir.name}")
                pid_file.unlink(missing_ok=True)
        dirs = sorted(
            (d for d in RUN_ROOT.iterdir() if d.is_dir() and d.name.isdigit()),
            key=lambda d: d.stat().st_mtime,
        )
        for old in dirs[:-KEEP_RUN_DIRS]:
            if not _bench_alive(int(old.name)):
                shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(Exception):
        for vhost in sandbox.rabbitmqctl("-q", "list_vhosts", "name").split():
            owner = _owner(vhost, "-")
            if owner is not None and not _bench_alive(owner):
                sandbox.rabbitmqctl("delete_vhost", vhost)
                done.append(f"deleted vhost {vhost}")
    with contextlib.suppress(Exception):
        asyncio.run(_drop_stale_databases(done))
    return done


async def _drop_stale_databases(done: list[str]) -> None:
    conn = await asyncpg.connect(sandbox.LOCAL_PG)
    try:
        names = [r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")]
    finally:
        await conn.close()
    for name in names:
        owner = _owner(name, "_")
        if owner is not None and not _bench_alive(owner):
            await sandbox.drop_database(sandbox.LOCAL_PG, name)
            done.append(f"dropped database {name}")


# --------------------------------------------------------------------------- signals


def raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """No Ctrl-C or SIGTERM while cleaning up: a second Ctrl-C must not leave a mess."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


# --------------------------------------------------------------------------- running


async def _run_scenarios(
    stack: sandbox.Stack,
    counts: Counts,
    quick: bool,
    names: Sequence[str],
    results: list[Result],
    repeat: int = 1,
) -> None:
    async with Context.open(stack, counts, quick) as ctx:
        for name in names:
            runs: list[Result] = []
            try:
                for _ in range(repeat):
                    runs.append(await _run_one(ctx, SCENARIOS[name]))
            finally:  # interrupted: the runs that finished still count
                if runs:
                    results.append(median_of(runs))


async def _run_one(ctx: Context, module: ModuleType) -> Result:
    print(f"\n== {module.NAME}: {module.TITLE}", flush=True)
    meter = ResourceMeter(ctx.pids)
    meter.start()

    async def follow() -> None:
        while True:
            await asyncio.sleep(0.5)
            meter.poll()

    follower = asyncio.create_task(follow())
    t0 = time.monotonic()
    try:
        result: Result = await module.run(ctx)
    except asyncio.CancelledError:
        result = Result(module.NAME, module.TITLE, status="interrupted")
        raise
    except Exception as exc:
        result = Result(module.NAME, module.TITLE, status="error")
        result.notes.append(f"{type(exc).__name__}: {exc}")
        print(f"error in {module.NAME}: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    result.elapsed_s = time.monotonic() - t0
    cpu = meter.stop()
    result.resources = {
        "cpu_ms": {k: round(v, 1) for k, v in cpu.items()},
        "system_cpu_ms": round(system_cpu_ms(cpu), 1),
        "rss_mb": {
            name: round(memory_kb(pid).get("VmRSS", 0) / 1024, 1)
            for name, pid in ctx.pids().items()
        },
        "peak_rss_mb": {
            name: round(memory_kb(pid).get("VmHWM", 0) / 1024, 1)
            for name, pid in ctx.pids().items()
        },
    }
    ctx.results[result.name] = result
    for fig in result.figures:
        mark = {"met": "  [ok]", "missed": "  [MISSED]"}.get(fig.verdict, "")
        print(f"   {fig.label}: {report.fmt(fig.value)} {fig.unit}{mark}", flush=True)
    for note in result.notes:
        print(f"   note: {note}", flush=True)
    print(f"   ({result.elapsed_s:.1f} s)", flush=True)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run Conveyor's benchmark scenarios on this machine and save the figures.",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"scenarios to run (default: all): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts (a smoke run of about a minute)"
    )
    parser.add_argument(
        "--out", type=Path, help="the JSON file (default: bench/results/<UTC time>.json)"
    )
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=int(os.environ.get("CONVEYOR_WORKER_CONCURRENCY", "1000")),
        help="calls one worker process holds (its prefetch; default 1000)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each scenario N times; the table gives each figure's median (default 1)",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as Markdown (for the README)"
    )
    parser.add_argument(
        "--show", type=Path, metavar="FILE", help="print the table of a results file; run nothing"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat takes a whole number from 1")
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "compare":
        from bench import compare  # here: compare imports this module

        return compare.main(argv[1:])
    args = parse_args(argv)
    if args.show is not None:
        machine_info, saved = report.load(args.show)
        print(f"Conveyor benchmark — {report.describe_machine(machine_info)}")
        print(report.table(saved, markdown=args.markdown))
        return 0
    names = list(dict.fromkeys(args.scenarios)) or list(SCENARIOS)
    counts = Counts.quick() if args.quick else Counts()
    started_at = datetime.now(UTC)
    out: Path = args.out or RESULTS_DIR / f"{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    for line in clean_leftovers():
        print(f"leftover of an earlier run: {line}")
    for name in [k for k in os.environ if k.startswith("SIM_")]:
        del os.environ[name]  # the simulator is configured through /control only

    machine_info = report.machine(ROOT)
    print(f"machine: {report.describe_machine(machine_info)}", flush=True)
    config: dict[str, Any] = {
        "scenarios": names,
        "quick": args.quick,
        "counts": dataclasses.asdict(counts),
        "worker_concurrency": args.worker_concurrency,
        "repeat": args.repeat,
        "pid": os.getpid(),
    }
    results: list[Result] = []
    interrupted = False
    cleanup = contextlib.ExitStack()
    try:
        stack = cleanup.enter_context(bench_stack(args.worker_concurrency, args.quick))
        config["vhost"] = stack.backing.vhost
        config["env"] = {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith("CONVEYOR_") and "URL" not in k
        }
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_run_scenarios(stack, counts, args.quick, names, results, args.repeat))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping what the benchmark started ...", file=sys.stderr, flush=True)
    finally:
        with signals_ignored():
            cleanup.close()

    print()
    print(f"Conveyor benchmark — {report.describe_machine(machine_info)}")
    print(report.table(results, markdown=args.markdown))
    report.write_json(
        out,
        machine_info=machine_info,
        config=config,
        results=results,
        started_at=started_at,
        interrupted=interrupted,
    )
    print(f"\nfigures written to {out}")
    if interrupted:
        return 130
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
