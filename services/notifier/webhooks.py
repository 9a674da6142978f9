"""Webhook delivery: the relay from Postgres to the durable `conveyor.webhooks` queue,
and the consumer that POSTs each delivery, records the attempt, and schedules a retry.

Why this path: the delivery row is written by a trigger in the same transaction
as the status change (migration 0002), so a committed terminal status always has
its webhook, whichever service made the change, with no code in their hot paths.
The relay (every notifier runs one; rows are picked with SKIP LOCKED) puts due
deliveries on the queue, stamping `published_at`; a failed attempt clears the
stamp and sets `next_attempt_at`, so retry timers live in Postgres, not in unacked
messages. A message lost before its attempt is queued again after
`webhook_republish_after_s`. Deliveries are at least once: receivers deduplicate
on the Conveyor-Delivery header.

Isolation: each message is handled in its own task, the queue's prefetch bounds
the tasks in flight, every attempt has a total timeout, and a host that already
has `webhook_per_host` attempts in flight, or a tenant that has `webhook_per_tenant`,
gets its further deliveries deferred (without counting an attempt) instead of
taking every slot: a slow or silent receiver delays only its own deliveries. A
host is counted by the address its name resolves to, so that many names of one
machine (wildcard subdomains, `127.1` and `localhost`, ...) share one count.

Signing: each delivery is signed with its tenant's secrets (conveyor.server.webhooks),
read from `webhook_secrets` and opened with CONVEYOR_WEBHOOK_SECRETS_KEY, cached for
`webhook_secrets_cache_s`. A tenant without a secret gets no POST: the attempt fails and is
retried until the retry window ends (never unsigned, never another tenant's secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import sqlalchemy as sa
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, DeliveryMode
from aiohttp.abc import AbstractResolver, ResolveResult
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.broker import WEBHOOKS_QUEUE
from conveyor.core import lifecycle
from conveyor.core.config import Settings
from conveyor.db.jobs import utcnow
from conveyor.db.tenants import signing_secrets
from conveyor.server.webhooks import (
    IPNetwork,
    SecretBox,
    WebhookRefused,
    address_refusal,
    event_type,
    parse_networks,
    signed_headers,
    webhook_body,
)

log = logging.getLogger(__name__)

USER_AGENT = "Conveyor-Webhooks/1"
MAX_RESPONSE_BYTES = 64 * 1024
"""Of a receiver's answer, read and discarded (never stored)."""
RELAY_BATCH = 500
HOST_KEY_CACHE_S = 10.0
"""How long the address a receiving host resolves to is kept (as aiohttp's DNS cache)."""
HOST_KEY_CACHE_MAX = 10_000

_DUE = sa.text(
    """
UPDATE webhook_deliveries SET published_at = now()
 WHERE id IN (SELECT id FROM webhook_deliveries
               WHERE status = 'pending' AND next_attempt_at <= now()
                 AND (published_at IS NULL OR published_at < now() - make_interval(secs => :stale_s))
               ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED)
RETURNING id
"""
)
_UNPUBLISH = sa.text(
    "UPDATE webhook_deliveries SET published_at = NULL WHERE id = ANY(:ids) AND status = 'pending'"
).bindparams(sa.bindparam("ids", type_=sa.ARRAY(sa.Uuid())))
_READ = sa.text("SELECT * FROM webhook_deliveries WHERE id = :id").bindparams(
    sa.bindparam("id", type_=sa.Uuid())
)
_CLAIM = sa.text(
    """
UPDATE webhook_deliveries
   SET attempts = attempts + 1, locked_until = now() + make_interval(secs => :lock_s),
       updated_at = now()
 WHERE id = :id AND status = 'pending' AND (locked_until IS NULL OR locked_until < now())
RETURNING *
"""
).bindparams(sa.bindparam("id", type_=sa.Uuid()))
_DEFER = sa.text(
    """
UPDATE webhook_deliveries
   SET published_at = NULL, next_attempt_at = now() + make_interval(secs => :wait_s),
       updated_at = now()
 WHERE id = :id AND status = 'pending'
"""
).bindparams(sa.bindparam("id", type_=sa.Uuid()))
_RECORD = sa.text(
    """
WITH att AS (
  INSERT INTO webhook_attempts
    (delivery_id, attempt, started_at, status_code, latency_ms, error, notifier)
  VALUES (:id, :attempt, :started_at, :status_code, :latency_ms, :error, :notifier)
)
UPDATE webhook_deliveries
   SET status = :status, last_status_code = :status_code, last_error = :error,
       next_attempt_at = COALESCE(:next_at, next_attempt_at),
       published_at = CASE WHEN :status = 'pending' THEN NULL ELSE published_at END,
       locked_until = NULL, updated_at = now(),
       delivered_at = CASE WHEN :status = 'succeeded' THEN now() ELSE NULL END
 WHERE id = :id
"""
).bindparams(
    sa.bindparam("id", type_=sa.Uuid()),
    sa.bindparam("started_at", type_=sa.DateTime(timezone=True)),
    sa.bindparam("next_at", type_=sa.DateTime(timezone=True)),
    sa.bindparam("status_code", type_=sa.Integer()),
    sa.bindparam("error", type_=sa.Text()),
    sa.bindparam("status", type_=sa.Text()),
)
_GIVE_UP = sa.text(
    """
UPDATE webhook_deliveries
   SET status = 'failed', last_error = :error, locked_until = NULL, updated_at = now()
 WHERE id = :id AND status = 'pending'
"""
).bindparams(sa.bindparam("id", type_=sa.Uuid()))


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default, and refuses addresses that are not public.

    The addresses checked are the ones connected to (no second lookup an attacker's
    DNS could answer differently). A name with any refused address is refused.
    """

    def __init__(self, allow_private: bool, allowed: list[IPNetwork]) -> None:
        self.inner = aiohttp.ThreadedResolver()
        self.allow_private = allow_private
        self.allowed = allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            why = address_refusal(result["host"], self.allow_private, self.allowed)
            if why is not None:
                raise WebhookRefused(f"{host} resolves to a refused address: {why}")
        return results

    async def close(self) -> None:
        await self.inner.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def address_key(address: str) -> str:
    """An address as counted by the per-host cap: IPv4 mapped into IPv6 as IPv4, zone dropped."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            address.split("%", 1)[0]
        )
    except ValueError:
        return address.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class NoSigningSecret(RuntimeError):
    """The tenant has no signing secret (or the notifier has no key to open it): the
    attempt fails and is retried, so a secret made within the retry window delivers."""


class WebhookSender:
    """Relays due deliveries to the queue and makes the attempts of those it receives."""

    def __init__(self, settings: Settings, engine: AsyncEngine, name: str) -> None:
        self.settings = settings
        self.engine = engine
        self.name = name
        self.allowed = parse_networks(settings.webhook_allow_cidrs)
        key = settings.webhook_secrets_key
        # A key too short raises here: the notifier refuses to start.
        self.box = SecretBox(key.get_secret_value()) if key is not None else None
        self.secrets: dict[str, tuple[float, list[bytes]]] = {}
        self.host_keys: dict[str, tuple[float, str]] = {}
        self.resolver: AbstractResolver | None = None
        self.busy: Counter[str] = Counter()
        self.busy_tenants: Counter[str] = Counter()
        self.tasks: set[asyncio.Task[None]] = set()
        self.session: aiohttp.ClientSession | None = None
        self.channel: AbstractChannel | None = None
        self.queue: AbstractQueue | None = None
        self.consumer_tag: str | None = None

    # -- lifecycle

    async def start(self, channel: AbstractChannel, queue: AbstractQueue) -> None:
        """Consume `queue` on `channel` (a channel of its own, with publisher confirms)."""
        if self.box is None:
            log.warning("CONVEYOR_WEBHOOK_SECRETS_KEY is not set: webhook deliveries will fail")
        if os.environ.get("CONVEYOR_WEBHOOK_SECRET"):
            log.warning(
                "CONVEYOR_WEBHOOK_SECRET is no longer used: each tenant has its own secret"
                " (conveyor webhooks secret rotate --tenant ...)"
            )
        self.resolver = aiohttp.ThreadedResolver()
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.settings.webhook_allow_private, self.allowed),
            limit=self.settings.webhook_concurrency,
            ttl_dns_cache=10,
        )
        self.session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": USER_AGENT}, auto_decompress=False
        )
        self.channel = channel
        await channel.set_qos(prefetch_count=self.settings.webhook_concurrency)
        self.queue = queue
        self.consumer_tag = await queue.consume(self._on_message)

    async def stop(self) -> None:
        if self.queue is not None and self.consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self.queue.cancel(self.consumer_tag)
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=self.settings.webhook_timeout_s + 1)
        for task in self.tasks:
            task.cancel()
        if self.session is not None:
            await self.session.close()
        if self.resolver is not None:
            await self.resolver.close()

    # -- relay

    async def relay_once(self) -> int:
        """Queue the deliveries that are due; returns how many."""
        assert self.channel is not None
        async with self.engine.connect() as conn:
            result = await conn.execute(
                _DUE,
                {"stale_s": self.settings.webhook_republish_after_s, "limit": RELAY_BATCH},
            )
            ids: list[uuid.UUID] = [r[0] for r in result]
        if not ids:
            return 0
        exchange = self.channel.default_exchange
        outcomes = await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        body=str(i).encode(),
                        message_id=str(i),
                        delivery_mode=DeliveryMode.PERSISTENT,
                    ),
                    routing_key=WEBHOOKS_QUEUE,
                )
                for i in ids
            ),
            return_exceptions=True,
        )
        failed = [i for i, o in zip(ids, outcomes, strict=True) if isinstance(o, BaseException)]
        if failed:
            log.warning("webhook relay: publish failed", extra={"count": len(failed)})
            async with self.engine.connect() as conn:
                await conn.execute(_UNPUBLISH, {"ids": failed})
        return len(ids) - len(failed)

    async def relay(self, stop: asyncio.Event) -> None:
        """Relay due deliveries until `stop`."""
        while not stop.is_set():
            try:
                while await self.relay_once() == RELAY_BATCH:
                    pass
            except Exception as exc:  # Postgres or RabbitMQ away: next round
                log.warning("webhook relay failed", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.webhook_poll_s)

    # -- deliveries

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            delivery_id = uuid.UUID(message.body.decode())
        except (UnicodeDecodeError, ValueError):
            log.error("malformed webhook message dropped")
            await message.reject(requeue=False)
            return
        try:
            await self.deliver(delivery_id)
        except Exception as exc:  # the row is intact: the relay queues it again later
            log.warning(
                "webhook delivery interrupted",
                extra={"delivery_id": str(delivery_id), "error": repr(exc)},
            )
        with contextlib.suppress(Exception):
            await message.ack()

    async def deliver(self, delivery_id: uuid.UUID) -> None:
        """One attempt at a delivery, unless it is done, locked, expired or its host is busy."""
        settings = self.settings
        async with self.engine.connect() as conn:
            row = (await conn.execute(_READ, {"id": delivery_id})).mappings().first()
        if row is None or row["status"] != "pending":
            return
        if utcnow() - row["created_at"] > timedelta(seconds=settings.webhook_retry_window_s):
            await self._give_up(delivery_id, "gave up: the retry window is over")
            return
        host = (urlsplit(row["url"]).hostname or "").lower()
        host_key = await self.host_key(host)
        tenant = row["tenant"]
        if (
            self.busy[host_key] >= settings.webhook_per_host
            or self.busy_tenants[tenant] >= settings.webhook_per_tenant
        ):
            wait_s = min(5.0, max(0.2, settings.webhook_timeout_s / 2))
            async with self.engine.connect() as conn:
                await conn.execute(_DEFER, {"id": delivery_id, "wait_s": wait_s})
            return
        # Taken before the claim (no await between the check and this), so concurrent
        # deliveries cannot all pass the check.
        self.busy[host_key] += 1
        self.busy_tenants[tenant] += 1
        try:
            async with self.engine.connect() as conn:
                claimed = (
                    (
                        await conn.execute(
                            _CLAIM, {"id": delivery_id, "lock_s": settings.webhook_timeout_s + 30}
                        )
                    )
                    .mappings()
                    .first()
                )
            if claimed is None:
                return  # delivered meanwhile, or another notifier is at it
            await self._attempt(dict(claimed), host)
        finally:
            for counter, name in ((self.busy, host_key), (self.busy_tenants, tenant)):
                counter[name] -= 1
                if counter[name] <= 0:
                    del counter[name]

    async def host_key(self, host: str) -> str:
        """What the per-host cap counts `host` as: the first address it resolves to (the
        one connected to first), or the name itself if it does not resolve (the attempt
        then fails on its own)."""
        if _is_ip(host):
            return address_key(host)
        now = time.monotonic()
        cached = self.host_keys.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        assert self.resolver is not None, "start() first"
        try:
            results = await self.resolver.resolve(host, 0, socket.AF_UNSPEC)
            key = address_key(results[0]["host"]) if results else host
        except OSError:
            key = host
        if len(self.host_keys) >= HOST_KEY_CACHE_MAX:
            self.host_keys.clear()
        self.host_keys[host] = (now + HOST_KEY_CACHE_S, key)
        return key

    async def signing_keys(self, tenant: str) -> list[bytes]:
        """The tenant's secrets that sign now, newest first. Kept for
        `webhook_secrets_cache_s`; none is not kept, so a tenant's first secret counts at
        once."""
        now = time.monotonic()
        cached = self.secrets.get(tenant)
        if cached is not None and cached[0] > now:
            return cached[1]
        if self.box is None:
            raise NoSigningSecret("CONVEYOR_WEBHOOK_SECRETS_KEY is not set on this notifier")
        async with self.engine.connect() as conn:
            rows = await signing_secrets(conn, tenant)
        keys = [self.box.open(tenant, str(r["id"]), r["sealed"]) for r in rows]
        if keys:
            if len(self.secrets) >= HOST_KEY_CACHE_MAX:
                self.secrets.clear()
            self.secrets[tenant] = (now + self.settings.webhook_secrets_cache_s, keys)
        return keys

    async def _attempt(self, row: dict[str, Any], host: str) -> None:
        settings = self.settings
        delivery_id, attempt = str(row["id"]), int(row["attempts"])
        started = utcnow()
        t0 = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        permanent = False
        retry_after: float | None = None
        try:
            parts = urlsplit(row["url"])
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise WebhookRefused(f"not an http(s) URL: {row['url']!r}")
            if _is_ip(parts.hostname):
                why = address_refusal(parts.hostname, settings.webhook_allow_private, self.allowed)
                if why is not None:
                    raise WebhookRefused(why)
            keys = await self.signing_keys(row["tenant"])
            if not keys:
                raise NoSigningSecret(
                    f"tenant {row['tenant']} has no webhook signing secret"
                    f" (conveyor webhooks secret rotate --tenant {row['tenant']})"
                )
            body = webhook_body(
                delivery_id,
                row["event"],
                row["seq"],
                row["previous"],
                row["job"],
                row["created_at"],
            )
            headers = signed_headers(keys, body, delivery_id, event_type(row["event"]))
            assert self.session is not None
            async with self.session.post(
                row["url"],
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_s),
            ) as response:
                status_code = response.status
                await response.content.read(MAX_RESPONSE_BYTES)
                if not 200 <= status_code < 300:
                    error = f"HTTP {status_code}"
                    retry_after = lifecycle.retry_after_s(response.headers)
        except WebhookRefused as exc:
            error, permanent = f"refused: {exc}", True
        except TimeoutError:
            error = f"timeout: no answer within {settings.webhook_timeout_s:g} s"
        except NoSigningSecret as exc:
            error = f"not signed: {exc}"
        except (aiohttp.ClientError, OSError, RuntimeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        latency_ms = (time.perf_counter() - t0) * 1000
        next_at = None
        if error is None:
            status = "succeeded"
        elif permanent:
            status = "failed"
        else:
            delay = lifecycle.backoff_s(
                attempt, settings.webhook_retry_base_s, settings.webhook_retry_cap_s, retry_after
            )
            next_at = utcnow() + timedelta(seconds=delay)
            deadline = row["created_at"] + timedelta(seconds=settings.webhook_retry_window_s)
            if next_at > deadline:
                status, next_at = "failed", None
                error = f"{error} (gave up after {attempt} attempts)"
            else:
                status = "pending"
        async with self.engine.connect() as conn:
            await conn.execute(
                _RECORD,
                {
                    "id": row["id"],
                    "attempt": attempt,
                    "started_at": started,
                    "status_code": status_code,
                    "latency_ms": latency_ms,
                    "error": error,
                    "notifier": self.name,
                    "status": status,
                    "next_at": next_at,
                },
            )
        log.info(
            "webhook attempt",
            extra={
                "delivery_id": delivery_id,
                "job_id": str(row["job_id"]),
                "event": row["event"],
                "attempt": attempt,
                "host": host,
                "status_code": status_code,
                "latency_ms": round(latency_ms, 1),
                "outcome": status,
                "error": error,
            },
        )

    async def _give_up(self, delivery_id: uuid.UUID, error: str) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(_GIVE_UP, {"id": delivery_id, "error": error})
