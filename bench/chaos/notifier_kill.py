"""kill -9 of a notifier under open watches: each resumes on a second notifier, and
every sequence number arrives exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import grpc
import grpc.aio

from conveyor.core.lifecycle import TERMINAL
from conveyor.v1 import events_pb2, events_pb2_grpc
from devtools import devstack, sandbox

from .results import Row
from .rig import Chaos, sim_labels


@dataclass
class Watch:
    """What one WatchJob reader received, over every stream it opened."""

    job_id: str
    sequences: list[int] = field(default_factory=list)
    """Sequence numbers of the events proper (status changes, deltas), as received."""
    deltas: list[tuple[int, str]] = field(default_factory=list)
    terminal: int = 0
    streams: int = 0
    resumed_at: float | None = None
    """time.time() of the first event from the second notifier."""


async def follow(
    job_id: str,
    stubs: list[events_pb2_grpc.JobEventsStub],
    switched: asyncio.Event,
    watch: Watch,
) -> None:
    """Watch a job on the first notifier; when its stream breaks, resume after the last
    sequence number received on the second one. Nothing is filtered: a repeated or
    reordered event stays in `watch.sequences`."""
    last = 0
    failures = 0
    while watch.terminal == 0:
        target = 1 if switched.is_set() else 0
        watch.streams += 1
        call = stubs[target].WatchJob(events_pb2.WatchJobRequest(id=job_id, after_sequence=last))
        try:
            async for event in call:
                kind = event.WhichOneof("payload")
                if kind not in ("status_changed", "token_delta"):
                    continue
                if target == 1 and watch.resumed_at is None:
                    watch.resumed_at = time.time()
                watch.sequences.append(event.sequence)
                last = max(last, event.sequence)
                if kind == "token_delta":
                    watch.deltas.append((event.token_delta.attempt, event.token_delta.text))
                elif event.status_changed.status in TERMINAL_STATUSES:
                    watch.terminal += 1
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise
        finally:
            call.cancel()
        failures += 1
        if failures > 40:
            return
        await asyncio.sleep(0.1)


TERMINAL_STATUSES = frozenset(state.to_proto() for state in TERMINAL)


async def notifier_kill(chaos: Chaos, count: int = 100) -> Row:
    """kill -9 of a notifier while `count` watches stream from it; each resumes on a
    second notifier after its last sequence number."""
    row = Row("notifier kill")
    port = sandbox.free_port()
    second = f"{chaos.stack.settings.notifier_host}:{port}"
    chaos.stack.services["notifier-2"] = devstack.Service(
        "notifier-2", "services.notifier", "grpc", second, "JobEvents"
    )
    await chaos.start(
        "notifier-2", CONVEYOR_NOTIFIER_PORT=str(port), CONVEYOR_NOTIFIER_METRICS_PORT="0"
    )
    channels = [
        grpc.aio.insecure_channel(t, options=[("grpc.use_local_subchannel_pool", 1)])
        for t in (chaos.stack.notifier, second)
    ]
    try:
        stubs = [events_pb2_grpc.JobEventsStub(c) for c in channels]
        before = await chaos.calls()
        sub = await chaos.submit_batches(
            "notifier-kill", count, sim_labels(300, tokens=48, per_second=8), batch=count
        )
        switched = asyncio.Event()
        watches = {j: Watch(j) for j in sub.accepted}
        readers = [asyncio.create_task(follow(j, stubs, switched, w)) for j, w in watches.items()]
        until = chaos.budget(40)
        while time.monotonic() < until and not all(w.deltas for w in watches.values()):  # noqa: ASYNC110 - 100 readers feed it
            await asyncio.sleep(0.05)
        streaming = sum(1 for w in watches.values() if w.deltas)
        if streaming < count:
            row.failures.append(f"only {streaming} of {count} watches had tokens at the kill")
        row.in_flight = await chaos.in_flight_now()
        switched.set()  # set first: a reader whose stream breaks goes to the second one
        killed_at = time.time()
        await chaos.kill("notifier")
        try:
            await asyncio.wait_for(
                asyncio.gather(*readers), timeout=max(1.0, until - time.monotonic() + 30)
            )
        except TimeoutError:
            row.failures.append("watches still open after the time limit")
        await chaos.settle(list(sub.accepted), chaos.budget(30))
        await chaos.account(
            row, ["notifier-kill"], sub.accepted, await chaos.calls() - before, None
        )
        await check_watches(chaos, row, watches, killed_at)
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        with contextlib.suppress(Exception):
            await chaos.stop("notifier-2")
        if chaos.stack.pid("notifier") is None:
            await chaos.start("notifier")
    return row


async def check_watches(
    chaos: Chaos, row: Row, watches: dict[str, Watch], killed_at: float
) -> None:
    """Every sequence number once, in order; each attempt's text whole; one terminal event."""
    results = {
        r["id"]: (r["result_text"] or "", int(r["attempts"]))
        for r in await chaos.query(
            "SELECT id::text AS id, result_text, attempts FROM jobs WHERE id = ANY($1::uuid[])",
            list(watches),
        )
    }
    repeated = sum(len(w.sequences) - len(set(w.sequences)) for w in watches.values())
    unordered = sum(1 for w in watches.values() if w.sequences != sorted(w.sequences))
    short = 0
    for w in watches.values():
        text, attempt = results.get(w.job_id, ("", 0))
        got = "".join(t for a, t in w.deltas if a == attempt)
        if got != text:
            short += 1
            if short == 1:
                row.notes.append(
                    f"e.g. job {w.job_id}: {len(got)} of {len(text)} characters of its text"
                    f" arrived; sequence numbers received after 10: {w.sequences[10:]}"
                )
    no_end = sum(1 for w in watches.values() if w.terminal == 0)
    twice = sum(1 for w in watches.values() if w.terminal > 1)
    resumed = [w.resumed_at for w in watches.values() if w.resumed_at is not None]
    if resumed:
        row.recovery_s = max(resumed) - killed_at
    row.lost += short + no_end
    row.finished_twice += twice
    if repeated:
        row.failures.append(f"{repeated} sequence numbers arrived twice")
    if unordered:
        row.failures.append(f"{unordered} watches got events out of order")
    row.notes.append(
        f"{len(watches)} watches, {len(resumed)} resumed on the second notifier"
        f" ({sum(w.streams for w in watches.values())} streams opened): {repeated}"
        f" sequence numbers twice, {unordered} out of order, {short} texts not whole,"
        f" {no_end} without their terminal event; recovery is kill to the last watch's"
        " first event from the second notifier"
    )
