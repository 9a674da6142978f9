"""Webhooks users can trust: signed with their tenant's own secret as Standard Webhooks
specifies, rotated without a gap, never sent unsigned, and the secret made by the CLI,
shown once and stored encrypted.

Signatures are checked with the `standardwebhooks` library and with the standard
library alone, as a receiver in any language would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks import Webhook

from conveyor.client import ConveyorClient
from conveyor.db import tenants as tenants_db
from conveyor.server.webhooks import verify_signature
from conveyor.v1 import jobs_pb2
from tests.conftest import TenantClient, eventually
from tests.integration.webhook_receiver import (
    MODEL,
    Received,
    Receiver,
    attempts,
    deliveries,
    library_verified,
    new_secret,
    new_tenant,
    settled,
)
from tests.stack import WEBHOOK_SECRETS_KEY, Backing

pytestmark = pytest.mark.integration


def unknown_secret() -> str:
    """A well-formed secret nobody signs with."""
    return "whsec_" + base64.b64encode(b"o" * 32).decode()


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


def signatures(received: Received) -> list[str]:
    return received.headers["webhook-signature"].split(" ")


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
