"""Commands on jobs: get, list, cancel, retry, delete, priority, history, stats; the
live lane view (`top`); and migrate."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import RenderableType
from rich.live import Live
from rich.table import Table

from conveyor.cli import output
from conveyor.cli.base import (
    EXIT_FAILED,
    EXIT_OK,
    KEY_VALUE,
    STATUSES,
    connection,
    connection_options,
    run,
)
from conveyor.cli.watching import trace_link
from conveyor.client import ConveyorClient, ConveyorError, job_status_name
from conveyor.v1 import jobs_pb2

json_option = click.option("--json", "as_json", is_flag=True, help="print JSON (for scripts)")


@click.command("get")
@click.argument("id")
@click.option("--blocks", is_flag=True, help="print the answer's content blocks readably")
@json_option
@connection_options
@run
async def get_command(id: str, blocks: bool, as_json: bool) -> int:
    """Print a job as JSON (content blocks and request decoded)."""
    async with connection().client() as client:
        job = await client.get(id)
    if blocks and not as_json:
        print(output.format_blocks(job))
    else:
        output.print_json(output.job_dict(job))
    link = trace_link(job.trace_id)
    if link:
        print(f"trace: {link}", file=sys.stderr)
    return EXIT_OK


@click.command("list")
@click.option(
    "--status",
    "statuses",
    type=STATUSES,
    multiple=True,
    help="pending, scheduled, running, succeeded, failed, cancelled, dead (comma-separated)",
)
@click.option("--lane", default="")
@click.option("--label", type=KEY_VALUE, multiple=True)
@click.option("--limit", type=click.IntRange(min=0), default=50, help="at most this many (0: all)")
@json_option
@connection_options
@run
async def list_command(
    statuses: tuple[list[Any], ...],
    lane: str,
    label: tuple[tuple[str, str], ...],
    limit: int,
    as_json: bool,
) -> int:
    """List jobs, newest first."""
    wanted = [s for group in statuses for s in group]
    jobs: list[jobs_pb2.Job] = []
    async with connection().client() as client:
        page_size = min(limit, 1000) if limit > 0 else 1000
        async for job in client.iter_jobs(wanted, lane, dict(label), page_size):
            jobs.append(job)
            if 0 < limit <= len(jobs):
                break
    if as_json:
        output.print_json([output.job_dict(job) for job in jobs])
    else:
        output.show(output.job_table(jobs))
    return EXIT_OK


@click.command("cancel")
@click.argument("id")
@click.option("--reason", default="cancelled from the CLI")
@connection_options
@run
async def cancel_command(id: str, reason: str) -> int:
    """Cancel a job (for many at once: conveyor bulk cancel)."""
    async with connection().client() as client:
        job = await client.cancel(id, reason)
    status = job_status_name(job.status)
    pending = job.HasField("cancel_requested_at") and job.status != jobs_pb2.JOB_STATUS_CANCELLED
    print(f"{job.id} {status}" + (" (cancel requested)" if pending else ""))
    return EXIT_OK


@click.command("retry")
@click.argument("id")
@connection_options
@run
async def retry_command(id: str) -> int:
    """Replay a failed or dead job (for many at once: conveyor bulk retry)."""
    async with connection().client() as client:
        job = await client.retry(id)
    print(f"{job.id} {job_status_name(job.status)}")
    return EXIT_OK


@click.command("delete")
@click.argument("id")
@connection_options
@run
async def delete_command(id: str) -> int:
    """Erase a finished job with its history and webhook deliveries, now."""
    async with connection().client() as client:
        await client.delete(id)
    print(f"{id} deleted")
    return EXIT_OK


@click.command("priority")
@click.argument("id")
@click.argument("priority", type=click.IntRange(0, 9))
@connection_options
@run
async def priority_command(id: str, priority: int) -> int:
    """Change a pending or scheduled job's priority (0 lowest to 9)."""
    async with connection().client() as client:
        job = await client.set_priority(id, priority)
    print(f"{job.id} {job_status_name(job.status)} priority={job.priority}")
    return EXIT_OK


@click.command("history")
@click.argument("id")
@json_option
@connection_options
@run
async def history_command(id: str, as_json: bool) -> int:
    """A job's stored transitions, oldest first, with who caused each."""
    async with connection().client() as client:
        entries = await client.history(id)
    if as_json:
        output.print_json([output.message_dict(e) for e in entries])
        return EXIT_OK
    t = output.table("SEQ", "TIME (UTC)", "FROM", "TO", "ATTEMPT", "ACTOR", numeric=("SEQ",))
    for e in entries:
        t.add_row(
            str(e.sequence),
            output.timestamp(e, "time"),
            job_status_name(e.previous) if e.previous else "-",
            output.status_text(e.status),
            str(e.attempt),
            e.actor or "conveyor",
        )
    output.show(t)
    return EXIT_OK


@click.command("stats")
@click.option("--tenant", default="", help="another tenant's (operator keys)")
@click.option("--all-tenants", is_flag=True, help="every tenant's, one row each (operator keys)")
@json_option
@connection_options
@run
async def stats_command(tenant: str, all_tenants: bool, as_json: bool) -> int:
    """Jobs per lane and status, queue and dead-letter depths, run times, tokens."""
    async with connection().client() as client:
        stats = await client.stats(tenant, all_tenants=all_tenants)
    if as_json:
        output.print_json(output.message_dict(stats, defaults=True))
    else:
        output.show(*output.stats_tables(stats))
    return EXIT_OK


# --------------------------------------------------------------------------- top

FINISHED = ("succeeded", "failed", "cancelled", "dead")


@dataclass
class LaneRates:
    """Jobs finished and started per second in each lane, from two stats samples."""

    at: float = 0.0
    finished: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    done_per_s: dict[str, float] = field(default_factory=dict)
    new_per_s: dict[str, float] = field(default_factory=dict)

    def sample(self, stats: jobs_pb2.GetStatsResponse, now: float) -> None:
        finished = {lane.lane: sum(lane.counts.get(s, 0) for s in FINISHED) for lane in stats.lanes}
        total = {lane.lane: sum(lane.counts.values()) for lane in stats.lanes}
        if self.at:
            span = max(now - self.at, 1e-6)
            for lane in finished:
                self.done_per_s[lane] = max(finished[lane] - self.finished.get(lane, 0), 0) / span
                self.new_per_s[lane] = max(total[lane] - self.total.get(lane, 0), 0) / span
        self.at, self.finished, self.total = now, finished, total


def lanes_view(stats: jobs_pb2.GetStatsResponse, rates: LaneRates, paused: dict[str, str]) -> Table:
    """The `conveyor top` screen: a row per lane, then the totals."""
    t = output.table(
        "LANE",
        "QUEUED",
        "PENDING",
        "SCHEDULED",
        "RUNNING",
        "NEW/S",
        "DONE/S",
        "FAILED",
        "DEAD",
        "STATE",
        numeric=("QUEUED", "PENDING", "SCHEDULED", "RUNNING", "NEW/S", "DONE/S", "FAILED", "DEAD"),
        title=time.strftime("conveyor top  %H:%M:%S"),
    )
    for lane in stats.lanes:
        c = lane.counts
        t.add_row(
            lane.lane,
            output.number(lane.queue_depth),
            output.number(c.get("pending", 0)),
            output.number(c.get("scheduled", 0)),
            output.number(c.get("running", 0)),
            f"{rates.new_per_s.get(lane.lane, 0.0):.1f}" if rates.new_per_s else "-",
            f"{rates.done_per_s.get(lane.lane, 0.0):.1f}" if rates.done_per_s else "-",
            output.number(c.get("failed", 0)),
            output.number(c.get("dead", 0)),
            f"[yellow]paused[/] {paused[lane.lane]}".rstrip() if lane.lane in paused else "open",
        )
    p50 = output.seconds(stats.run_time_p50) if stats.HasField("run_time_p50") else "-"
    p95 = output.seconds(stats.run_time_p95) if stats.HasField("run_time_p95") else "-"
    t.caption = (
        f"dead letters {output.number(stats.dead_letter_depth)}   run p50 {p50}  p95 {p95}"
        f"   tokens in {output.number(stats.tokens.input_tokens)}"
        f" out {output.number(stats.tokens.output_tokens)}"
    )
    t.caption_justify = "left"
    return t


async def _pauses(client: ConveyorClient) -> dict[str, str]:
    """Paused lanes (for the caller's tenant or all) and why; {} if not allowed."""
    try:
        pauses = await client.lane_pauses()
    except ConveyorError:  # e.g. PermissionDenied: the view goes on without
        return {}
    return {p.lane: (p.tenant or "all tenants") for p in pauses}


@click.command("top")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, help="seconds")
@click.option(
    "--iterations", type=click.IntRange(min=0), default=0, help="stop after N refreshes (0: never)"
)
@click.option("--tenant", default="", help="another tenant's lanes (operator keys)")
@click.option("--all-tenants", is_flag=True, help="every tenant's jobs (operator keys)")
@connection_options
@run
async def top_command(interval: float, iterations: int, tenant: str, all_tenants: bool) -> int:
    """A live view of the lanes: queue depth, pending, running, rates; Ctrl-C to stop."""
    rates = LaneRates()
    out = output.console()
    async with connection().client() as client:

        async def screen() -> RenderableType:
            stats = await client.stats(tenant, all_tenants=all_tenants)
            rates.sample(stats, time.monotonic())
            return output.fit(lanes_view(stats, rates, await _pauses(client)), out)

        with Live(await screen(), console=out, auto_refresh=False) as view:
            shown = 1
            while not iterations or shown < iterations:
                await asyncio.sleep(interval)
                view.update(await screen(), refresh=True)
                shown += 1
    return EXIT_OK


@click.command("migrate")
def migrate_command() -> int:
    """Create the database if needed and apply migrations (server install)."""
    from conveyor.cli.admin import server_modules

    server_modules()
    from conveyor.core.config import get_settings
    from conveyor.db.engine import migrate

    try:
        asyncio.run(migrate(get_settings().database_url.get_secret_value()))
    except Exception as exc:  # the CLI's edge: report, never print the URL
        print(f"error: migrations failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("database is up to date")
    return EXIT_OK
