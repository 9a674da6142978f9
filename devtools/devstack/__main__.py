"""`python -m devtools.devstack {up,down,status,demo}`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from conveyor.core.config import get_settings

from .commands import cmd_down, cmd_status, cmd_up
from .demo import cmd_demo
from .readiness import READY_TIMEOUT_S


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.devstack",
        description="Run the Conveyor services locally in the background.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="migrate, start the simulator and the services, wait")
    up.add_argument(
        "--timeout", type=float, default=READY_TIMEOUT_S, help="seconds to wait for readiness"
    )
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="a line per service")
    sub.add_parser("demo", help="submit a job and stream its tokens")
    args = parser.parse_args(argv)
    settings = get_settings()
    commands: dict[str, Callable[[], int]] = {
        "up": lambda: cmd_up(settings, args.timeout),
        "down": lambda: cmd_down(settings),
        "status": lambda: cmd_status(settings),
        "demo": lambda: cmd_demo(settings),
    }
    try:
        return commands[args.command]()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
