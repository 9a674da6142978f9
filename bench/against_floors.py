"""against_floors: Conveyor's two latency figures of issue 19 and their floors, measured
alternately in one run, so that "the floor bounds the miss" is a ratio of one run and
not a comparison of two runs an hour apart (these machines drift by ±30% within an hour).

Each pair runs `bench.latency_floors` (the bare blocks chained as the job's path
chains them) and then the same two loads against a Conveyor stack started once for
the whole run (the bench's stack, `bench.__main__`):

- SubmitJob offered 1,000/s, the same calls from the same load generator (h2load when
  installed, else Python clients) against the floor's servers and the gateway;
- a job's overhead at 50 jobs/s with a 1,000 ms model (finished − created − 1,000 ms,
  from the database's clock), `bench end-to-end`'s paced run, against the floor's chain.

It prints each figure's median for both, and Conveyor ÷ floor pair by pair, and writes
`bench/results/against-floors-<UTC>.json`.

    python -m bench.against_floors [--pairs 3] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import uvloop

from bench import end_to_end, h2load, latency_floors, report
from bench.__main__ import bench_stack
from bench.floors import simulator_backing
from bench.harness import Context, Counts, ResourceMeter, submit_load, summarize
from bench.result import Result
from devtools import sandbox

ROOT = Path(__file__).resolve().parent.parent
SUBMIT_FLOOR = latency_floors.SUBMIT_MODES[-1]
"""The submit floor that does what SubmitJob must: grouped INSERT, answer, confirmed publish."""
FIGURES = (
    ("SubmitJob offered 1,000/s: p50", "submit", "p50", "ms"),
    ("SubmitJob offered 1,000/s: p99", "submit", "p99", "ms"),
    ("… CPU per call, whole machine", "submit_cpu", "machine", "ms"),
    ("… of which the servers (gateway)", "submit_cpu", "servers", "ms"),
    ("… how busy the machine was", "submit_cpu", "machine_busy", "%"),
    ("overhead at 50 jobs/s: p50", "overhead", "p50", "ms"),
    ("overhead at 50 jobs/s: p99", "overhead", "p99", "ms"),
    ("… of which queue wait: p50", "queue_wait", "p50", "ms"),
)
"""(label, figure, statistic, unit) of each row of the table."""


async def conveyor_figures(ctx: Context, calls: int, jobs: int) -> dict[str, Any]:
    """Conveyor under the floors' two loads: SubmitJob latencies (ms) at 1,000/s, then
    the overhead and queue wait distributions (ms) of `jobs` jobs at 50/s."""
    await ctx.reset(worker=False)
    rate, clients = latency_floors.SUBMIT_RATE, latency_floors.CLIENTS
    meter = ResourceMeter(ctx.pids())
    meter.start()
    if h2load.available():
        load = await h2load.submit_load(
            ctx.gateway, ctx.request(label="floors-submit"), calls, clients, rate=rate
        )
    else:
        requests = [ctx.request(label="floors-submit") for _ in range(calls)]
        load = await submit_load(ctx.gateway, requests, clients, rate=rate)
    cpu = latency_floors.submit_cpu(meter.stop(), calls, ["gateway"])
    paced = await end_to_end._paced(
        ctx, Result("against-floors", ""), latency_floors.CHAIN_RATE, jobs, judged=False
    )
    dist = cast(dict[str, dict[str, float]], paced["distributions_ms"])
    statuses = cast(dict[str, int], paced["statuses"])
    return {
        "submit": summarize(load.latencies_s, 1000.0),
        "submit_achieved_per_s": load.jobs_per_s,
        "submit_errors": load.errors,
        "submit_cpu": cpu,
        "overhead": dist["overhead"],
        "queue_wait": dist["queue_wait"],
        "finished": statuses.get("succeeded", 0),
    }


def floor_figures(floors: dict[str, Any]) -> dict[str, Any]:
    """The floors' figures under the names `conveyor_figures` uses."""
    chain = floors["chain"]
    return {
        "submit": floors["submit"][SUBMIT_FLOOR]["latency_ms"],
        "submit_cpu": floors["submit"][SUBMIT_FLOOR]["cpu"],
        "overhead": chain["overhead_ms"],
        "queue_wait": chain["queue_wait_ms"],
        "model_call": chain["model_call_ms"],
    }


async def measure(
    backing: sandbox.Backing, simulator: str, stack: sandbox.Stack, pairs: int, quick: bool
) -> list[dict[str, Any]]:
    calls = 300 if quick else 5_000
    jobs = min(500, max(20, calls // 10))
    processes = int(os.environ.get("CONVEYOR_GATEWAY_PROCESSES", str(os.cpu_count() or 1)))
    runs: list[dict[str, Any]] = []
    async with Context.open(stack, Counts.quick() if quick else Counts(), quick) as ctx:
        # Unmeasured: the gateway registers the bench's tenant and declares its queues on
        # its first submits, the services' pools fill; a floor server has nothing to warm.
        await conveyor_figures(ctx, min(calls, 1_000), 20)
        for pair in range(pairs):
            print(f"pair {pair + 1} of {pairs}: floors ...", flush=True)
            floors = await latency_floors.measure(backing, simulator, calls, jobs, processes)
            print(f"pair {pair + 1} of {pairs}: Conveyor ...", flush=True)
            conveyor = await conveyor_figures(ctx, calls, jobs)
            runs.append({"floors": floors, "floor": floor_figures(floors), "conveyor": conveyor})
    return runs


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per figure: the floor's and Conveyor's medians over the pairs, and each pair's ratio."""
    rows = []
    for label, key, stat, unit in FIGURES:
        floor = [r["floor"][key].get(stat, float("nan")) for r in runs]
        ours = [r["conveyor"][key].get(stat, float("nan")) for r in runs]
        rows.append(
            {
                "figure": label,
                "unit": unit,
                "floor": statistics.median(floor),
                "conveyor": statistics.median(ours),
                "ratios": [o / f if f else float("nan") for o, f in zip(ours, floor, strict=True)],
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'figure':36} {'floor':>10} {'Conveyor':>10}  Conveyor ÷ floor, pair by pair")
    for row in rows:
        ratios = ", ".join(f"{r:.2f}" for r in row["ratios"])
        print(
            f"{row['figure']:36} {_value(row['floor'], row['unit'])} "
            f"{_value(row['conveyor'], row['unit'])}  "
            f"{statistics.median(row['ratios']):.2f} ({ratios})"
        )


def _value(value: float, unit: str) -> str:
    return f"{value:9.0%} " if unit == "%" else f"{value:7.3g} ms"


def print_model_call(runs: list[dict[str, Any]]) -> None:
    """What the floor's model call alone took beyond the model's latency: a part of the
    overhead floor that no job system can avoid with this SDK and this simulator."""
    call = statistics.median(r["floor"]["model_call"].get("p50", float("nan")) for r in runs)
    print(
        f"In the overhead floor, the model call itself (the SDK's streamed request to the"
        f" simulator) took {call:.2f} ms beyond its {latency_floors.MODEL_LATENCY_MS:g} ms"
        " (p50, median of the pairs)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.against_floors", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--pairs", type=int, default=3, help="floor, Conveyor pairs (default 3)")
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument(
        "--out", type=Path, help="the JSON file (default: bench/results/against-floors-<UTC>.json)"
    )
    args = parser.parse_args(argv)
    machine = report.machine(ROOT)
    generator = "h2load" if h2load.available() else "Python clients"
    with simulator_backing() as (backing, simulator), bench_stack(1_000, args.quick) as stack:
        runs = uvloop.run(measure(backing, simulator, stack, args.pairs, args.quick))
    rows = table(runs)
    print(f"\nConveyor against its latency floors — {report.describe_machine(machine)}")
    print(f"SubmitJob load generator: {generator}; {args.pairs} pairs, floor first in each")
    print_table(rows)
    print_model_call(runs)
    out = args.out or (
        ROOT / "bench" / "results" / f"against-floors-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    )
    out.write_text(
        json.dumps(
            {"machine": machine, "load_generator": generator, "table": rows, "pairs": runs},
            indent=1,
        )
    )
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
