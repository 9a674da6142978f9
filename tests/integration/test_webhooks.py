"""Webhooks users can trust: signed with their tenant's own secret as Standard Webhooks
specifies, rotated without a gap, retried, recorded, refused for internal addresses,
capped per host and per tenant, and never held up by a receiver that does not answer.

The receivers are small aiohttp servers of the test on 127.0.0.1-3 (the test stack
allows loopback, and only loopback, among non-public addresses). Signatures are
checked with the `standardwebhooks` library and with the standard library alone, as
a receiver in any language would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks import Webhook, WebhookVerificationError

from conveyor.client import ConveyorClient
from conveyor.core.config import DEFAULT_TENANT
from conveyor.db import admin
from conveyor.db import tenants as tenants_db
from conveyor.server.webhooks import verify_signature
from conveyor.v1 import jobs_pb2
from tests.conftest import TenantClient, eventually
from tests.stack import TEST_ENV, WEBHOOK_SECRETS_KEY, Backing, free_port

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
PER_HOST = int(TEST_ENV["CONVEYOR_WEBHOOK_PER_HOST"])
PER_TENANT = int(TEST_ENV["CONVEYOR_WEBHOOK_PER_TENANT"])
LOOPBACK_NAMES = ("127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001")
"""Five host names that all resolve to 127.0.0.1."""


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


def unknown_secret() -> str:
    """A well-formed secret nobody signs with."""
    return "whsec_" + base64.b64encode(b"o" * 32).decode()


def new_tenant(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def independently_verified(secret: str, received: Received) -> bool:
    """The Standard Webhooks check with nothing but the standard library, as the README
    shows (any language can do the same)."""
    headers = {k.lower(): v for k, v in received.headers.items()}
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + received.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    fresh = abs(time.time() - int(timestamp)) < 300
    given = headers["webhook-signature"].split(" ")
    return fresh and any(hmac.compare_digest(expected, s) for s in given)


def library_verified(secret: str, received: Received) -> bool:
    """The check of the `standardwebhooks` library (what its README tells receivers)."""
    try:
        Webhook(secret).verify(received.body, received.headers)
    except WebhookVerificationError:
        return False
    return True


def signatures(received: Received) -> list[str]:
    return received.headers["webhook-signature"].split(" ")


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


async def delivered_post(
    client: ConveyorClient, db: AsyncEngine, receiver: Receiver, prompt: str
) -> Received:
    """Submit a job with a webhook to an answering receiver; its one POST."""
    url = receiver.url("ok")
    job = await client.submit(MODEL, prompt, max_tokens=8, webhook_url=url)
    await client.wait(job.id, 30)
    [delivery] = await settled(db, job.id)
    assert delivery["status"] == "succeeded", delivery["last_error"]
    [post] = receiver.to(url)
    return post


def overlaps(attempt: dict[str, Any], others: list[dict[str, Any]]) -> bool:
    """Whether `attempt` started while one of `others` was under way."""
    return any(
        t["started_at"]
        <= attempt["started_at"]
        <= t["started_at"] + timedelta(milliseconds=t["latency_ms"])
        for t in others
    )


async def any_posted(receiver: Receiver, urls: list[str]) -> bool:
    return any(receiver.to(url) for url in urls)


def max_in_flight(tries: list[dict[str, Any]]) -> int:
    """The most attempts that were under way at one time (from their recorded spans)."""
    edges: list[tuple[datetime, int]] = []
    for t in tries:
        edges.append((t["started_at"], 1))
        edges.append((t["started_at"] + timedelta(milliseconds=t["latency_ms"]), -1))
    most = now = 0
    for _, step in sorted(edges):  # at one instant, an end (-1) sorts before a start
        now += step
        most = max(most, now)
    return most


async def test_a_finished_job_is_posted_signed_and_an_independent_receiver_verifies_it(
    client: ConveyorClient, db: AsyncEngine, receiver: Receiver, default_secret: str
) -> None:
    url = receiver.url("ok")
    job = await client.submit(MODEL, "hook me", max_tokens=32, webhook_url=url)
    done = await client.wait(job.id, 30)
    [delivery] = await settled(db, job.id)

    [post] = receiver.to(url)
    assert Webhook(default_secret).verify(post.body, post.headers) == json.loads(post.body)
    assert independently_verified(default_secret, post)
    assert verify_signature(default_secret, post.body, post.headers)
    assert not library_verified(unknown_secret(), post)
    tampered = Received(post.path, post.headers, post.body.replace(b"succeeded", b"failed"), 0)
    assert not library_verified(default_secret, tampered)
    assert not independently_verified(default_secret, tampered)

    body = json.loads(post.body)
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["webhook-id"] == body["id"] == str(delivery["id"])
    assert post.headers["Conveyor-Event"] == body["type"] == "job.succeeded"
    assert body["sequence"] == done.sequence and body["previous_status"] == "running"
    assert body["job"]["id"] == job.id and body["job"]["status"] == "succeeded"
    assert body["job"]["result_text"] == done.result_text
    assert body["job"]["usage"]["output_tokens"] == done.usage.output_tokens
    assert body["job"]["finished_at"].endswith("Z")
    assert "request" not in body["job"], "the prompt is never sent"

    assert delivery["status"] == "succeeded" and delivery["attempts"] == 1
    [attempt] = await attempts(db, delivery["id"])
    assert attempt["status_code"] == 200 and attempt["error"] is None
    assert attempt["latency_ms"] > 0
    assert done.webhook_events == jobs_pb2.WEBHOOK_EVENTS_TERMINAL


async def test_each_tenant_signs_with_its_own_secret_so_none_can_forge_anothers(
    tenant_client: TenantClient, db: AsyncEngine, receiver: Receiver
) -> None:
    posts: dict[str, Received] = {}
    secrets: dict[str, str] = {}
    for tenant in (new_tenant("alpha"), new_tenant("beta")):
        secrets[tenant] = await new_secret(db, tenant)
        async with tenant_client(tenant) as c:
            posts[tenant] = await delivered_post(c, db, receiver, f"for {tenant}")

    (a, a_post), (b, b_post) = posts.items()
    assert secrets[a] != secrets[b]
    assert library_verified(secrets[a], a_post) and library_verified(secrets[b], b_post)
    assert not library_verified(secrets[b], a_post), "beta's receiver refuses alpha's POSTs"
    assert not library_verified(secrets[a], b_post), "alpha's receiver refuses beta's POSTs"
    assert len(signatures(a_post)) == len(signatures(b_post)) == 1


async def test_a_rotation_signs_with_old_and_new_until_the_overlap_ends(
    tenant_client: TenantClient, db: AsyncEngine, receiver: Receiver
) -> None:
    tenant = new_tenant("rotating")
    first = await new_secret(db, tenant)
    async with tenant_client(tenant) as c:
        before = await delivered_post(c, db, receiver, "before the rotation")
        second = await new_secret(db, tenant, overlap_s=3600)
        during = await delivered_post(c, db, receiver, "during the overlap")
        third = await new_secret(db, tenant, overlap_s=0)  # e.g. after a leak
        after = await delivered_post(c, db, receiver, "after it")

    assert len(signatures(before)) == 1 and library_verified(first, before)
    assert len(signatures(during)) == 2, "one v1 signature per secret, space-separated"
    assert library_verified(first, during) and library_verified(second, during)
    assert independently_verified(first, during) and independently_verified(second, during)
    assert len(signatures(after)) == 1 and library_verified(third, after)
    assert not library_verified(first, after) and not library_verified(second, after)
    async with db.connect() as conn:
        listed = await tenants_db.list_webhook_secrets(conn, tenant)
    assert len(listed) == 1 and listed[0]["expires_at"] is None


async def test_a_tenant_without_a_secret_gets_nothing_unsigned_and_its_first_secret_delivers(
    tenant_client: TenantClient, db: AsyncEngine, receiver: Receiver
) -> None:
    never, later = new_tenant("secretless"), new_tenant("late")
    async with tenant_client(never) as c:
        url = receiver.url("ok")
        job = await c.submit(MODEL, "no secret", max_tokens=8, webhook_url=url)
        done = await c.wait(job.id, 30)
    [given_up] = await settled(db, job.id)  # the stack's retry window: 4 s

    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED, "the job itself is not affected"
    assert receiver.to(url) == [], "nothing was sent unsigned"
    assert given_up["status"] == "failed"
    tries = await attempts(db, given_up["id"])
    assert len(tries) >= 2 and all(t["status_code"] is None for t in tries)
    assert all(f"tenant {never} has no webhook signing secret" in t["error"] for t in tries)

    async with tenant_client(later) as c:
        url = receiver.url("ok")
        job = await c.submit(MODEL, "secret on its way", max_tokens=8, webhook_url=url)
        await c.wait(job.id, 30)

        async def refused_once() -> bool:
            found = await deliveries(db, job.id)
            return bool(found) and bool(await attempts(db, found[0]["id"]))

        await eventually(refused_once, within_s=10, every_s=0.05)
        secret = await new_secret(db, later)
    [delivery] = await settled(db, job.id)

    assert delivery["status"] == "succeeded", "retried, and signed once the secret exists"
    [post] = receiver.to(url)
    assert library_verified(secret, post)
    tries = await attempts(db, delivery["id"])
    assert "no webhook signing secret" in (tries[0]["error"] or "")
    assert tries[-1]["status_code"] == 200


async def test_every_status_change_is_posted_when_the_job_asks_for_it(
    client: ConveyorClient, db: AsyncEngine, receiver: Receiver, default_secret: str
) -> None:
    url = receiver.url("ok")
    job = await client.submit(
        MODEL,
        "tell me everything",
        max_tokens=16,
        webhook_url=url,
        webhook_events=jobs_pb2.WEBHOOK_EVENTS_ALL,
    )
    await client.wait(job.id, 30)
    found = await settled(db, job.id, count=3)

    assert [d["event"] for d in found] == ["pending", "running", "succeeded"]
    assert all(d["status"] == "succeeded" for d in found)
    bodies = sorted((json.loads(r.body) for r in receiver.to(url)), key=lambda b: b["sequence"])
    assert [b["type"] for b in bodies] == ["job.pending", "job.running", "job.succeeded"]
    assert [b["job"]["status"] for b in bodies] == ["pending", "running", "succeeded"], (
        "each body holds the job as it was at that change"
    )
    assert len({b["id"] for b in bodies}) == 3


async def test_a_receiver_answering_500_is_retried_until_it_answers_200(
    client: ConveyorClient, db: AsyncEngine, receiver: Receiver, default_secret: str
) -> None:
    url = receiver.url("flaky")
    job = await client.submit(MODEL, "retry me", max_tokens=16, webhook_url=url)
    await client.wait(job.id, 30)
    [delivery] = await settled(db, job.id)

    assert delivery["status"] == "succeeded" and delivery["attempts"] == 3
    tries = await attempts(db, delivery["id"])
    assert [a["status_code"] for a in tries] == [500, 500, 200]
    assert [a["error"] for a in tries] == ["HTTP 500", "HTTP 500", None]
    posts = receiver.to(url)
    assert len(posts) == 3
    assert len({p.headers["webhook-id"] for p in posts}) == 1, "one delivery id throughout"
    assert all(library_verified(default_secret, p) for p in posts)
    assert posts[1].at > posts[0].at and posts[2].at > posts[1].at


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
        "http://10.0.0.7/hook",  # private
        "http://[fe80::1]/hook",  # IPv6 link-local
        "http://0.0.0.0:9/hook",  # unspecified
    ],
)
async def test_a_webhook_to_an_internal_address_is_refused_and_not_retried(
    client: ConveyorClient, db: AsyncEngine, url: str, default_secret: str
) -> None:
    job = await client.submit(MODEL, "ssrf", max_tokens=8, webhook_url=url)
    done = await client.wait(job.id, 30)
    [delivery] = await settled(db, job.id)

    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED, "the job itself is not affected"
    assert delivery["status"] == "failed" and delivery["attempts"] == 1
    [attempt] = await attempts(db, delivery["id"])
    assert attempt["status_code"] is None
    assert attempt["error"].startswith("refused:")
    assert delivery["last_error"] == attempt["error"]


async def test_receivers_that_never_answer_time_out_without_holding_up_others(
    client: ConveyorClient, db: AsyncEngine, receiver: Receiver, default_secret: str
) -> None:
    silent = [receiver.url("hang") for _ in range(3)]
    hung = [
        await client.submit(MODEL, "into the void", max_tokens=8, webhook_url=url) for url in silent
    ]
    for job in hung:
        await client.wait(job.id, 30)

    async def attempts_started() -> bool:
        return all(receiver.to(url) for url in silent)

    await eventually(attempts_started, within_s=10, every_s=0.02)
    fine = receiver.url("ok", "127.0.0.3")  # another host: the silent one is at its cap
    other = await client.submit(MODEL, "meanwhile", max_tokens=8, webhook_url=fine)
    await client.wait(other.id, 30)
    [delivered] = await settled(db, other.id)
    given_up = [(await settled(db, job.id))[0] for job in hung]  # the stack's window: 4 s

    assert delivered["status"] == "succeeded"
    [done] = await attempts(db, delivered["id"])
    silent_attempts = [t for d in given_up for t in await attempts(db, d["id"])]
    assert overlaps(done, silent_attempts), (
        "the other webhook went out while silent receivers held attempts"
    )
    for delivery in given_up:
        tries = await attempts(db, delivery["id"])
        assert delivery["status"] == "failed" and delivery["attempts"] == len(tries) >= 2
        assert all(a["status_code"] is None for a in tries)
        assert all(a["error"].startswith("timeout") for a in tries), tries
        assert all(a["latency_ms"] >= 900 for a in tries), tries
        assert "gave up" in delivery["last_error"]
    for job in hung:
        assert (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED


async def test_many_names_of_one_address_share_the_per_host_cap(
    tenant_client: TenantClient, db: AsyncEngine, receiver: Receiver
) -> None:
    tenant = new_tenant("many-names")
    await new_secret(db, tenant)
    silent = [receiver.url("hang", name) for name in LOOPBACK_NAMES]
    assert len(silent) > PER_HOST
    async with tenant_client(tenant) as c:
        hung = [await c.submit(MODEL, "names", max_tokens=8, webhook_url=u) for u in silent]
        for job in hung:
            await c.wait(job.id, 30)
        await eventually(lambda: any_posted(receiver, silent), within_s=10, every_s=0.02)
        elsewhere = receiver.url("ok", "127.0.0.2")
        other = await c.submit(MODEL, "another host", max_tokens=8, webhook_url=elsewhere)
        await c.wait(other.id, 30)
    [delivered] = await settled(db, other.id)
    given_up = [(await settled(db, job.id))[0] for job in hung]  # the stack's window: 4 s
    silent_attempts = [t for d in given_up for t in await attempts(db, d["id"])]

    assert 2 <= max_in_flight(silent_attempts) <= PER_HOST, (
        "the names of 127.0.0.1 count as one host"
    )
    assert all(d["status"] == "failed" for d in given_up)
    assert delivered["status"] == "succeeded", "another address is not held up"
    [done] = await attempts(db, delivered["id"])
    assert overlaps(done, silent_attempts), "it went out while the silent ones held the host"


async def test_one_tenants_silent_receivers_take_at_most_its_cap_of_attempts(
    client: ConveyorClient,
    tenant_client: TenantClient,
    db: AsyncEngine,
    receiver: Receiver,
    default_secret: str,
) -> None:
    hog = new_tenant("hog")
    await new_secret(db, hog)
    # Over two hosts, so that the per-host cap alone would let them all through.
    silent = [receiver.url("hang", f"127.0.0.{1 + i % 2}") for i in range(PER_TENANT + 2)]
    assert len(silent) <= 2 * PER_HOST
    async with tenant_client(hog) as c:
        hung = [await c.submit(MODEL, "hog", max_tokens=8, webhook_url=u) for u in silent]
        for job in hung:
            await c.wait(job.id, 30)
    await eventually(lambda: any_posted(receiver, silent), within_s=10, every_s=0.02)
    fine = receiver.url("ok", "127.0.0.3")
    other = await client.submit(MODEL, "another tenant", max_tokens=8, webhook_url=fine)
    await client.wait(other.id, 30)
    [delivered] = await settled(db, other.id)
    given_up = [(await settled(db, job.id))[0] for job in hung]  # the stack's window: 4 s
    hog_attempts = [t for d in given_up for t in await attempts(db, d["id"])]

    assert 2 <= max_in_flight(hog_attempts) <= PER_TENANT
    assert all(d["status"] == "failed" for d in given_up)
    assert delivered["status"] == "succeeded", "another tenant's webhook is not held up"
    [done] = await attempts(db, delivered["id"])
    assert overlaps(done, hog_attempts), "it went out while the hog's attempts were at its cap"
    assert all(library_verified(default_secret, p) for p in receiver.to(fine))


def conveyor_cli(
    backing: Backing, *args: str, secrets_key: str | None
) -> subprocess.CompletedProcess[str]:
    """`conveyor ARGS` as an operator runs it, on the test database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env["CONVEYOR_DATABASE_URL"] = backing.database_url
    if secrets_key is not None:
        env["CONVEYOR_WEBHOOK_SECRETS_KEY"] = secrets_key
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli", *args],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_cli_makes_a_secret_shown_once_that_verifies_the_tenants_webhooks(
    backing: Backing, tenant_client: TenantClient, db: AsyncEngine, receiver: Receiver
) -> None:
    tenant = new_tenant("cli")
    refused = [
        conveyor_cli(backing, "webhooks", "secret", "rotate", "--tenant", tenant, secrets_key=None),
        conveyor_cli(
            backing,
            *("webhooks", "secret", "rotate", "--tenant", tenant, "--overlap-s", "-1"),
            secrets_key=WEBHOOK_SECRETS_KEY,
        ),
    ]
    async with db.connect() as conn:
        assert await tenants_db.list_webhook_secrets(conn, tenant) == [], "nothing written"
    assert refused[0].returncode == 1 and "CONVEYOR_WEBHOOK_SECRETS_KEY" in refused[0].stderr
    assert refused[1].returncode == 2 and "--overlap-s" in refused[1].stderr

    made = conveyor_cli(
        backing, "webhooks", "secret", "rotate", "--tenant", tenant, secrets_key=WEBHOOK_SECRETS_KEY
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("whsec_") and "shown once" in made.stderr
    async with tenant_client(tenant) as c:
        post = await delivered_post(c, db, receiver, "signed with the CLI's secret")
    assert library_verified(secret, post)

    listed = conveyor_cli(
        backing, "webhooks", "secret", "list", "--tenant", tenant, secrets_key=WEBHOOK_SECRETS_KEY
    )
    assert listed.returncode == 0 and tenant in listed.stdout and "current" in listed.stdout
    assert secret.removeprefix("whsec_") not in listed.stdout, "never shown again"
    async with db.connect() as conn:
        stored = await conn.execute(
            sa.text("SELECT sealed FROM webhook_secrets WHERE tenant = :t"), {"t": tenant}
        )
        [sealed] = stored.scalars().all()
    assert base64.b64decode(secret.removeprefix("whsec_")) not in bytes(sealed), "stored encrypted"
