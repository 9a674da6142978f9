"""The `conveyor` command line (Click, with Rich tables, progress bars and live views).

    conveyor submit "Write a haiku about queues." --watch
    echo "Summarise this" | conveyor submit - --lane bulk --label team=search
    conveyor submit --from-file jobs.jsonl          (many, with a progress bar)
    conveyor list --status running --limit 20       (a table; --json for scripts)
    conveyor get 6f1c...  |  conveyor watch 6f1c... 9a2b...  |  conveyor stats  |  conveyor top
    conveyor schedules list | bulk cancel --lane bulk --yes | lanes pause bulk | workers list
    conveyor keys | tenants | webhooks secret ...  (operator commands, on the database)

It talks to the gateway and the notifier through `conveyor.client.ConveyorClient`
(--gateway/--notifier before or after the command, or CONVEYOR_GATEWAY_HOST/PORT and
CONVEYOR_NOTIFIER_HOST/PORT; the API key from CONVEYOR_API_KEY).

Exit codes: 0 done; 2 a usage error or invalid input (also INVALID_ARGUMENT from the
server); 3 a server fault (UNAVAILABLE, INTERNAL, UNKNOWN, DEADLINE_EXCEEDED, ...):
worth retrying; 4 the server refused (NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED,
FAILED_PRECONDITION, ALREADY_EXISTS, RESOURCE_EXHAUSTED); 130 Ctrl-C. `--watch` and
`watch` exit 0 when the job succeeded, 1 when it failed or is dead, 2 when cancelled
(many jobs: the worst). Errors print `error: <CODE>: <details>` on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import click

from conveyor.cli import admin, jobs, ops, submit, watching
from conveyor.cli.base import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER_ERROR,
    EXIT_USAGE,
    connection,
    connection_options,
    exit_code_of_error,
    parse_key_value,
    parse_statuses,
)
from conveyor.cli.output import describe_job, format_blocks, format_table, job_dict
from conveyor.cli.submit import DEFAULT_MAX_TOKENS, DEFAULT_MODEL, build_submit_request
from conveyor.cli.watching import exit_code_for, exit_code_for_all, stream_job, trace_link
from conveyor.client import ConveyorError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MODEL",
    "EXIT_CANCELLED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_SERVER_ERROR",
    "EXIT_USAGE",
    "build_parser",
    "build_submit_request",
    "cli",
    "describe_job",
    "exit_code_for",
    "exit_code_for_all",
    "format_blocks",
    "format_table",
    "job_dict",
    "main",
    "parse_args",
    "parse_key_value",
    "parse_statuses",
    "stream_job",
    "trace_link",
]


@click.group(
    "conveyor",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="The API key, if any, is read from CONVEYOR_API_KEY. Exit codes: 2 usage or"
    " invalid input, 3 server fault, 4 refused (see README, CLI).",
)
@connection_options
def cli() -> None:
    """Submit and follow Conveyor jobs (LLM calls run as durable background jobs)."""


for command in (
    submit.submit_command,
    jobs.get_command,
    jobs.list_command,
    watching.watch_command,
    jobs.cancel_command,
    jobs.retry_command,
    jobs.delete_command,
    jobs.priority_command,
    jobs.history_command,
    jobs.stats_command,
    jobs.top_command,
    ops.schedules,
    ops.bulk,
    ops.lanes,
    ops.workers,
    jobs.migrate_command,
    admin.keys,
    admin.tenants,
    admin.webhooks,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `conveyor` console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        context = click.Context(cli, info_name="conveyor", **cli.context_settings)
        click.echo(cli.get_help(context), err=True)
        return EXIT_USAGE
    try:
        result = cli.main(args, prog_name="conveyor", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help
        return int(exc.exit_code)
    except click.Abort:
        print("aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:  # usage errors and bad flag values: 2
        exc.show()
        return int(exc.exit_code)
    except ConveyorError as exc:
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
        return exit_code_of_error(exc)
    except TimeoutError:
        print("error: timed out", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else EXIT_OK


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed flags of one command line, without running it: the command's
    parameters plus `command`, `gateway`, `notifier` and `tls` (for tests and tools).
    A usage error exits 2 (SystemExit), as argparse does."""
    group: click.Group = cli
    try:
        ctx = group.make_context("conveyor", list(argv), resilient_parsing=False)
        params: dict[str, Any] = {}
        names: list[str] = []
        # (Click keeps the command name and what follows it here, as Group.invoke reads it)
        rest = [*ctx._protected_args, *ctx.args]
        current: click.Command = group
        while isinstance(current, click.Group) and rest:
            name, sub, rest = current.resolve_command(ctx, rest)
            assert sub is not None and name is not None
            ctx = sub.make_context(name, rest, parent=ctx)
            params.update(ctx.params)
            names.append(name)
            current = sub
            rest = [*ctx._protected_args, *ctx.args] if isinstance(sub, click.Group) else []
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    conn = connection(ctx)
    return argparse.Namespace(
        command=" ".join(names),
        gateway=conn.gateway,
        notifier=conn.notifier,
        tls=conn.tls,
        **params,
    )


class _Parser:
    """What `build_parser()` returned when the CLI was argparse: `.parse_args(argv)`."""

    def parse_args(self, argv: list[str]) -> argparse.Namespace:
        return parse_args(argv)


def build_parser() -> _Parser:
    """Kept for callers of the argparse-era API: `build_parser().parse_args(argv)`."""
    return _Parser()
