"""The `conveyor` command line: submit, inspect, watch, cancel and retry jobs; run migrations.

    conveyor submit "Write a haiku about queues." --watch
    echo "Summarise this" | conveyor submit - --lane bulk --label team=search
    conveyor list --status running --limit 20
    conveyor get 6f1c...   |   conveyor watch 6f1c...   |   conveyor stats
    conveyor watch 6f1c... 9a2b... 0c3d...     (a live table of many jobs)

It talks to the gateway and the notifier through `conveyor.client.ConveyorClient`
(targets from --gateway/--notifier or the settings, API key from CONVEYOR_API_KEY).
Server errors print `error: <CODE>: <details>` on stderr and exit 3. `--watch` and
`watch` exit 0 when the job succeeded, 1 when it failed or is dead, 2 when cancelled
(for many jobs: 1 if any failed or is dead, else 2 if any was cancelled, else 0).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any, TextIO

from google.protobuf.json_format import MessageToJson

from conveyor.client import (
    ConveyorClient,
    ConveyorError,
    build_messages,
    job_status_name,
    job_status_value,
    terminal_job,
)
from conveyor.config import get_settings
from conveyor.v1 import events_pb2, jobs_pb2

DEFAULT_MODEL = "claude-sonnet-4-5"
DEFAULT_MAX_TOKENS = 256

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 2
EXIT_SERVER_ERROR = 3
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


# --------------------------------------------------------------------------- pure helpers


def parse_key_value(text: str) -> tuple[str, str]:
    """`k=v` -> ("k", "v"); the value may contain "=" and may be empty, the key may not."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_statuses(text: str) -> list[jobs_pb2.JobStatus.ValueType]:
    """The JobStatus values of "running" or "failed,dead"."""
    try:
        return [job_status_value(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def read_prompt(prompt: str, stdin: TextIO | None = None) -> str:
    """The prompt itself, or everything on stdin when it is "-"."""
    if prompt == "-":
        return (stdin or sys.stdin).read()
    return prompt


def build_submit_request(
    args: argparse.Namespace, stdin: TextIO | None = None
) -> jobs_pb2.SubmitJobRequest:
    """The SubmitJobRequest that `conveyor submit` sends for parsed `args`."""
    request = jobs_pb2.SubmitJobRequest(
        model=args.model,
        system=args.system,
        messages=build_messages(read_prompt(args.prompt, stdin)),
        max_tokens=args.max_tokens,
        stop_sequences=list(args.stop),
        metadata=dict(args.meta),
        priority=args.priority,
        lane=args.lane,
        idempotency_key=args.idempotency_key,
        max_attempts=args.max_attempts,
        webhook_url=args.webhook,
        labels=dict(args.label),
        webhook_events=WEBHOOK_EVENTS.get(
            getattr(args, "webhook_events", "") or "", jobs_pb2.WEBHOOK_EVENTS_UNSPECIFIED
        ),
    )
    if args.temperature is not None:
        request.temperature = args.temperature
    if args.delay is not None:
        request.delay.FromTimedelta(timedelta(seconds=args.delay))
    if args.timeout is not None:
        request.timeout.FromTimedelta(timedelta(seconds=args.timeout))
    return request


WEBHOOK_EVENTS: dict[str, jobs_pb2.WebhookEvents.ValueType] = {
    "terminal": jobs_pb2.WEBHOOK_EVENTS_TERMINAL,
    "all": jobs_pb2.WEBHOOK_EVENTS_ALL,
}


def exit_code_for_all(statuses: Sequence[int]) -> int:
    """For many jobs: 1 if any failed, is dead or unfinished; else 2 if any was
    cancelled; else 0."""
    codes = {exit_code_for(s) for s in statuses} or {EXIT_FAILED}
    for code in (EXIT_FAILED, EXIT_CANCELLED):
        if code in codes:
            return code
    return EXIT_OK


def exit_code_for(status: int) -> int:
    """0 for succeeded, 2 for cancelled, 1 for anything else (failed, dead, unfinished)."""
    if status == jobs_pb2.JOB_STATUS_SUCCEEDED:
        return EXIT_OK
    if status == jobs_pb2.JOB_STATUS_CANCELLED:
        return EXIT_CANCELLED
    return EXIT_FAILED


def describe_job(job: jobs_pb2.Job) -> str:
    """One line: id, status, attempts, and usage or the error, whichever applies."""
    parts = [job.id, job_status_name(job.status), f"attempts={job.attempts}/{job.max_attempts}"]
    if job.status == jobs_pb2.JOB_STATUS_SUCCEEDED:
        parts.append(f"stop_reason={job.stop_reason or '-'}")
    if job.HasField("usage"):
        parts.append(f"tokens in={job.usage.input_tokens} out={job.usage.output_tokens}")
    if job.HasField("error") and job.status != jobs_pb2.JOB_STATUS_SUCCEEDED:
        parts.append(f"error={job.error.code}: {job.error.message}")
    if job.dead_reason:
        parts.append(f"dead_reason={job.dead_reason}")
    return "  ".join(parts)


def format_created(job: jobs_pb2.Job) -> str:
    if not job.HasField("created_at"):
        return "-"
    return job.created_at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_table(jobs: Sequence[jobs_pb2.Job]) -> str:
    """The `conveyor list` table (times in UTC)."""
    header = ("ID", "STATUS", "LANE", "PRI", "MODEL", "CREATED (UTC)", "ATTEMPTS")
    rows = [header] + [
        (
            job.id,
            job_status_name(job.status),
            job.lane,
            str(job.priority),
            job.model,
            format_created(job),
            f"{job.attempts}/{job.max_attempts}",
        )
        for job in jobs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# --------------------------------------------------------------------------- streaming


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
            write(delta.text)
            parts.append(delta.text)
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
        note(describe_job(final))
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


WATCH_HEADER = ("ID", "STATUS", "ATTEMPT", "TOKENS", "ELAPSED", "NOTE")


def render_watch_table(lines: Sequence[JobLine]) -> str:
    """The `conveyor watch` table, one row per job, in the order given."""
    rows = [WATCH_HEADER, *(line.cells() for line in lines)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(WATCH_HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


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


async def watch_table(
    client: ConveyorClient, ids: Sequence[str], out: TextIO, *, live: bool
) -> list[jobs_pb2.Job]:
    """Follow many jobs on one WatchJobs stream and return their final states.

    On a terminal (`live`), a table of every job is redrawn in place as statuses
    and progress arrive; otherwise a line is printed per status change, then the
    final table.
    """
    lines = {job_id: JobLine(job_id) for job_id in ids}
    finals: dict[str, jobs_pb2.Job] = {}
    drawn = 0
    last_draw = 0.0
    loop = asyncio.get_running_loop()

    def draw() -> None:
        nonlocal drawn, last_draw
        text = render_watch_table([lines[i] for i in ids])
        if drawn:
            out.write(f"\x1b[{drawn}F\x1b[J")
        out.write(text + "\n")
        out.flush()
        drawn = text.count("\n") + 1
        last_draw = loop.time()

    async for event in client.watch_jobs(ids, progress_interval=timedelta(milliseconds=500)):
        line = lines.get(event.job_id)
        if line is None:
            continue
        changed = apply_event(line, event)
        job = terminal_job(event)
        if job is not None:
            finals[event.job_id] = job
        if live:
            if changed or loop.time() - last_draw > 0.2:
                draw()
        elif changed:
            cells = line.cells()
            out.write(f"{cells[0]}  {cells[1]}  attempt={cells[2]}  {cells[5]}".rstrip() + "\n")
            out.flush()
    if live:
        draw()
    else:
        out.write(render_watch_table([lines[i] for i in ids]) + "\n")
    for job_id in ids:
        if job_id not in finals or not finals[job_id].HasField("created_at"):
            finals[job_id] = await client.get(job_id)
    return [finals[i] for i in ids]


# --------------------------------------------------------------------------- commands


def _client(args: argparse.Namespace) -> ConveyorClient:
    return ConveyorClient(args.gateway, args.notifier, secure=args.tls)


async def cmd_submit(args: argparse.Namespace) -> int:
    request = build_submit_request(args)
    if not any(m.content.strip() for m in request.messages):
        print("error: the prompt is empty", file=sys.stderr)
        return EXIT_USAGE
    async with _client(args) as client:
        response = await client.submit_request(request)
        job = response.job
        if response.idempotent_replay:
            print(f"note: idempotency key matched existing job {job.id}", file=sys.stderr)
        if not args.watch:
            print(job.id)
            return EXIT_OK
        print(f"job {job.id}", file=sys.stderr)
        link = trace_link(job.trace_id)
        if link:
            print(f"trace: {link}", file=sys.stderr)
        try:
            final = await stream_job(client, job.id, sys.stdout, sys.stderr)
        except asyncio.CancelledError:
            print(f"\nstopped watching; the job goes on: conveyor watch {job.id}", file=sys.stderr)
            raise
        return exit_code_for(final.status)


def trace_link(trace_id: str) -> str | None:
    """A link to the job's trace in Jaeger, when CONVEYOR_JAEGER_URL is set."""
    base = get_settings().jaeger_url
    return f"{base.rstrip('/')}/trace/{trace_id}" if base and trace_id else None


async def cmd_get(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        job = await client.get(args.id)
    print(MessageToJson(job, preserving_proto_field_name=True, indent=2))
    link = trace_link(job.trace_id)
    if link:
        print(f"trace: {link}", file=sys.stderr)
    return EXIT_OK


async def cmd_list(args: argparse.Namespace) -> int:
    statuses = [s for group in args.status for s in group]
    limit: int = args.limit
    jobs: list[jobs_pb2.Job] = []
    async with _client(args) as client:
        page_size = min(limit, 1000) if limit > 0 else 1000
        async for job in client.iter_jobs(statuses, args.lane, dict(args.label), page_size):
            jobs.append(job)
            if 0 < limit <= len(jobs):
                break
    print(format_table(jobs))
    return EXIT_OK


async def cmd_watch(args: argparse.Namespace) -> int:
    ids: list[str] = list(dict.fromkeys(args.ids))
    async with _client(args) as client:
        if len(ids) == 1:
            final = await stream_job(client, ids[0], sys.stdout, sys.stderr)
            return exit_code_for(final.status)
        finals = await watch_table(client, ids, sys.stdout, live=sys.stdout.isatty())
    return exit_code_for_all([job.status for job in finals])


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        job = await client.cancel(args.id, args.reason)
    status = job_status_name(job.status)
    pending = job.HasField("cancel_requested_at") and job.status != jobs_pb2.JOB_STATUS_CANCELLED
    print(f"{job.id} {status}" + (" (cancel requested)" if pending else ""))
    return EXIT_OK


async def cmd_retry(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        job = await client.retry(args.id)
    print(f"{job.id} {job_status_name(job.status)}")
    return EXIT_OK


async def cmd_stats(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        stats = await client.stats()
    print(
        MessageToJson(
            stats,
            preserving_proto_field_name=True,
            indent=2,
            always_print_fields_with_no_presence=True,
        )
    )
    return EXIT_OK


async def cmd_migrate(args: argparse.Namespace) -> int:
    from conveyor.db.engine import migrate

    try:
        await migrate(get_settings().database_url.get_secret_value())
    except Exception as exc:  # the CLI's edge: report, never print the URL
        print(f"error: migrations failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("database is up to date")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _connection_flags(parser: argparse.ArgumentParser, default: object) -> None:
    settings = get_settings()
    parser.add_argument(
        "--gateway",
        default=default,
        metavar="HOST:PORT",
        help=f"gateway address (default {settings.gateway_target})",
    )
    parser.add_argument(
        "--notifier",
        default=default,
        metavar="HOST:PORT",
        help=f"notifier address (default {settings.notifier_target})",
    )
    parser.add_argument(
        "--tls", action="store_true", default=default, help="use TLS for both connections"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Submit and follow Conveyor jobs (LLM calls run as durable background jobs).",
        epilog="The API key, if any, is read from CONVEYOR_API_KEY.",
    )
    _connection_flags(parser, None)
    parser.set_defaults(tls=False)
    # The same flags are accepted after the subcommand; SUPPRESS keeps the global value.
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = command("submit", cmd_submit, "submit a job (one user message); print its id")
    p.add_argument("prompt", help='the user message, or "-" to read it from stdin')
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="SEQ", help="stop sequence")
    p.add_argument("--priority", type=int, default=0, help="0 (lowest) to 9")
    p.add_argument("--lane", default="", help="interactive, default or bulk")
    p.add_argument("--idempotency-key", default="")
    p.add_argument("--delay", type=non_negative_float, metavar="SECONDS", help="run later")
    p.add_argument("--timeout", type=non_negative_float, metavar="SECONDS", help="per call")
    p.add_argument("--max-attempts", type=int, default=0, help="0 means the server default")
    p.add_argument(
        "--label", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE"
    )
    p.add_argument(
        "--meta",
        type=parse_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Messages API metadata",
    )
    p.add_argument("--webhook", default="", metavar="URL", help="POSTed when the job finishes")
    p.add_argument(
        "--webhook-events",
        choices=("terminal", "all"),
        default="",
        help="POST the webhook on terminal statuses (default) or on every status change",
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="stream the tokens; exit 0 succeeded, 1 failed/dead, 2 cancelled",
    )

    p = command("get", cmd_get, "print a job as JSON")
    p.add_argument("id")

    p = command("list", cmd_list, "list jobs, newest first")
    p.add_argument(
        "--status",
        type=parse_statuses,
        action="append",
        default=[],
        metavar="STATUS[,STATUS]",
        help="pending, scheduled, running, succeeded, failed, cancelled, dead",
    )
    p.add_argument("--lane", default="")
    p.add_argument(
        "--label", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE"
    )
    p.add_argument("--limit", type=int, default=50, help="at most this many (0: all)")

    p = command(
        "watch",
        cmd_watch,
        "follow jobs until they finish: one job's tokens as they stream, or a live table of many",
    )
    p.add_argument("ids", nargs="+", metavar="ID")

    p = command("cancel", cmd_cancel, "cancel a job")
    p.add_argument("id")
    p.add_argument("--reason", default="cancelled from the CLI")

    p = command("retry", cmd_retry, "replay a failed or dead job")
    p.add_argument("id")

    command("stats", cmd_stats, "print job and queue statistics as JSON")
    command("migrate", cmd_migrate, "create the database if needed and apply migrations")
    from conveyor import admin  # operator commands: keys, tenants (on the database)

    admin.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `conveyor` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(handler(args))
    except ConveyorError as exc:
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except TimeoutError:
        print("error: timed out", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
