"""The CLI's arguments: `KEY=VALUE` flags, the defaults and every field of a submitted
request, the prompt from stdin, connection flags before or after the command, status
filters, and bad values refused (exit code 2, naming the flag). Pure: no server.
"""

from __future__ import annotations

import argparse
import io

import pytest

from conveyor.cli import (
    build_submit_request,
    main,
    parse_args,
    parse_key_value,
)
from conveyor.v1 import jobs_pb2


def parse(*argv: str) -> argparse.Namespace:
    return parse_args(list(argv))


def test_parse_key_value() -> None:
    assert parse_key_value("a=b") == ("a", "b")
    assert parse_key_value("url=http://x/?q=1") == ("url", "http://x/?q=1")
    assert parse_key_value("empty=") == ("empty", "")
    for bad in ("novalue", "=b", ""):
        with pytest.raises(ValueError):
            parse_key_value(bad)


def test_label_flag_is_repeatable_and_validated(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("submit", "hi", "--label", "a=b", "--label", "team=search")
    assert dict(args.label) == {"a": "b", "team": "search"}
    with pytest.raises(SystemExit) as exc:
        parse("submit", "hi", "--label", "oops")
    assert exc.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_submit_defaults() -> None:
    req = build_submit_request(parse("submit", "Hello"))
    assert req.model == "claude-sonnet-4-5"
    assert req.max_tokens == 256
    assert [(m.role, m.content) for m in req.messages] == [("user", "Hello")]
    assert not req.HasField("temperature")
    assert not req.HasField("delay")
    assert not req.HasField("timeout")
    assert req.priority == 0 and req.lane == "" and req.max_attempts == 0
    assert dict(req.labels) == {}


def test_submit_builds_the_full_request() -> None:
    args = parse(
        "submit",
        "Summarise this",
        "--model",
        "claude-haiku-4-5",
        "--max-tokens",
        "512",
        "--system",
        "Be brief.",
        "--temperature",
        "0.2",
        "--stop",
        "END",
        "--priority",
        "7",
        "--lane",
        "interactive",
        "--idempotency-key",
        "order-42",
        "--delay",
        "1.5",
        "--timeout",
        "30",
        "--max-attempts",
        "5",
        "--label",
        "a=b",
        "--label",
        "team=search",
        "--meta",
        "user_id=u1",
        "--webhook",
        "https://example.com/hook",
        "--watch",
    )
    req = build_submit_request(args)
    assert req.model == "claude-haiku-4-5"
    assert req.max_tokens == 512
    assert req.system == "Be brief."
    assert req.HasField("temperature") and req.temperature == pytest.approx(0.2)
    assert list(req.stop_sequences) == ["END"]
    assert req.priority == 7
    assert req.lane == "interactive"
    assert req.idempotency_key == "order-42"
    assert req.delay.ToMilliseconds() == 1500
    assert req.timeout.seconds == 30
    assert req.max_attempts == 5
    assert dict(req.labels) == {"a": "b", "team": "search"}
    assert dict(req.metadata) == {"user_id": "u1"}
    assert req.webhook_url == "https://example.com/hook"
    assert args.watch is True


def test_submit_reads_the_prompt_from_stdin() -> None:
    req = build_submit_request(parse("submit", "-"), io.StringIO("from stdin\n"))
    assert req.messages[0].content == "from stdin\n"


def test_negative_delay_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse("submit", "hi", "--delay", "-1")


def test_connection_flags_before_or_after_the_command() -> None:
    assert parse("--gateway", "h:1", "get", "x").gateway == "h:1"
    assert parse("get", "x", "--gateway", "h:2").gateway == "h:2"
    args = parse("get", "x")
    assert args.gateway is None and args.notifier is None and args.tls is False


def test_list_status_filters() -> None:
    args = parse("list", "--status", "failed,dead", "--status", "running", "--limit", "5")
    assert [s for group in args.statuses for s in group] == [
        jobs_pb2.JOB_STATUS_FAILED,
        jobs_pb2.JOB_STATUS_DEAD,
        jobs_pb2.JOB_STATUS_RUNNING,
    ]
    with pytest.raises(SystemExit):
        parse("list", "--status", "bogus")


def test_no_command_prints_help() -> None:
    assert main([]) == 2


def test_a_bad_flag_value_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--status", "finished"]) == 2
    assert "--status" in capsys.readouterr().err
    assert main(["submit", "hi", "--priority", "12"]) == 2
    assert main(["no-such-command"]) == 2
