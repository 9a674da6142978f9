"""The CLI's commands against an in-process gRPC server standing in for the gateway and
the notifier (`sync_fake`): what they print, and their exit codes: 0 done, 1 a job
that failed, 2 invalid input, 3 a server fault or no server, 4 a refusal. Bulk
actions go in batches.
"""

from __future__ import annotations

import json

import grpc
import pytest

from conveyor.cli import (
    exit_code_for,
    main,
)
from conveyor.cli.base import exit_code_of_error
from conveyor.cli.ops import Phase, apply_in_batches
from conveyor.client import (
    ConveyorError,
)
from conveyor.v1 import jobs_pb2, operations_pb2
from tests.unit.fake_services import JOB_ID


def test_cli_refusal_exits_4(sync_fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gateway", sync_fake, "get", "missing"]) == 4
    assert capsys.readouterr().err.strip() == "error: NOT_FOUND: job missing not found"


def test_cli_get_prints_json(sync_fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", JOB_ID, "--gateway", sync_fake]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["id"] == JOB_ID
    assert doc["status"] == "JOB_STATUS_SUCCEEDED"
    assert doc["result_text"] == "Hello"


def test_cli_submit_prints_the_id(sync_fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gateway", sync_fake, "submit", "Hi"]) == 0
    assert capsys.readouterr().out.strip() == JOB_ID


def test_cli_submit_watch_streams_tokens(
    sync_fake: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--gateway", sync_fake, "--notifier", sync_fake, "submit", "Hi", "--watch"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello\n"
    assert JOB_ID in captured.err


def test_cli_unreachable_gateway_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gateway", "127.0.0.1:1", "get", JOB_ID]) == 3
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


# --------------------------------------------------------------------------- exit codes


def test_exit_codes() -> None:
    assert exit_code_for(jobs_pb2.JOB_STATUS_SUCCEEDED) == 0
    assert exit_code_for(jobs_pb2.JOB_STATUS_FAILED) == 1
    assert exit_code_for(jobs_pb2.JOB_STATUS_DEAD) == 1
    assert exit_code_for(jobs_pb2.JOB_STATUS_CANCELLED) == 2


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 2),
        (grpc.StatusCode.OUT_OF_RANGE, 2),
        (grpc.StatusCode.UNAVAILABLE, 3),
        (grpc.StatusCode.INTERNAL, 3),
        (grpc.StatusCode.UNKNOWN, 3),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 3),
        (grpc.StatusCode.NOT_FOUND, 4),
        (grpc.StatusCode.PERMISSION_DENIED, 4),
        (grpc.StatusCode.UNAUTHENTICATED, 4),
        (grpc.StatusCode.FAILED_PRECONDITION, 4),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 4),
    ],
)
def test_invalid_input_exits_2_a_server_fault_3_a_refusal_4(
    code: grpc.StatusCode, exit_code: int
) -> None:
    assert exit_code_of_error(ConveyorError.from_status(code, "x")) == exit_code


def test_cli_invalid_argument_from_the_server_exits_2(
    sync_fake: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--gateway", sync_fake, "get", "bad"]) == 2
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: ")


# --------------------------------------------------------------------------- bulk actions


async def test_bulk_actions_go_in_batches_until_the_phase_is_empty() -> None:
    """Each batch's jobs leave the filter; the loop stops when fewer than asked match."""
    waiting = 7
    calls: list[tuple[int, bool]] = []

    async def act(limit: int, dry_run: bool, phase: Phase) -> operations_pb2.BulkActionResponse:
        nonlocal waiting
        calls.append((limit, dry_run))
        matched = min(limit, waiting)
        if not dry_run:
            waiting -= matched
        return operations_pb2.BulkActionResponse(
            matched=matched, changed=0 if dry_run else matched, dry_run=dry_run
        )

    done = await apply_in_batches("cancelled", [Phase()], act, limit=0, batch=3, yes=True)
    assert done["matched"] == 7 and done["changed"] == 7 and waiting == 0
    assert calls == [(10_000, True), (3, False), (3, False), (3, False)]

    waiting, calls[:] = 7, []
    done = await apply_in_batches("cancelled", [Phase()], act, limit=5, batch=3, yes=True)
    assert done["changed"] == 5 and waiting == 2, "the limit holds over batches"
    assert calls == [(5, True), (3, False), (2, False)]
