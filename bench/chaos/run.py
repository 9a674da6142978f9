"""The run: the faults by name, each in turn against one private stack, and the command line."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp

from bench.__main__ import raise_keyboard_interrupt, signals_ignored
from devtools import sandbox

from .faults import broker_loss, broker_outage, database_restart, worker_kill
from .leftovers import RUN_ROOT, SERVERS_PREFIX, clean_leftovers
from .notifier_kill import notifier_kill
from .results import Row, table
from .rig import CHAOS_ENV, TEARDOWN_RESERVE_S, Chaos

TIME_LIMIT_S = 570.0
"""The whole run, setup included, stays under 10 minutes: a scenario gets what is left."""


Scenario = Callable[[Chaos], Awaitable[Row]]
SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "worker-kill": ("kill -9 of a worker", worker_kill),
    "broker-outage": ("broker outage", broker_outage),
    "database-restart": ("database restart", database_restart),
    "notifier-kill": ("notifier kill", notifier_kill),
    "broker-loss": ("broker loss", broker_loss),
}


async def run_scenarios(
    stack: sandbox.Stack,
    pg: sandbox.PrivatePostgres,
    rabbit: sandbox.PrivateRabbit,
    names: Sequence[str],
    deadline: float,
    rows: list[Row],
) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        chaos = Chaos(stack, pg, rabbit, http, deadline)
        sampler = asyncio.create_task(chaos.sample_in_flight())
        try:
            for name in names:
                title, scenario = SCENARIOS[name]
                if time.monotonic() > deadline - TEARDOWN_RESERVE_S - 20:
                    row = Row(title, failures=["not run: the time limit was reached"])
                    rows.append(row)
                    continue
                print(f"\n== {title}", flush=True)
                t0 = time.monotonic()
                try:
                    row = await scenario(chaos)
                except Exception as exc:
                    row = Row(title, failures=[f"error: {type(exc).__name__}: {exc}"])
                row.elapsed_s = time.monotonic() - t0
                row.check()
                rows.append(row)
                for note in row.notes:
                    print(f"   {note}", flush=True)
                for failure in row.failures:
                    print(f"   FAILED: {failure}", flush=True)
                print(f"   ({row.elapsed_s:.1f} s)", flush=True)
                for service in ("worker", "notifier"):  # a failed scenario may leave one down
                    if stack.pid(service) is None:
                        try:
                            await chaos.start(service)
                        except Exception as exc:  # the next scenario fails on its own
                            print(f"   could not restart the {service}: {exc}", flush=True)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description="Inject faults into a Conveyor of its own and check that no job is lost"
        " or run twice.",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="FAULT",
        help=f"faults to inject (default: all, in this order): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown fault {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(dict.fromkeys(args.scenarios)) or list(SCENARIOS)
    deadline = time.monotonic() + TIME_LIMIT_S
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    for line in clean_leftovers():
        print(f"leftover of an earlier run: {line}")
    for name in [k for k in os.environ if k.startswith("SIM_")]:
        del os.environ[name]
    rows: list[Row] = []
    interrupted = False
    cleanup = contextlib.ExitStack()
    atexit.register(cleanup.close)  # also on an exit this function does not see through
    try:
        servers = Path(f"/tmp/{SERVERS_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}")
        print("starting a private RabbitMQ node and Postgres cluster ...", flush=True)
        backing, pg, rabbit = cleanup.enter_context(
            sandbox.private_backing(servers, f"chaos-{os.getpid()}")
        )
        stack = sandbox.Stack(backing, RUN_ROOT / str(os.getpid()), CHAOS_ENV)
        cleanup.callback(stack.stop_all)
        print(
            f"RabbitMQ {rabbit.node} on port {rabbit.port}, Postgres on port {pg.port};"
            f" service logs in {stack.run.path}",
            flush=True,
        )
        stack.start_all()
        asyncio.run(run_scenarios(stack, pg, rabbit, names, deadline, rows))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping what chaos started ...", file=sys.stderr, flush=True)
    except Exception as exc:  # setup failed: still clean up and report
        print(f"chaos could not run: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        rows.append(Row("setup", failures=[f"{type(exc).__name__}: {exc}"]))
    finally:
        with signals_ignored():
            cleanup.close()
    print()
    print(table(rows, markdown=args.markdown))
    for row in rows:
        for failure in row.failures:
            print(f"FAILED {row.fault}: {failure}")
    print(f"\n({TIME_LIMIT_S - (deadline - time.monotonic()):.0f} s in all)")
    if interrupted:
        return 130
    return 0 if rows and all(r.ok for r in rows) and len(rows) == len(names) else 1
