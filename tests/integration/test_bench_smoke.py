"""The benchmark harness still works: `python -m bench --quick` runs every scenario on
tiny counts against its own stack and writes a well-formed results file.

The figures themselves are never asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["submit", "end-to-end", "storm", "streaming", "backlog", "cost"]


def run_module(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`python -m <args>` from the project root; it must succeed."""
    # The bench makes its own stack: none of this session's settings (nor its tracing).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "SIM_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.timeout(300)
def test_a_quick_bench_run_writes_a_well_formed_results_file(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = run_module("bench", "--quick", "--out", str(out), *SCENARIOS, timeout_s=280)
    assert "scenario" in done.stdout and str(out) in done.stdout  # the table, the file

    doc = json.loads(out.read_text())
    assert doc["format"] == "conveyor-bench/1"
    assert doc["interrupted"] is False
    machine = doc["machine"]
    for key in ("cpu", "cores", "memory_gib", "kernel", "python", "rabbitmq", "postgres"):
        assert machine[key], key
    assert doc["config"]["quick"] is True
    assert list(doc["scenarios"]) == SCENARIOS
    for name, scenario in doc["scenarios"].items():
        assert scenario["status"] in ("ok", "skipped"), (name, scenario["notes"])
        if scenario["status"] == "skipped":
            continue
        assert scenario["figures"], name
        for fig in scenario["figures"]:
            assert set(fig) >= {"label", "value", "unit", "target", "verdict"}
            assert fig["verdict"] in ("met", "missed", "")
        cpu = scenario["resources"]["cpu_ms"]
        assert {"gateway", "rabbitmq", "postgres", "client", "wall"} <= set(cpu), name

    # The submit runs use h2load when it is installed, Python clients in any case.
    expected = ["h2load", "python"] if shutil.which("h2load") else ["python"]
    assert doc["scenarios"]["submit"]["extra"]["load_generators"] == expected

    # The run stopped what it started and removed its vhost.
    vhosts = subprocess.run(
        ["rabbitmqctl", "-q", "list_vhosts", "name"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [v for v in vhosts if v.startswith(f"conveyor-bench-{_bench_pid(doc)}-")]


def _bench_pid(doc: dict[str, object]) -> str:
    """The pid the run put in its vhost's name (recorded in the results file)."""
    config = doc["config"]
    assert isinstance(config, dict)
    return str(config["pid"])


@pytest.mark.timeout(300)
def test_the_floor_measurements_run_and_write_their_figures(tmp_path: Path) -> None:
    out = tmp_path / "floors.json"
    run_module("bench.floors", "--calls", "300", "--out", str(out), timeout_s=280)
    doc = json.loads(out.read_text())
    figures = doc["us"]
    assert any(k.startswith("grpc.aio server") for k in figures)
    assert any(k.startswith("Postgres") for k in figures)
    assert any(k.startswith("loopback round trip") for k in figures)
    # Postgres and RabbitMQ are read in clock ticks (10 ms): a few statements may show 0.
    negative = {name: value for name, value in figures.items() if value < 0}
    assert not negative, negative
    assert figures["grpc.aio client (Python), CPU per call"] > 0

    # The latency targets' paths, built from the blocks alone (bench.latency_floors).
    latency = doc["latency"]
    for name in (
        "answer at once",
        "grouped INSERT, then answer",
        "grouped INSERT, answer, the group's confirmed publish",
    ):
        submit = latency["submit"][name]
        assert submit["errors"] == {}, (name, submit)
        assert submit["latency_ms"]["count"] > 0, name
        # What each call cost: the servers' CPU, and the whole machine's.
        cpu = submit["cpu"]
        assert cpu["servers"] > 0 and cpu["machine"] > 0, (name, cpu)
        assert 0 < cpu["machine_busy"] <= 1, (name, cpu)
    chain = latency["chain"]
    assert chain["finished"] == chain["jobs"], "every job of the chain was run and finished"
    assert chain["overhead_ms"]["p50"] > 0
    # The model call's own part of it, timed by the chain's worker for every job.
    assert chain["model_call_ms"]["count"] == chain["jobs"]
    assert 0 < chain["model_call_ms"]["p50"] < chain["overhead_ms"]["p50"] + 1_000


@pytest.mark.timeout(600)
def test_conveyor_and_its_latency_floors_are_measured_alternately_in_one_run(
    tmp_path: Path,
) -> None:
    out = tmp_path / "against-floors.json"
    run_module("bench.against_floors", "--quick", "--pairs", "1", "--out", str(out), timeout_s=580)
    doc = json.loads(out.read_text())
    (pair,) = doc["pairs"]
    conveyor = pair["conveyor"]
    assert conveyor["submit_errors"] == {}, conveyor["submit_errors"]
    assert conveyor["submit"]["count"] > 0
    assert conveyor["overhead"]["count"] == conveyor["finished"] > 0, "every paced job finished"
    assert pair["floors"]["chain"]["finished"] == pair["floors"]["chain"]["jobs"]
    figures = [row["figure"] for row in doc["table"]]
    assert figures == [
        "SubmitJob offered 1,000/s: p50",
        "SubmitJob offered 1,000/s: p99",
        "… CPU per call, whole machine",
        "… of which the servers (gateway)",
        "… how busy the machine was",
        "overhead at 50 jobs/s: p50",
        "overhead at 50 jobs/s: p99",
        "… of which queue wait: p50",
    ]
    for row in doc["table"]:
        assert row["floor"] > 0 and row["conveyor"] > 0, row
        assert len(row["ratios"]) == 1, row
    # The gateway's CPU is read from its processes, the machine's from /proc/stat.
    cpu = conveyor["submit_cpu"]
    assert cpu["servers"] > 0 and cpu["machine"] > 0, cpu
