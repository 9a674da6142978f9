"""Webhooks users can trust: signed, retried, recorded, refused for internal addresses,
and never held up by a receiver that does not answer.

The receivers are small aiohttp servers of the test on 127.0.0.1 (the test stack
allows loopback, and only loopback, among non-public addresses). Signatures are
checked with the standard library alone, as a receiver in any language would.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2
from conveyor.webhooks import verify_signature
from tests.conftest import eventually
from tests.stack import WEBHOOK_SECRET, free_port

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Answers by path: /ok/… 200, /flaky/… 500 twice then 200, /hang/… never."""

    base_url: str = ""
    requests: list[Received] = field(default_factory=list)
    hits: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, behaviour: str) -> str:
        return f"{self.base_url}/{behaviour}/{uuid.uuid4().hex}"

    def to(self, url: str) -> list[Received]:
        path = url.removeprefix(self.base_url)
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
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rec.base_url = f"http://127.0.0.1:{port}"
    try:
        yield rec
    finally:
        rec.release.set()
        await runner.cleanup()


def independently_verified(secret: str, received: Received) -> bool:
    """What the README tells a receiver to do, with nothing but the standard library."""
    timestamp = received.headers["Conveyor-Timestamp"]
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + received.body, hashlib.sha256
    ).hexdigest()
    signatures = [s.strip() for s in received.headers["Conveyor-Signature"].split(",")]
    fresh = abs(time.time() - int(timestamp)) < 300
    return fresh and any(hmac.compare_digest(f"v1={expected}", s) for s in signatures)


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


async def test_a_finished_job_is_posted_signed_and_an_independent_receiver_verifies_it(
    client: ConveyorClient, db: AsyncEngine, receiver: Receiver
) -> None:
    url = receiver.url("ok")
    job = await client.submit(MODEL, "hook me", max_tokens=32, webhook_url=url)
    done = await client.wait(job.id, 30)
    [delivery] = await settled(db, job.id)

    [post] = receiver.to(url)
    assert independently_verified(WEBHOOK_SECRET, post)
    assert verify_signature(
        WEBHOOK_SECRET,
        post.body,
        post.headers["Conveyor-Timestamp"],
        post.headers["Conveyor-Signature"],
    )
    assert not independently_verified("another secret", post)
    tampered = Received(post.path, post.headers, post.body.replace(b"succeeded", b"failed"), 0)
    assert not independently_verified(WEBHOOK_SECRET, tampered)

    body = json.loads(post.body)
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["Conveyor-Delivery"] == body["id"] == str(delivery["id"])
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


async def test_every_status_change_is_posted_when_the_job_asks_for_it(
    client: ConveyorClient, db: AsyncEngine, receiver: Receiver
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
    client: ConveyorClient, db: AsyncEngine, receiver: Receiver
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
    assert len({p.headers["Conveyor-Delivery"] for p in posts}) == 1, "one delivery id throughout"
    assert all(independently_verified(WEBHOOK_SECRET, p) for p in posts)
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
    client: ConveyorClient, db: AsyncEngine, url: str
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
    client: ConveyorClient, db: AsyncEngine, receiver: Receiver
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
    fine = receiver.url("ok")
    other = await client.submit(MODEL, "meanwhile", max_tokens=8, webhook_url=fine)
    await client.wait(other.id, 30)
    [delivered] = await settled(db, other.id)
    given_up = [(await settled(db, job.id))[0] for job in hung]  # the stack's window: 4 s

    assert delivered["status"] == "succeeded"
    [done] = await attempts(db, delivered["id"])
    silent_attempts = [t for d in given_up for t in await attempts(db, d["id"])]
    assert any(
        t["started_at"]
        <= done["started_at"]
        <= t["started_at"] + timedelta(milliseconds=t["latency_ms"])
        for t in silent_attempts
    ), "the other webhook went out while silent receivers held attempts"
    for delivery in given_up:
        tries = await attempts(db, delivery["id"])
        assert delivery["status"] == "failed" and delivery["attempts"] == len(tries) >= 2
        assert all(a["status_code"] is None for a in tries)
        assert all(a["error"].startswith("timeout") for a in tries), tries
        assert all(a["latency_ms"] >= 900 for a in tries), tries
        assert "gave up" in delivery["last_error"]
    for job in hung:
        assert (await client.get(job.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED
