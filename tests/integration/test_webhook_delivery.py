"""Webhooks delivered as asked: every status change when the job wants them, retried
until the receiver answers 200, recorded, refused for internal addresses, capped per
host (however many names it has) and per tenant, and never held up by a receiver
that does not answer.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2
from tests.conftest import TenantClient, eventually
from tests.integration.webhook_receiver import (
    MODEL,
    Receiver,
    attempts,
    library_verified,
    new_secret,
    new_tenant,
    settled,
)
from tests.stack import TEST_ENV

pytestmark = pytest.mark.integration


PER_HOST = int(TEST_ENV["CONVEYOR_WEBHOOK_PER_HOST"])
PER_TENANT = int(TEST_ENV["CONVEYOR_WEBHOOK_PER_TENANT"])
LOOPBACK_NAMES = ("127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001")
"""Five host names that all resolve to 127.0.0.1."""


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
