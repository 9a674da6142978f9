"""`python -m services.worker [--lanes interactive,default]`: run a worker until SIGTERM."""

from __future__ import annotations

import argparse
import os

from conveyor.server.runtime import run_service

from .app import serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="conveyor-worker", description=__doc__)
    parser.add_argument("--lanes", help="comma-separated lanes to consume (default: all)")
    parser.add_argument("--concurrency", type=int, help="jobs run at once (the prefetch)")
    args = parser.parse_args()
    # Flags win over the environment; Settings reads both through the environment.
    if args.lanes:
        os.environ["CONVEYOR_WORKER_LANES"] = '["' + '","'.join(args.lanes.split(",")) + '"]'
    if args.concurrency:
        os.environ["CONVEYOR_WORKER_CONCURRENCY"] = str(args.concurrency)
    run_service("worker", serve)


if __name__ == "__main__":
    main()
