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
host is counted by the address its name resolves to (services.notifier.webhook_hosts).
The delivery rows are read and written through conveyor.db.webhook_deliveries.

Signing: each delivery is signed with its tenant's secrets (conveyor.server.webhooks),
read from `webhook_secrets` and opened with CONVEYOR_WEBHOOK_SECRETS_KEY, cached for
`webhook_secrets_cache_s`. A tenant without a secret gets no POST: the attempt fails and is
retried until the retry window ends (never unsigned, never another tenant's secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import Counter
from datetime import timedelta
from urllib.parse import urlsplit

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, DeliveryMode
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus.broker import WEBHOOKS_QUEUE
from conveyor.bus.settle import ACK, REJECT, Outcome, consumer
from conveyor.core import lifecycle
from conveyor.core.config import Settings
from conveyor.db import webhook_deliveries as deliveries
from conveyor.db.jobs import utcnow
from conveyor.db.tenants import signing_secrets
from conveyor.db.webhook_deliveries import Attempt, Delivery
from conveyor.server.webhooks import (
    SecretBox,
    WebhookRefused,
    address_refusal,
    event_type,
    parse_networks,
    signed_headers,
    webhook_body,
)

from .webhook_hosts import HOST_KEY_CACHE_MAX, GuardedResolver, HostKeys, is_ip

log = logging.getLogger(__name__)

USER_AGENT = "Conveyor-Webhooks/1"
MAX_RESPONSE_BYTES = 64 * 1024
"""Of a receiver's answer, read and discarded (never stored)."""
RELAY_BATCH = 500


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
        self.hosts = HostKeys()
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
        self.hosts.resolver = aiohttp.ThreadedResolver()
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
        handle = consumer(self._handle, self._interrupted)

        async def on_message(message: AbstractIncomingMessage) -> None:
            # Each in its own task: a slow receiver holds up nothing but its own delivery.
            task = asyncio.create_task(handle(message))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        self.consumer_tag = await queue.consume(on_message)

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
        if self.hosts.resolver is not None:
            await self.hosts.resolver.close()

    # -- relay

    async def relay_once(self) -> int:
        """Queue the deliveries that are due; returns how many."""
        assert self.channel is not None
        ids = await deliveries.take_due(
            self.engine, self.settings.webhook_republish_after_s, RELAY_BATCH
        )
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
            await deliveries.unpublish(self.engine, failed)
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

    async def _handle(self, message: AbstractIncomingMessage) -> Outcome:
        """One delivery message: its attempt made (or found unnecessary), it is acked; the
        row is the record, so nothing is ever requeued."""
        try:
            delivery_id = uuid.UUID(message.body.decode())
        except (UnicodeDecodeError, ValueError):
            log.error("malformed webhook message dropped")
            return REJECT
        await self.deliver(delivery_id)
        return ACK

    @staticmethod
    def _interrupted(message: AbstractIncomingMessage, exc: Exception) -> Outcome:
        """An attempt cut short (Postgres away, ...): the row is intact and the relay
        queues it again later, so the message is acked."""
        log.warning(
            "webhook delivery interrupted",
            extra={"delivery_id": message.body.decode(errors="replace"), "error": repr(exc)},
        )
        return ACK

    async def deliver(self, delivery_id: uuid.UUID) -> None:
        """One attempt at a delivery, unless it is done, locked, expired or its host is busy."""
        settings = self.settings
        found = await deliveries.get(self.engine, delivery_id)
        if found is None or found.status != deliveries.PENDING:
            return
        if utcnow() - found.created_at > timedelta(seconds=settings.webhook_retry_window_s):
            await deliveries.give_up(self.engine, delivery_id, "gave up: the retry window is over")
            return
        host = (urlsplit(found.url).hostname or "").lower()
        host_key = await self.hosts.key(host)
        tenant = found.tenant
        if (
            self.busy[host_key] >= settings.webhook_per_host
            or self.busy_tenants[tenant] >= settings.webhook_per_tenant
        ):
            wait_s = min(5.0, max(0.2, settings.webhook_timeout_s / 2))
            await deliveries.defer(self.engine, delivery_id, wait_s)
            return
        # Taken before the claim (no await between the check and this), so concurrent
        # deliveries cannot all pass the check.
        self.busy[host_key] += 1
        self.busy_tenants[tenant] += 1
        try:
            claimed = await deliveries.claim(
                self.engine, delivery_id, settings.webhook_timeout_s + 30
            )
            if claimed is None:
                return  # delivered meanwhile, or another notifier is at it
            await self._attempt(claimed, host)
        finally:
            for counter, name in ((self.busy, host_key), (self.busy_tenants, tenant)):
                counter[name] -= 1
                if counter[name] <= 0:
                    del counter[name]

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

    async def _attempt(self, delivery: Delivery, host: str) -> None:
        settings = self.settings
        delivery_id, attempt = str(delivery.id), delivery.attempts
        started = utcnow()
        t0 = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        permanent = False
        retry_after: float | None = None
        try:
            parts = urlsplit(delivery.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise WebhookRefused(f"not an http(s) URL: {delivery.url!r}")
            if is_ip(parts.hostname):
                why = address_refusal(parts.hostname, settings.webhook_allow_private, self.allowed)
                if why is not None:
                    raise WebhookRefused(why)
            keys = await self.signing_keys(delivery.tenant)
            if not keys:
                raise NoSigningSecret(
                    f"tenant {delivery.tenant} has no webhook signing secret"
                    f" (conveyor webhooks secret rotate --tenant {delivery.tenant})"
                )
            body = webhook_body(
                delivery_id,
                delivery.event,
                delivery.seq,
                delivery.previous,
                delivery.job,
                delivery.created_at,
            )
            headers = signed_headers(keys, body, delivery_id, event_type(delivery.event))
            assert self.session is not None
            async with self.session.post(
                delivery.url,
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
            status = deliveries.SUCCEEDED
        elif permanent:
            status = deliveries.FAILED
        else:
            delay = lifecycle.backoff_s(
                attempt, settings.webhook_retry_base_s, settings.webhook_retry_cap_s, retry_after
            )
            next_at = utcnow() + timedelta(seconds=delay)
            deadline = delivery.created_at + timedelta(seconds=settings.webhook_retry_window_s)
            if next_at > deadline:
                status, next_at = deliveries.FAILED, None
                error = f"{error} (gave up after {attempt} attempts)"
            else:
                status = deliveries.PENDING
        await deliveries.record(
            self.engine,
            Attempt(
                delivery_id=delivery.id,
                attempt=attempt,
                started_at=started,
                status_code=status_code,
                latency_ms=latency_ms,
                error=error,
                notifier=self.name,
                status=status,
                next_at=next_at,
            ),
        )
        log.info(
            "webhook attempt",
            extra={
                "delivery_id": delivery_id,
                "job_id": str(delivery.job_id),
                "event": delivery.event,
                "attempt": attempt,
                "host": host,
                "status_code": status_code,
                "latency_ms": round(latency_ms, 1),
                "outcome": status,
                "error": error,
            },
        )
