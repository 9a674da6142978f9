"""Following jobs: one job's tokens as they stream, or a live table of many
(`conveyor watch`, `conveyor submit --watch`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TextIO

import click
from rich.console import RenderableType
from rich.live import Live
from rich.table import Table

from conveyor.cli import output
from conveyor.cli.base import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    connection,
    connection_options,
    jaeger_url,
    run,
)
from conveyor.client import ConveyorClient, job_status_name, terminal_job
from conveyor.v1 import events_pb2, jobs_pb2


def exit_code_for(status: int) -> int:
    """0 for succeeded, 2 for cancelled, 1 for anything else (failed, dead, unfinished)."""
    if status == jobs_pb2.JOB_STATUS_SUCCEEDED:
        return EXIT_OK
    if status == jobs_pb2.JOB_STATUS_CANCELLED:
        return EXIT_CANCELLED
    return EXIT_FAILED


def exit_code_for_all(statuses: Sequence[int]) -> int:
    """For many jobs: 1 if any failed, is dead or unfinished; else 2 if any was
    cancelled; else 0."""
    codes = {exit_code_for(s) for s in statuses} or {EXIT_FAILED}
    for code in (EXIT_FAILED, EXIT_CANCELLED):
        if code in codes:
            return code
    return EXIT_OK


def trace_link(trace_id: str) -> str | None:
    """A link to the job's trace in Jaeger, when CONVEYOR_JAEGER_URL is set."""
    base = jaeger_url()
    return f"{base.rstrip('/')}/trace/{trace_id}" if base and trace_id else None


async def stream_job(
    client: ConveyorClient,
    job_id: str,
    out: TextIO,
    err: TextIO | None = None,
    *,
    final_line: bool = True,
) -> jobs_pb2.Job:
    """Print the job's tokens to `out` as they arrive and return the final job.

    Status transitions (and, with `final_line`, a closing summary) go to `err`.
    When the watch joined late (or the job had already finished) the rest of
    the result text is printed from the final job. A new attempt restarts the
    text on a fresh line.
    """
    parts: list[str] = []  # the text printed for the current attempt
    attempt = 0
    line_open = False  # `out` holds text not yet ended by a newline
    seen_snapshot = False
    final: jobs_pb2.Job | None = None
    closing_note = ""

    def write(text: str) -> None:
        nonlocal line_open
        if text:
            out.write(text)
            out.flush()
            line_open = not text.endswith("\n")

    def note(text: str) -> None:
        nonlocal line_open
        if err is None:
            return
        if line_open:  # keep notes off the token line on a terminal
            out.write("\n")
            out.flush()
            line_open = False
        err.write(text + "\n")
        err.flush()

    async for event in client.watch(job_id):
        kind = event.WhichOneof("payload")
        job = terminal_job(event)
        if kind == "snapshot":
            if not seen_snapshot and job is None:
                note(f"[{job_status_name(event.snapshot.status)}]")
            seen_snapshot = True
        elif kind == "token_delta":
            delta = event.token_delta
            if delta.attempt != attempt and parts:
                note(f"[attempt {delta.attempt}: the output starts again]")
                parts.clear()
            attempt = delta.attempt
            if delta.kind in (events_pb2.DELTA_KIND_TEXT, events_pb2.DELTA_KIND_UNSPECIFIED):
                write(delta.text)  # the answer's text; tool input and thinking stay off it
                parts.append(delta.text)
            elif delta.block_json and delta.kind != events_pb2.DELTA_KIND_TEXT:
                block = json.loads(delta.block_json)
                what = " ".join(str(block[k]) for k in ("type", "name") if block.get(k))
                note(f"[block {delta.index}: {what}]")
        elif kind == "status_changed":
            change = event.status_changed
            line = (
                f"[{job_status_name(change.previous)} -> {job_status_name(change.status)},"
                f" attempt {change.attempt}]"
            )
            if change.HasField("error") and change.error.code:
                line += f" {change.error.code}: {change.error.message}"
            if job is None:
                note(line)
            else:
                closing_note = line  # after the rest of the text
        if job is not None:
            final = job
            break

    if final is None or not final.HasField("created_at"):
        final = await client.get(job_id)

    if final.result_text and final.status in (
        jobs_pb2.JOB_STATUS_SUCCEEDED,
        jobs_pb2.JOB_STATUS_CANCELLED,
    ):
        printed = "".join(parts)
        if not printed:
            write(final.result_text)
        elif final.result_text.startswith(printed):
            write(final.result_text[len(printed) :])
    if line_open:
        write("\n")
    if closing_note:
        note(closing_note)
    if final_line:
        note(output.describe_job(final))
    return final


@dataclass
class JobLine:
    """One row of the `conveyor watch` table."""

    job_id: str
    status: int = jobs_pb2.JOB_STATUS_UNSPECIFIED
    attempt: int = 0
    tokens: int = 0
    elapsed_s: float | None = None
    note: str = ""

    def cells(self) -> tuple[str, ...]:
        elapsed = "-" if self.elapsed_s is None else f"{self.elapsed_s:.1f}s"
        return (
            self.job_id,
            job_status_name(self.status),
            str(self.attempt or "-"),
            str(self.tokens),
            elapsed,
            self.note,
        )


def watch_table(lines: Sequence[JobLine]) -> Table:
    """The `conveyor watch` table, one row per job, in the order given."""
    t = output.table(
        "ID", "STATUS", "ATTEMPT", "TOKENS", "ELAPSED", "NOTE", numeric=("TOKENS", "ELAPSED")
    )
    for line in lines:
        cells = line.cells()
        t.add_row(cells[0], output.status_text(line.status), *cells[2:])
    return t


def render_watch_table(lines: Sequence[JobLine]) -> str:
    return output.plain(watch_table(lines))


def apply_event(line: JobLine, event: events_pb2.JobEvent) -> bool:
    """Update a job's row from a watch event; True if its status changed."""
    kind = event.WhichOneof("payload")
    before = line.status
    if kind == "snapshot":
        job = event.snapshot
        line.status, line.attempt = job.status, job.attempts
        if job.HasField("usage"):
            line.tokens = job.usage.output_tokens
        if job.HasField("error") and job.status != jobs_pb2.JOB_STATUS_SUCCEEDED:
            line.note = f"{job.error.code}: {job.error.message}"
    elif kind == "status_changed":
        change = event.status_changed
        line.status, line.attempt = change.status, change.attempt
        if change.status == jobs_pb2.JOB_STATUS_RUNNING:
            line.tokens, line.elapsed_s, line.note = 0, 0.0, ""
        if change.HasField("error"):
            line.note = f"{change.error.code}: {change.error.message}"
        if change.HasField("job") and change.job.HasField("usage"):
            line.tokens = change.job.usage.output_tokens
    elif kind == "progress":
        line.tokens = event.progress.output_tokens
        line.elapsed_s = event.progress.elapsed.ToTimedelta().total_seconds()
    return line.status != before


async def watch_many(
    client: ConveyorClient, ids: Sequence[str], out: TextIO, *, live: bool
) -> list[jobs_pb2.Job]:
    """Follow many jobs on one WatchJobs stream and return their final states.

    On a terminal (`live`) a table of every job refreshes in place (rich.live) as
    statuses and progress arrive; otherwise a line is printed per status change,
    then the final table.
    """
    lines = {job_id: JobLine(job_id) for job_id in ids}
    finals: dict[str, jobs_pb2.Job] = {}

    screen = output.console()

    def current() -> RenderableType:
        return output.fit(watch_table([lines[i] for i in ids]), screen)

    def follow(event: events_pb2.JobEvent) -> bool:
        line = lines.get(event.job_id)
        if line is None:
            return False
        changed = apply_event(line, event)
        job = terminal_job(event)
        if job is not None:
            finals[event.job_id] = job
        return changed

    stream = client.watch_jobs(ids, progress_interval=timedelta(milliseconds=500))
    if live:
        with Live(current(), console=screen, refresh_per_second=5) as view:
            async for event in stream:
                follow(event)
                view.update(current())
    else:
        async for event in stream:
            if follow(event):
                cells = lines[event.job_id].cells()
                line = f"{cells[0]}  {cells[1]}  attempt={cells[2]}  {cells[5]}"
                out.write(line.rstrip() + "\n")
                out.flush()
        out.write(render_watch_table([lines[i] for i in ids]) + "\n")
    for job_id in ids:
        if job_id not in finals or not finals[job_id].HasField("created_at"):
            finals[job_id] = await client.get(job_id)
    return [finals[i] for i in ids]


@click.command("watch")
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@connection_options
@run
async def watch_command(ids: tuple[str, ...]) -> int:
    """Follow jobs until they finish: one job's tokens as they stream, or a live table
    of many. Exit 0 succeeded, 1 failed/dead, 2 cancelled (many: the worst)."""
    unique = list(dict.fromkeys(ids))
    async with connection().client() as client:
        if len(unique) == 1:
            final = await stream_job(client, unique[0], sys.stdout, sys.stderr)
            return exit_code_for(final.status)
        finals = await watch_many(client, unique, sys.stdout, live=sys.stdout.isatty())
    return exit_code_for_all([job.status for job in finals])
