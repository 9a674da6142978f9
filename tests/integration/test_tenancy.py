"""Tenants are kept apart: every call needs a key, acts for the key's tenant, and another
tenant's job is NOT_FOUND, never its data. Operators alone read every tenant's
statistics and the shared queues' depths; a tenant's admin sees its own tenant only. The
keys are managed with `conveyor keys`, and the job history names who did what. An
anonymous tenant stays on loopback listeners."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import aio_pika
import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.broker import DEAD_LETTER_QUEUE
from conveyor.client import (
    ConveyorClient,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from conveyor.db.admin import create_api_key
from conveyor.v1 import jobs_pb2, jobs_pb2_grpc
from devtools import devstack
from tests.conftest import TenantClient, count_jobs, eventually, finished
from tests.stack import Backing, Stack, free_port

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
ROOT = Path(__file__).resolve().parents[2]


async def _statuses(db: AsyncEngine, tenant: str) -> list[str]:
    async with db.connect() as conn:
        result = await conn.execute(
            sa.text("SELECT status FROM jobs WHERE tenant = :t"), {"t": tenant}
        )
        return list(result.scalars())


async def test_a_call_without_a_key_or_with_a_wrong_one_is_unauthenticated(
    stack: Stack, db: AsyncEngine, client: ConveyorClient
) -> None:
    mine = await client.submit(MODEL, "mine", max_tokens=8)
    before = await count_jobs(db)
    async with ConveyorClient(stack.gateway, stack.notifier, api_key="") as anonymous:
        with pytest.raises(Unauthenticated):
            await anonymous.submit(MODEL, "no key", max_tokens=8)
        with pytest.raises(Unauthenticated):
            await anonymous.get(mine.id)
        with pytest.raises(Unauthenticated):
            async for _ in anonymous.watch(mine.id, resume=False):
                pass
    wrong_key = "cvk_" + uuid.uuid4().hex
    async with ConveyorClient(stack.gateway, stack.notifier, api_key=wrong_key) as wrong:
        with pytest.raises(Unauthenticated):
            await wrong.submit(MODEL, "wrong key", max_tokens=8)
        with pytest.raises(Unauthenticated):
            await wrong.cancel(mine.id)
    assert await count_jobs(db) == before, "nothing was written"
    assert (await client.wait(mine.id, 30)).status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def test_another_tenants_job_is_not_found_and_never_its_data(
    client: ConveyorClient, tenant_client: TenantClient
) -> None:
    async with tenant_client("acme") as acme:
        theirs = await acme.submit(
            MODEL,
            "acme's secret",
            max_tokens=8,
            labels={"team": "acme"},
            delay=timedelta(seconds=2),
        )
        for attempt in (
            client.get(theirs.id),
            client.cancel(theirs.id),
            client.retry(theirs.id),
            client.history(theirs.id),
        ):
            with pytest.raises(NotFound) as err:
                await attempt
            assert "acme" not in err.value.details and "secret" not in err.value.details
        listed, _ = await client.list(labels={"team": "acme"})
        assert listed == []
        # Untouched by the other tenant's cancel: it runs when its delay is over.
        done = await finished(acme, theirs.id)
        assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.tenant == "acme"
        assert [j.id for j in (await acme.list(labels={"team": "acme"}))[0]] == [theirs.id]


async def test_another_tenants_job_cannot_be_watched(
    client: ConveyorClient, tenant_client: TenantClient
) -> None:
    async with tenant_client("watch-a") as other:
        job = await client.submit(MODEL, "not yours to watch", max_tokens=8)
        with pytest.raises(NotFound):
            async for _ in other.watch(job.id, resume=False):
                pass
        assert (await client.wait(job.id, 30)).status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def _operator(stack: Stack, db: AsyncEngine, tenant: str = "operators") -> ConveyorClient:
    key, _ = await create_api_key(db, tenant, f"op-{uuid.uuid4().hex[:8]}", "operator")
    return ConveyorClient(stack.gateway, stack.notifier, api_key=key)


async def test_only_an_operator_reads_other_tenants_stats(
    stack: Stack, db: AsyncEngine, client: ConveyorClient, tenant_client: TenantClient
) -> None:
    async with (
        tenant_client("stats-a") as member,
        tenant_client("stats-b", admin=True) as tenant_admin,
        await _operator(stack, db) as operator,
    ):
        job = await member.submit(MODEL, "counted", max_tokens=8)
        await finished(member, job.id)
        own = await member.stats()
        assert own.tenant == "stats-a" and own.counts["succeeded"] == 1
        for caller in (member, client, tenant_admin):  # a tenant's admin is no exception
            with pytest.raises(PermissionDenied):
                await caller.stats(all_tenants=True)
            with pytest.raises(PermissionDenied):
                await caller.stats(tenant="stats-c")
        assert (await tenant_admin.stats()).tenant == "stats-b"

        theirs = await operator.stats(tenant="stats-a")
        assert theirs.tenant == "stats-a" and dict(theirs.counts) == dict(own.counts)
        everyone = await operator.stats(all_tenants=True)
        assert everyone.tenant == "*"
        by_tenant = {t.tenant: t for t in everyone.tenants}
        assert {"default", "stats-a"} <= set(by_tenant)
        assert by_tenant["stats-a"].counts["succeeded"] == 1
        total = sum(t.counts["succeeded"] for t in everyone.tenants)
        assert everyone.counts["succeeded"] == total


async def test_an_operator_key_acts_for_its_own_tenant_only(
    stack: Stack, db: AsyncEngine, client: ConveyorClient
) -> None:
    theirs = await client.submit(MODEL, "not the operator's", max_tokens=8)
    async with await _operator(stack, db) as operator:
        for attempt in (operator.get(theirs.id), operator.cancel(theirs.id)):
            with pytest.raises(NotFound):
                await attempt
        with pytest.raises(NotFound):
            async for _ in operator.watch(theirs.id, resume=False):
                pass
        mine = await operator.submit(MODEL, "the operator's own", max_tokens=8)
        assert mine.tenant == "operators"
        assert (await finished(operator, mine.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert (await finished(client, theirs.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def test_the_dead_letter_depth_is_for_operators_only(
    stack: Stack, backing: Backing, db: AsyncEngine, tenant_client: TenantClient
) -> None:
    stack.stop("dispatcher")  # it would consume the dead letters at once
    connection = await aio_pika.connect(backing.amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        for i in range(3):
            await channel.default_exchange.publish(
                aio_pika.Message(f"another tenant's dead letter {i}".encode()),
                routing_key=DEAD_LETTER_QUEUE,
            )
        async with (
            tenant_client("dlq-a", admin=True) as tenant_admin,
            tenant_client("dlq-b") as member,
            await _operator(stack, db) as operator,
        ):

            async def all_there() -> bool:
                return (await operator.stats(all_tenants=True)).dead_letter_depth == 3

            await eventually(all_there, within_s=15)
            assert (await operator.stats(tenant="dlq-a")).dead_letter_depth == 3
            for caller in (tenant_admin, member):
                assert (await caller.stats()).dead_letter_depth == 0
    finally:
        with contextlib.suppress(Exception):
            queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
            await queue.purge()
        await connection.close()
        stack.start("dispatcher")


def _conveyor(backing: Backing, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONVEYOR_DATABASE_URL": backing.database_url}
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_operator_keys_are_created_with_the_cli_for_the_operators_tenant(
    backing: Backing, db: AsyncEngine
) -> None:
    created = _conveyor(backing, "keys", "create", "--role", "operator", "--name", "ops-cli")
    assert created.returncode == 0, created.stderr
    assert "(operator) for tenant operators" in created.stderr
    admin = _conveyor(backing, "keys", "create", "--tenant", "cli-a", "--name", "lead", "--admin")
    assert admin.returncode == 0, admin.stderr
    async with db.connect() as conn:
        rows = (
            await conn.execute(
                sa.text("SELECT tenant, role FROM api_keys WHERE name IN ('ops-cli', 'lead')")
            )
        ).all()
    assert sorted(map(tuple, rows)) == [("cli-a", "admin"), ("operators", "operator")]

    before = await _key_count(db)
    for refused in (
        ["--name", "no-tenant"],  # only operator keys have a default tenant
        ["--tenant", "cli-a", "--name", "x", "--role", "root"],
        ["--tenant", "cli-a", "--name", "x", "--role", "operator", "--admin"],
    ):
        result = _conveyor(backing, "keys", "create", *refused)
        assert result.returncode == 2 and result.stdout == "", refused
    assert await _key_count(db) == before, "nothing was written"


async def _key_count(db: AsyncEngine) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(sa.text("SELECT count(*) FROM api_keys"))).scalar_one())


async def test_keys_are_created_listed_and_revoked_with_the_cli(
    stack: Stack, backing: Backing, db: AsyncEngine
) -> None:
    created = _conveyor(backing, "keys", "create", "--tenant", "cli-t", "--name", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("cvk_") and "\n" not in key
    async with db.connect() as conn:
        stored = (
            await conn.execute(
                sa.text(
                    "SELECT key_hash, prefix FROM api_keys WHERE tenant = 'cli-t' AND name = 'ci'"
                )
            )
        ).one()
    assert key not in stored.key_hash and key.startswith(stored.prefix), "stored hashed"

    listed = _conveyor(backing, "keys", "list", "--tenant", "cli-t")
    assert listed.returncode == 0 and "ci" in listed.stdout and key not in listed.stdout
    short_id = listed.stdout.splitlines()[1].split()[0]

    async with ConveyorClient(stack.gateway, stack.notifier, api_key=key) as cli_client:
        job = await cli_client.submit(MODEL, "with a CLI key", max_tokens=8)
        assert job.tenant == "cli-t"
        revoked = _conveyor(backing, "keys", "revoke", short_id)
        assert revoked.returncode == 0, revoked.stderr

        async def refused() -> bool:
            try:
                await cli_client.get(job.id)
            except Unauthenticated:
                return True
            return False

        await eventually(refused, within_s=15, every_s=0.5)  # the servers' key cache expires
    everything = _conveyor(backing, "keys", "list", "--all").stdout.splitlines()
    (line,) = [row for row in everything if row.startswith(short_id)]
    assert not line.endswith("-"), "the REVOKED column has its time"

    async def ran() -> bool:  # a job submitted before the revocation still runs
        return await _statuses(db, "cli-t") == ["succeeded"]

    await eventually(ran)


async def test_key_less_calls_act_as_the_anonymous_tenant_when_configured(
    stack: Stack, db: AsyncEngine, client: ConveyorClient
) -> None:
    """What `make up` does, so that the README's plain grpcurl call works as written."""
    stack.stop("gateway")
    log = stack.run.log_file(stack.services["gateway"])
    start = log.stat().st_size
    stack.start("gateway", CONVEYOR_ANONYMOUS_TENANT="default")
    try:
        lines = log.read_text()[start:].splitlines()
        (warning,) = [line for line in lines if "act as the anonymous tenant" in line]
        assert '"warning"' in warning and '"default"' in warning
        async with ConveyorClient(stack.gateway, stack.notifier, api_key="") as anonymous:
            job = await anonymous.submit(MODEL, "Hello", max_tokens=64)
            assert job.tenant == "default"
            async with ConveyorClient(stack.gateway, stack.notifier, api_key="cvk_x") as wrong:
                with pytest.raises(Unauthenticated):
                    await wrong.get(job.id)
        done = await client.wait(job.id, 30)  # the key of the same tenant sees it
        assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED
        (first, *_) = await client.history(job.id)
        assert first.actor == "default/anonymous"
    finally:
        stack.stop("gateway")
        stack.start("gateway")


@pytest.mark.parametrize("service", ["gateway", "notifier"])
async def test_an_anonymous_tenant_on_a_network_address_refuses_to_start(
    stack: Stack, db: AsyncEngine, service: str
) -> None:
    port = free_port()
    name = f"{service}-anonymous"
    extra = devstack.Service(name, f"services.{service}", "grpc", f"127.0.0.1:{port}")
    before = await count_jobs(db)
    with pytest.raises(RuntimeError, match="exited with status 2"):
        stack.start_extra(
            extra,
            CONVEYOR_ANONYMOUS_TENANT="default",
            **{
                f"CONVEYOR_{service.upper()}_HOST": "0.0.0.0",
                f"CONVEYOR_{service.upper()}_PORT": str(port),
                f"CONVEYOR_{service.upper()}_METRICS_PORT": "0",
            },
        )
    stack.procs.pop(name, None)
    logged = stack.run.log_file(extra).read_text()
    assert "refusing to start" in logged and "CONVEYOR_ANONYMOUS_TENANT" in logged
    assert "CONVEYOR_ALLOW_ANONYMOUS_ON_NETWORK" in logged
    assert await count_jobs(db) == before


async def test_the_history_names_who_submitted_cancelled_and_replayed(
    client: ConveyorClient, tenant_client: TenantClient
) -> None:
    async with tenant_client("default") as operator:
        failing = await client.submit(MODEL, "fails", max_tokens=8, labels={"x-sim-fail": "400"})
        assert (await client.wait(failing.id, 30)).status == jobs_pb2.JOB_STATUS_FAILED
        await operator.retry(failing.id)
        delayed = await client.submit(MODEL, "later", max_tokens=8, delay=timedelta(minutes=5))
        await operator.cancel(delayed.id, reason="not needed")
        slow = await client.submit(
            MODEL, "slow", max_tokens=64, labels={"x-sim-latency-ms": "5000"}
        )

        async def running() -> bool:
            return (await client.get(slow.id)).status == jobs_pb2.JOB_STATUS_RUNNING

        await eventually(running)
        await operator.cancel(slow.id)
        assert (await client.wait(slow.id, 30)).status == jobs_pb2.JOB_STATUS_CANCELLED
        assert (await client.wait(failing.id, 30)).status == jobs_pb2.JOB_STATUS_FAILED
        operator_actor = (await operator.history(delayed.id))[-1].actor

    me = "default/tests"
    assert operator_actor.startswith("default/member-") and operator_actor != me

    replayed = await client.history(failing.id)
    assert replayed[0].actor == me and replayed[0].status == jobs_pb2.JOB_STATUS_PENDING
    (replay,) = [e for e in replayed if e.detail.fields.get("reason")]
    assert replay.actor == operator_actor and replay.previous == jobs_pb2.JOB_STATUS_FAILED
    assert replay.detail["reason"] == "replayed by RetryJob"
    assert {e.actor for e in replayed} == {me, operator_actor, ""}, "worker moves: no actor"

    cancelled = await client.history(delayed.id)
    assert [(e.status, e.actor) for e in cancelled] == [
        (jobs_pb2.JOB_STATUS_SCHEDULED, me),
        (jobs_pb2.JOB_STATUS_CANCELLED, operator_actor),
    ]
    assert cancelled[-1].detail["reason"] == "not needed"

    stopped = await client.history(slow.id)
    assert stopped[-1].status == jobs_pb2.JOB_STATUS_CANCELLED
    assert stopped[-1].actor == operator_actor, "the worker's cancel names who asked"


async def test_a_malformed_authorization_header_is_refused(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetStats(
                jobs_pb2.GetStatsRequest(), metadata=(("authorization", "Basic Zm9vOmJhcg=="),)
            )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
