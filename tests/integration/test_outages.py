"""Crash safety under outages of the backing services: no accepted job is lost.

These stop and start the machine's RabbitMQ application and restart Postgres, so
they run only against the local servers (not containers) and restore them in
every case.
"""

from __future__ import annotations

import asyncio
import glob
import subprocess

import pytest

from conveyor.client import ConveyorClient, ConveyorError
from conveyor.v1 import jobs_pb2
from devtools.sandbox import rabbitmqctl
from tests.stack import Backing

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"


@pytest.fixture(autouse=True)
def _local_only(backing: Backing) -> None:
    if not backing.local:
        pytest.skip("outage tests stop the local servers; containers are not restarted")


async def _submit_steadily(
    client: ConveyorClient, count: int, accepted: list[str], refused: list[str]
) -> None:
    for i in range(count):
        try:
            job = await client.submit(MODEL, f"outage {i}", max_tokens=8)
            accepted.append(job.id)
        except ConveyorError as exc:
            refused.append(exc.code.name)
        await asyncio.sleep(0.02)


def _pg_restart() -> None:
    version = sorted(glob.glob("/etc/postgresql/*"))[-1].rsplit("/", 1)[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        timeout=120,
    )


async def test_jobs_accepted_while_rabbitmq_is_down_still_run(client: ConveyorClient) -> None:
    accepted: list[str] = []
    refused: list[str] = []
    submitting = asyncio.create_task(_submit_steadily(client, 150, accepted, refused))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(rabbitmqctl, "stop_app")
    try:
        await asyncio.sleep(2)
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
    await submitting
    assert refused == [], "with Postgres up, every job is made durable and accepted"
    finished = await asyncio.gather(*(client.wait(j, 120) for j in accepted))
    assert [j.status for j in finished] == [jobs_pb2.JOB_STATUS_SUCCEEDED] * len(accepted)
    print(f"rabbitmq outage: {len(accepted)} accepted, all succeeded")


async def test_a_postgres_restart_under_load_loses_no_accepted_job(client: ConveyorClient) -> None:
    accepted: list[str] = []
    refused: list[str] = []
    submitting = asyncio.create_task(_submit_steadily(client, 150, accepted, refused))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(_pg_restart)
    await submitting
    assert set(refused) <= {"UNAVAILABLE"}, "a job that cannot be made durable is refused, clearly"

    async def settled() -> list[jobs_pb2.Job]:
        while True:
            try:
                return list(await asyncio.gather(*(client.wait(j, 120) for j in accepted)))
            except ConveyorError:  # the gateway's pool may still be reconnecting
                await asyncio.sleep(0.5)

    finished = await asyncio.wait_for(settled(), 150)
    assert [j.status for j in finished] == [jobs_pb2.JOB_STATUS_SUCCEEDED] * len(accepted)
    print(
        f"postgres restart: {len(accepted)} accepted, {len(refused)} refused, all accepted succeeded"
    )
