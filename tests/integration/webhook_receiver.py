"""What the webhook tests share: a receiver of their own, the tenants' signing secrets,
a check of a signature with the `standardwebhooks` library, and the deliveries and
attempts the notifier records.

The receiver is a small aiohttp server on 127.0.0.1-3 (the test stack allows
loopback, and only loopback, among non-public addresses). `receiver` and
`default_secret` are fixtures (through `conftest.py`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks import Webhook, WebhookVerificationError

from conveyor.core.config import DEFAULT_TENANT
from conveyor.db import admin
from tests.conftest import eventually
from tests.stack import WEBHOOK_SECRETS_KEY, free_port

MODEL = "claude-sonnet-4-5"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Answers by path: /ok/… 200, /flaky/… 500 twice then 200, /hang/… never. Listens
    on 127.0.0.1, 127.0.0.2 and 127.0.0.3, each on a port of its own."""

    ports: dict[str, int] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    hits: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, behaviour: str, host: str = "127.0.0.1") -> str:
        """A new URL; `host` is an address the receiver listens on or a name of 127.0.0.1."""
        port = self.ports.get(host, self.ports["127.0.0.1"])
        return f"http://{host}:{port}/{behaviour}/{uuid.uuid4().hex}"

    def to(self, url: str) -> list[Received]:
        path = urlsplit(url).path
        return [r for r in self.requests if r.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), body, time.time()))
        self.hits[request.path] += 1
        behaviour = request.path.split("/")[1]
        if behaviour == "hang":
            await self.release.wait()
        if behaviour == "flaky" and self.hits[request.path] <= 2:
            return web.Response(status=500, text="try again")
        return web.Response(status=200, text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    for address in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        rec.ports[address] = free_port()
        await web.TCPSite(runner, address, rec.ports[address]).start()
    try:
        yield rec
    finally:
        rec.release.set()
        await runner.cleanup()


async def new_secret(db: AsyncEngine, tenant: str, overlap_s: float | None = None) -> str:
    """What `conveyor webhooks secret rotate --tenant T` prints (whsec_...)."""
    secret, _, _ = await admin.rotate_webhook_secret(
        db, tenant, overlap_s, secrets_key=WEBHOOK_SECRETS_KEY
    )
    return secret


_default_secret: list[str] = []


@pytest.fixture
async def default_secret(db: AsyncEngine) -> str:
    """The `default` tenant's signing secret (made once: `client` is of that tenant)."""
    if not _default_secret:
        _default_secret.append(await new_secret(db, DEFAULT_TENANT))
    return _default_secret[0]


def new_tenant(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def library_verified(secret: str, received: Received) -> bool:
    """The check of the `standardwebhooks` library (what its README tells receivers)."""
    try:
        Webhook(secret).verify(received.body, received.headers)
    except WebhookVerificationError:
        return False
    return True


async def deliveries(db: AsyncEngine, job_id: str) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT * FROM webhook_deliveries WHERE job_id = :id ORDER BY seq"),
            {"id": uuid.UUID(job_id)},
        )
        return [dict(r) for r in rows.mappings()]


async def attempts(db: AsyncEngine, delivery_id: uuid.UUID) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        rows = await conn.execute(
            sa.text("SELECT * FROM webhook_attempts WHERE delivery_id = :id ORDER BY attempt"),
            {"id": delivery_id},
        )
        return [dict(r) for r in rows.mappings()]


async def settled(db: AsyncEngine, job_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The job's deliveries once `count` exist and none is pending any more."""
    found: list[dict[str, Any]] = []

    async def done() -> bool:
        found[:] = await deliveries(db, job_id)
        return len(found) >= count and all(d["status"] != "pending" for d in found)

    await eventually(done, within_s=30, every_s=0.05)
    return found
