"""One trace per job across every service, and Prometheus metrics per service."""

from __future__ import annotations

import urllib.request

import pytest
import sqlalchemy as sa
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2
from tests.conftest import eventually
from tests.otlp_receiver import ReceivedSpan, Receiver
from tests.stack import Stack

pytestmark = pytest.mark.integration


def _tree(spans: list[ReceivedSpan]) -> str:
    by_parent: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        by_parent.setdefault(s.parent_id, []).append(s)
    ids = {s.span_id for s in spans}
    lines: list[str] = []

    def walk(span: ReceivedSpan, depth: int) -> None:
        lines.append(f"{'  ' * depth}{span.service}: {span.name}")
        for child in by_parent.get(span.span_id, []):
            walk(child, depth + 1)

    for root in [s for s in spans if s.parent_id not in ids]:
        walk(root, 0)
    return "\n".join(lines)


async def test_a_job_is_one_trace_from_submit_through_rabbitmq_to_the_model_call(
    client: ConveyorClient, otlp: Receiver
) -> None:
    # Slow enough that the watch below is live when the job finishes.
    job = await client.submit(
        "claude-sonnet-4-5", "trace me", max_tokens=16, labels={"x-sim-latency-ms": "500"}
    )
    assert len(job.trace_id) == 32
    done = await client.wait(job.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.trace_id == job.trace_id

    wanted = {
        "submit",
        "conveyor.jobs publish",
        "default process",
        "queue wait",
        "claim",
        "chat claude-sonnet-4-5",
        "write outcome",
    }

    def notified(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
        """The notifier's spans by the status they told watchers of."""
        return {
            str(s.attributes["conveyor.job.status"]): s
            for s in spans
            if s.name == "notify watchers"
        }

    async def complete() -> bool:
        # The notifier exports on its own schedule: wait for its SUCCEEDED span too.
        spans = otlp.trace(job.trace_id)
        return wanted <= {s.name for s in spans} and "succeeded" in notified(spans)

    await eventually(complete, within_s=20)
    spans = otlp.trace(job.trace_id)
    tree = _tree(spans)
    print(tree)
    by_name = {s.name: s for s in spans}
    ids = {s.span_id for s in spans}

    roots = [s for s in spans if s.parent_id not in ids]
    assert len(roots) == 1, f"one tree, not a forest:\n{tree}"
    assert {"conveyor-gateway", "conveyor-worker", "conveyor-notifier"} <= {
        s.service for s in spans
    }

    # The parent links survive the trip through RabbitMQ.
    publish, process = by_name["conveyor.jobs publish"], by_name["default process"]
    assert publish.service == "conveyor-gateway" and publish.kind == Span.SPAN_KIND_PRODUCER
    assert process.service == "conveyor-worker" and process.parent_id == publish.span_id
    assert process.kind == Span.SPAN_KIND_CONSUMER
    assert by_name["queue wait"].parent_id == process.span_id

    assert "succeeded" in notified(spans), "watchers were told the job succeeded"
    notify = notified(spans)["succeeded"]
    assert notify.service == "conveyor-notifier" and notify.parent_id == process.span_id

    chat = by_name["chat claude-sonnet-4-5"]
    assert chat.kind == Span.SPAN_KIND_CLIENT
    assert chat.attributes["gen_ai.request.model"] == "claude-sonnet-4-5"
    assert chat.attributes["gen_ai.usage.input_tokens"] == done.usage.input_tokens
    assert chat.attributes["gen_ai.usage.output_tokens"] == done.usage.output_tokens
    assert chat.attributes["gen_ai.response.finish_reasons"] == [done.stop_reason]
    assert chat.attributes["conveyor.retry_number"] == 0


async def test_a_retried_job_keeps_one_trace_across_attempts(
    client: ConveyorClient, otlp: Receiver
) -> None:
    job = await client.submit(
        "claude-sonnet-4-5",
        "retry me",
        max_tokens=8,
        labels={"x-sim-fail": "500", "x-sim-fail-attempts": "1"},
    )
    done = await client.wait(job.id, 30)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED and done.attempts == 2

    async def both_attempts() -> bool:
        spans = otlp.trace(job.trace_id)
        chats = [s for s in spans if s.name.startswith("chat ")]
        # Each process exports on its own schedule: wait for the dispatcher's too.
        return len(chats) == 2 and "conveyor-dispatcher" in {s.service for s in spans}

    await eventually(both_attempts, within_s=20)
    chats = sorted(
        (s for s in otlp.trace(job.trace_id) if s.name.startswith("chat ")),
        key=lambda s: int(str(s.attributes["conveyor.retry_number"])),
    )
    assert [c.attributes["conveyor.retry_number"] for c in chats] == [0, 1]
    assert chats[0].attributes["error.type"] == "api_error"
    assert {s.service for s in otlp.trace(job.trace_id)} >= {"conveyor-dispatcher"}


def _metrics(port: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


async def test_each_service_exposes_prometheus_metrics(
    client: ConveyorClient, stack: Stack
) -> None:
    await client.wait((await client.submit("claude-sonnet-4-5", "m", max_tokens=8)).id, 30)
    gateway = _metrics(stack.env["CONVEYOR_GATEWAY_METRICS_PORT"])
    worker = _metrics(stack.env["CONVEYOR_WORKER_METRICS_PORT"])
    dispatcher = _metrics(stack.env["CONVEYOR_DISPATCHER_METRICS_PORT"])
    assert 'conveyor_jobs_submitted_total{lane="default"}' in gateway
    assert 'conveyor_jobs_finished_total{lane="default",status="succeeded"}' in worker
    assert "conveyor_queue_wait_seconds_bucket" in worker
    assert 'conveyor_tokens_total{direction="output",model="claude-sonnet-4-5"}' in worker
    assert "conveyor_worker_in_flight" in worker

    async def depth_sampled() -> bool:
        return 'conveyor_queue_depth{queue="conveyor.dead"}' in _metrics(
            stack.env["CONVEYOR_DISPATCHER_METRICS_PORT"]
        )

    await eventually(depth_sampled, within_s=15)
    assert dispatcher


async def test_stats_counters_agree_with_the_jobs_table(
    client: ConveyorClient, db: AsyncEngine
) -> None:
    failing = await client.submit(
        "claude-sonnet-4-5", "f", max_tokens=8, lane="interactive", labels={"x-sim-fail": "400"}
    )
    ok = await client.submit("claude-sonnet-4-5", "s", max_tokens=8, lane="interactive")
    await client.wait(failing.id, 30)
    await client.retry(failing.id)  # failed → pending → failed again: counted once, as failed
    await client.wait(failing.id, 30)
    await client.wait(ok.id, 30)

    stats = await client.stats()
    async with db.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT lane, status, count(*) AS n, coalesce(sum(output_tokens), 0) AS out"
                    " FROM jobs WHERE tenant = 'default' GROUP BY 1, 2"
                )
            )
        ).all()
    truth: dict[str, int] = {}
    for row in rows:
        truth[row.status] = truth.get(row.status, 0) + row.n
    assert dict(stats.counts) == truth
    per_lane = {lane.lane: dict(lane.counts) for lane in stats.lanes}
    assert per_lane["interactive"] == {r.status: r.n for r in rows if r.lane == "interactive"}
    assert stats.tokens.output_tokens >= sum(r.out for r in rows)
