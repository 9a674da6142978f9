"""Fixtures: one isolated vhost and database per run, the whole stack as processes
(authentication on), a client with an API key of the `default` tenant, clients of
other tenants, and direct access to the database for checking what became of a job."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import TERMINAL_STATUSES, ConveyorClient
from conveyor.core.config import DEFAULT_TENANT
from conveyor.db.admin import create_api_key
from conveyor.db.engine import create_engine
from conveyor.v1 import jobs_pb2
from tests.otlp_receiver import Receiver, start_receiver
from tests.stack import Backing, Stack, backing_services


@pytest.fixture(scope="session")
def backing() -> Iterator[Backing]:
    with backing_services() as b:
        yield b


@pytest.fixture(scope="session")
def otlp() -> Iterator[Receiver]:
    """Where the services send their spans (OTLP over gRPC), for the tracing tests."""
    server, receiver, port = start_receiver()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    yield receiver
    server.stop(grace=None)


@pytest.fixture(scope="session")
def stack(
    backing: Backing, otlp: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    tracing = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    s = Stack(backing, Path(tmp_path_factory.mktemp("run")), tracing)
    try:
        s.start_all()
        yield s
    finally:
        s.stop_all()


@pytest.fixture(scope="session")
async def db(backing: Backing) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(backing.database_url, pool_size=2, pre_ping=True)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def api_key(db: AsyncEngine) -> str:
    """An API key of the `default` tenant (a member key)."""
    key, _ = await create_api_key(db, DEFAULT_TENANT, "tests", "member")
    return key


@pytest.fixture
async def client(stack: Stack, api_key: str) -> AsyncIterator[ConveyorClient]:
    async with ConveyorClient(stack.gateway, stack.notifier, api_key=api_key) as c:
        yield c


TenantClient = Callable[..., AbstractAsyncContextManager[ConveyorClient]]


@pytest.fixture
def tenant_client(stack: Stack, db: AsyncEngine) -> TenantClient:
    """`async with tenant_client("acme") as c`: a client with a new key of that tenant
    (`admin=True` for an admin key)."""

    @asynccontextmanager
    async def make(tenant: str, *, admin: bool = False) -> AsyncIterator[ConveyorClient]:
        role = "admin" if admin else "member"
        key, _ = await create_api_key(db, tenant, f"{role}-{uuid.uuid4().hex[:8]}", role)
        async with ConveyorClient(stack.gateway, stack.notifier, api_key=key) as c:
            yield c

    return make


def logged_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages logged at ERROR or above so far in this test."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def count_jobs(db: AsyncEngine) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(sa.text("SELECT count(*) FROM jobs"))).scalar_one())


async def eventually(
    check: Callable[[], Awaitable[bool]], within_s: float = 30, every_s: float = 0.1
) -> None:
    """Wait until `check()` is true; fail the test after `within_s` seconds."""
    async with asyncio.timeout(within_s):
        while not await check():  # noqa: ASYNC110 - polling another process's state
            await asyncio.sleep(every_s)


async def job_history(db: AsyncEngine, job_id: str) -> list[str]:
    """The statuses a job went through, from its stored history, in order."""
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT status FROM job_events WHERE job_id = :id ORDER BY seq"),
            {"id": uuid.UUID(job_id)},
        )
        return [r.status for r in rows]


async def job_attempts(db: AsyncEngine, job_id: str) -> list[sa.Row[Any]]:
    """A job's attempts: attempt number, outcome, started_at, finished_at."""
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT attempt, outcome, started_at, finished_at FROM job_attempts"
                " WHERE job_id = :id ORDER BY attempt"
            ),
            {"id": uuid.UUID(job_id)},
        )
        return list(rows)


async def finished(client: ConveyorClient, job_id: str, within_s: float = 30) -> jobs_pb2.Job:
    """The job once it reaches a terminal status, by polling GetJob (not WatchJob), so it
    works for any tenant's client whatever the notifier supports."""
    final: list[jobs_pb2.Job] = []

    async def done() -> bool:
        job = await client.get(job_id)
        if job.status in TERMINAL_STATUSES:
            final.append(job)
            return True
        return False

    await eventually(done, within_s=within_s, every_s=0.1)
    return final[0]
