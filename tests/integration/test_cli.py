"""The `conveyor` command on the real stack, run as a user runs it: readable tables and
`--json` with numbers as numbers; a bulk submit from a file; bulk actions in batches;
schedules and lanes; exit codes 2 (invalid input), 3 (server fault) and 4 (refused),
with nothing written when a command is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.db.admin import create_api_key
from conveyor.v1 import jobs_pb2
from tests.conftest import finished
from tests.stack import Backing, Stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "claude-sonnet-4-5"
FAST = ["--label", "x-sim-latency-ms=0", "--label", "x-sim-tokens=3"]


class Cli:
    """`conveyor ...` for one tenant's key against the test stack."""

    def __init__(self, stack: Stack, key: str) -> None:
        self.stack, self.key = stack, key

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CONVEYOR_API_KEY": self.key, "PYTHONPATH": str(ROOT)}
        return subprocess.run(
            # --gateway before the command: one after it (a test's own) wins
            [sys.executable, "-m", "conveyor.cli", "--gateway", self.stack.gateway, *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )


@pytest.fixture
async def tenant() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def key(db: AsyncEngine, tenant: str) -> str:
    made, _ = await create_api_key(db, tenant, "cli", "member")
    return made


@pytest.fixture
def conveyor(stack: Stack, key: str) -> Cli:
    return Cli(stack, key)


@pytest.fixture
async def tenant_client(stack: Stack, key: str) -> ConveyorClient:
    return ConveyorClient(stack.gateway, stack.notifier, api_key=key)


async def _statuses(db: AsyncEngine, tenant: str) -> dict[str, int]:
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT status, count(*) AS n FROM jobs WHERE tenant = :t GROUP BY status"),
            {"t": tenant},
        )
        return {r.status: int(r.n) for r in rows}


async def test_stats_prints_a_table_per_lane_and_json_with_numbers(
    conveyor: Cli, tenant_client: ConveyorClient, tenant: str
) -> None:
    job = conveyor("submit", "Hi", "--lane", "bulk", *FAST).stdout.strip()
    await finished(tenant_client, job)

    table = conveyor("stats")
    doc = json.loads(conveyor("stats", "--json").stdout)

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].strip() == f"Jobs (tenant {tenant})"
    bulk = next(line.split() for line in lines if line.split()[:1] == ["bulk"])
    header = lines[1].split()
    assert bulk[header.index("SUCCEEDED")] == "1"
    assert doc["tenant"] == tenant and doc["counts"]["succeeded"] == 1
    assert isinstance(doc["dead_letter_depth"], int) and isinstance(
        doc["tokens"]["output_tokens"], int
    )
    assert [lane["counts"].get("succeeded") for lane in doc["lanes"] if lane["lane"] == "bulk"] == [
        1
    ]


async def test_list_prints_a_table_and_json(conveyor: Cli, tenant_client: ConveyorClient) -> None:
    ids = [conveyor("submit", f"n{i}", "--priority", "3", *FAST).stdout.strip() for i in range(2)]

    table = conveyor("list").stdout.splitlines()
    doc = json.loads(conveyor("list", "--json").stdout)

    assert table[0].split()[:3] == ["ID", "STATUS", "LANE"]
    assert {line.split()[0] for line in table[1:]} == set(ids)
    assert {j["id"] for j in doc} == set(ids) and {j["priority"] for j in doc} == {3}
    for job_id in ids:
        await finished(tenant_client, job_id)


async def test_submit_from_a_file_submits_every_line_in_order(
    conveyor: Cli, tenant_client: ConveyorClient, tmp_path: Path
) -> None:
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "body"}]}
    lines = [json.dumps("first"), "", json.dumps(body), json.dumps("third")]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")

    done = conveyor("submit", "--from-file", str(path), "--lane", "bulk", *FAST)

    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    jobs = [await finished(tenant_client, i) for i in ids]
    prompts = [json.loads(j.request_json)["messages"][0]["content"] for j in jobs]
    assert prompts == ["first", "body", "third"]
    assert {j.lane for j in jobs} == {"bulk"} and {j.status for j in jobs} == {
        jobs_pb2.JOB_STATUS_SUCCEEDED
    }


async def test_a_bad_line_in_the_file_exits_2_and_submits_nothing(
    conveyor: Cli, db: AsyncEngine, tenant: str, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps("fine") + "\n{not json\n")

    done = conveyor("submit", "--from-file", str(path))

    assert done.returncode == 2 and "line 2" in done.stderr and done.stdout == ""
    assert await _statuses(db, tenant) == {}


async def test_exit_codes_say_invalid_input_refused_or_server_fault(
    conveyor: Cli, stack: Stack, key: str, db: AsyncEngine, tenant: str
) -> None:
    invalid = conveyor("submit", "Hi", "--lane", "no-such-lane")
    missing = conveyor("get", str(uuid.uuid4()))
    refused = conveyor("stats", "--all-tenants")
    down = Cli(stack, key)("get", str(uuid.uuid4()), "--gateway", "127.0.0.1:1")

    assert invalid.returncode == 2 and invalid.stderr.startswith("error: INVALID_ARGUMENT")
    assert missing.returncode == 4 and missing.stderr.startswith("error: NOT_FOUND")
    assert refused.returncode == 4 and refused.stderr.startswith("error: PERMISSION_DENIED")
    assert down.returncode == 3 and down.stderr.startswith("error: UNAVAILABLE")
    assert await _statuses(db, tenant) == {}, "nothing written"


async def test_bulk_cancel_needs_yes_then_cancels_in_batches(
    conveyor: Cli, db: AsyncEngine, tenant: str
) -> None:
    for i in range(5):
        assert conveyor("submit", f"later {i}", "--delay", "3600").returncode == 0

    dry = conveyor("bulk", "cancel", "--dry-run", "--json")
    unasked = conveyor("bulk", "cancel")
    assert await _statuses(db, tenant) == {"scheduled": 5}, "nothing changed yet"
    done = conveyor("bulk", "cancel", "--batch", "2", "--yes", "--json")

    assert json.loads(dry.stdout)["matched"] == 5
    assert unasked.returncode == 2 and "--yes" in unasked.stderr
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["changed"] == 5 and len(result["action_ids"]) == 3, "batches of 2, 2, 1"
    assert await _statuses(db, tenant) == {"cancelled": 5}


async def test_schedules_and_lane_pauses_are_listed_as_tables(conveyor: Cli, tenant: str) -> None:
    made = conveyor("schedules", "create", "Nightly digest", "--cron", "0 3 * * *",
                    "--time-zone", "Europe/Paris", "--name", "digest", "--paused")  # fmt: skip
    assert made.returncode == 0, made.stderr
    schedule_id = made.stdout.strip()
    paused = conveyor("lanes", "pause", "bulk", "--reason", "provider down")

    schedules = conveyor("schedules", "list").stdout.splitlines()
    as_json = json.loads(conveyor("schedules", "list", "--json").stdout)
    pauses = conveyor("lanes", "list").stdout.splitlines()
    resumed = conveyor("lanes", "resume", "bulk")
    top = conveyor("top", "--iterations", "2", "--interval", "0.2")

    assert schedules[0].split()[:3] == ["ID", "NAME", "WHEN"]
    assert schedules[1].split()[:3] == [schedule_id, "digest", "0"]
    assert "Europe/Paris" in schedules[1] and "paused" in schedules[1]
    assert [s["id"] for s in as_json] == [schedule_id] and as_json[0]["paused"] is True
    assert paused.returncode == 0 and pauses[1].split()[:2] == ["bulk", tenant]
    assert resumed.stdout.strip() == "lane bulk resumed"
    assert top.returncode == 0, top.stderr
    assert "LANE" in top.stdout and "DONE/S" in top.stdout
    assert conveyor("schedules", "delete", schedule_id).returncode == 0


async def test_operator_lists_are_tables_and_json_on_the_database(
    backing: Backing, tenant: str
) -> None:
    env = {**os.environ, "CONVEYOR_DATABASE_URL": backing.database_url, "PYTHONPATH": str(ROOT)}

    def operator(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "conveyor.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )

    key = operator("keys", "create", "--tenant", tenant, "--name", "ci-lists").stdout.strip()
    limited = operator("tenants", "set", tenant, "--max-running", "5")
    keys = json.loads(operator("keys", "list", "--tenant", tenant, "--json").stdout)
    tenants = json.loads(operator("tenants", "list", "--json").stdout)
    table = operator("tenants", "list").stdout.splitlines()
    bad = operator("tenants", "set", tenant, "--max-running", "-1")
    budgeted = operator(
        "tenants", "set", tenant, "--daily-budget-usd", "2.5", "--monthly-budget-usd", "40"
    )
    bad_budget = operator("tenants", "set", tenant, "--daily-budget-usd", "-1")
    budgets = json.loads(operator("tenants", "list", "--json").stdout)

    assert key.startswith("cvk_") and limited.returncode == 0, limited.stderr
    assert [(k["tenant"], k["name"], k["role"]) for k in keys] == [(tenant, "ci-lists", "member")]
    assert key not in json.dumps(keys), "never the key itself"
    [row] = [t for t in tenants if t["tenant"] == tenant]
    assert row["max_running"] == 5, "a number"
    assert table[0].split()[:3] == ["TENANT", "SUBMIT/MIN", "MAX"]
    assert any(line.split()[:1] == [tenant] for line in table[1:])
    assert bad.returncode == 2 and "--max-running" in bad.stderr
    assert budgeted.returncode == 0, budgeted.stderr
    assert "daily_budget_usd=2.5 monthly_budget_usd=40" in budgeted.stdout
    [with_budget] = [t for t in budgets if t["tenant"] == tenant]
    assert (with_budget["daily_budget_micros"], with_budget["monthly_budget_micros"]) == (
        2_500_000,
        40_000_000,
    )
    assert bad_budget.returncode == 2 and "--daily-budget-usd" in bad_budget.stderr
    after = json.loads(operator("tenants", "list", "--json").stdout)
    assert [t for t in after if t["tenant"] == tenant] == [with_budget], "unchanged"
