"""`conveyor submit --watch` and `conveyor watch`, run as a user runs them, against the stack:
tokens stream for one job, a table follows many, and the exit code is the final status."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from conveyor.client import ConveyorClient
from tests.stack import Stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "claude-sonnet-4-5"


async def conveyor(stack: Stack, api_key: str, *args: str) -> tuple[int, str, str]:
    """Run the `conveyor` command; its exit code, stdout and stderr."""
    env = {**os.environ, "CONVEYOR_API_KEY": api_key, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conveyor.cli",
        "--gateway",
        stack.gateway,
        "--notifier",
        stack.notifier,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_submit_watch_streams_the_text_and_exits_0_on_success(
    stack: Stack, api_key: str, client: ConveyorClient
) -> None:
    code, out, err = await conveyor(
        stack, api_key, "submit", "Hello there", "--watch", "--label", "x-sim-tokens=12"
    )

    assert code == 0, err
    job_id = err.splitlines()[0].removeprefix("job ").strip()
    done = await client.get(job_id)
    assert out.strip() == done.result_text.strip()
    assert "succeeded" in err


async def test_submit_watch_exits_1_when_the_job_fails(
    stack: Stack, api_key: str, client: ConveyorClient
) -> None:
    code, _, err = await conveyor(
        stack, api_key, "submit", "doomed", "--watch", "--label", "x-sim-fail=400"
    )

    assert code == 1, err
    job_id = err.splitlines()[0].removeprefix("job ").strip()
    assert (await client.get(job_id)).error.code == "invalid_request_error"


async def test_watch_of_many_jobs_prints_a_table_and_exits_with_the_worst_status(
    stack: Stack, api_key: str, client: ConveyorClient
) -> None:
    good = [await client.submit(MODEL, f"fine {i}", max_tokens=16) for i in range(2)]
    bad = await client.submit(MODEL, "bad", max_tokens=16, labels={"x-sim-fail": "400"})
    ids = [j.id for j in [*good, bad]]

    code, out, err = await conveyor(stack, api_key, "watch", *ids)

    assert code == 1, err
    table = out.strip().splitlines()[-4:]
    assert table[0].split() == ["ID", "STATUS", "ATTEMPT", "TOKENS", "ELAPSED", "NOTE"]
    statuses = {line.split()[0]: line.split()[1] for line in table[1:]}
    assert statuses == {good[0].id: "succeeded", good[1].id: "succeeded", bad.id: "failed"}
