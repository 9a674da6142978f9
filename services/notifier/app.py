"""Start-up of the notifier: its own queue on the events exchange (every instance sees
every event published: status changes, and the token deltas of watched attempts),
the text-so-far client and the watches it registers with the workers, the webhook
relay and sender, and the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

from conveyor.bus import broker
from conveyor.bus.catchup import TextSoFarClient
from conveyor.core.config import Settings
from conveyor.server.runtime import backing_services, freeze_startup_heap, serving
from conveyor.v1 import events_pb2, events_pb2_grpc

from .hub import Hub
from .interest import Interest
from .servicer import JobEventsServicer
from .stream import Services
from .stream import Settings as StreamSettings
from .webhooks import WebhookSender

log = logging.getLogger(__name__)
SERVICE_NAME = events_pb2.DESCRIPTOR.services_by_name["JobEvents"].full_name
SWEEP_S = 10.0


async def _sweep(hub: Hub, stop: asyncio.Event) -> None:
    """Forget the deltas of attempts that ended a while ago."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SWEEP_S)
        hub.sweep()


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    name = f"{socket.gethostname()}:{os.getpid()}"
    async with backing_services(settings, "notifier") as (engine, connection):
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=0)
        topology = await broker.declare_topology(channel, settings.lanes, settings.max_priority)
        hub = Hub(
            settings.notifier_job_log_bytes,
            settings.notifier_logs_bytes,
            settings.notifier_log_linger_s,
        )
        # Each notifier instance binds its own queue, so any of them can serve any watcher.
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(topology.events, "job.#")
        await queue.consume(hub.on_message, no_ack=True)
        # Events published while the connection was down never reached this notifier.
        connection.reconnect_callbacks.add(lambda *_: hub.reset())
        # Named in each watch it registers with the workers (services.notifier.interest).
        text = TextSoFarClient(channel, topology.events, f"{name}:{uuid.uuid4().hex[:8]}")
        await text.start()
        interest = Interest(hub, text)

        webhook_channel = await connection.channel(publisher_confirms=True)
        sender = WebhookSender(settings, engine, name)
        await sender.start(webhook_channel, await webhook_channel.get_queue(broker.WEBHOOKS_QUEUE))
        background = [
            asyncio.create_task(sender.relay(stop)),
            asyncio.create_task(_sweep(hub, stop)),
            asyncio.create_task(interest.run(stop)),
        ]

        services = Services(
            engine,
            hub,
            text,
            StreamSettings(
                catchup_timeout_s=settings.notifier_catchup_timeout_s,
                idle_check_s=settings.notifier_idle_check_s,
            ),
            interest,
        )
        servicer = JobEventsServicer(services, settings)
        async with serving(
            [SERVICE_NAME],
            lambda s: events_pb2_grpc.add_JobEventsServicer_to_server(servicer, s),
            f"{settings.notifier_host}:{settings.notifier_port}",
            settings=settings,
            engine=engine,
            grace_s=2,
        ) as port:
            freeze_startup_heap()
            log.info("notifier ready", extra={"address": f"{settings.notifier_host}:{port}"})
            await stop.wait()
        await sender.stop()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
