"""Command line of the simulator: `python -m devtools.simulator` or `conveyor-simulator`.

Every flag defaults to its `SIM_*` environment variable (e.g. `SIM_PORT`,
`SIM_RATE_429`), and then to the `SimulatorConfig` default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from devtools.simulator.app import SimulatorConfig, run_simulator

log = logging.getLogger("devtools.simulator")


def build_parser(defaults: SimulatorConfig) -> argparse.ArgumentParser:
    """The argument parser, with defaults taken from `defaults` (the environment)."""
    p = argparse.ArgumentParser(
        prog="conveyor-simulator",
        description="A local server that speaks the Anthropic Messages API, for tests and benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default=defaults.host, help="address to listen on (SIM_HOST)")
    p.add_argument("--port", type=int, default=defaults.port, help="port, 0 = any (SIM_PORT)")
    p.add_argument(
        "--latency-ms",
        type=float,
        default=defaults.latency_ms,
        help="time to first token in ms (SIM_LATENCY_MS)",
    )
    p.add_argument(
        "--tokens-per-second",
        "--tps",
        type=float,
        default=defaults.tokens_per_second,
        help="pace of the tokens, 0 = as fast as possible (SIM_TOKENS_PER_SECOND)",
    )
    p.add_argument(
        "--output-tokens",
        type=int,
        default=defaults.output_tokens,
        help="tokens per answer, capped by max_tokens (SIM_OUTPUT_TOKENS)",
    )
    for kind, help_text in (
        ("429", "429 rate_limit_error"),
        ("529", "529 overloaded_error"),
        ("500", "500 api_error"),
        ("drop", "connection closed half way"),
        ("error_event", "SSE error event half way"),
    ):
        dest = f"rate_{kind}"
        p.add_argument(
            f"--rate-{kind.replace('_', '-')}",
            dest=dest,
            type=float,
            default=getattr(defaults, dest),
            help=f"probability of {help_text} (SIM_{dest.upper()})",
        )
    p.add_argument(
        "--retry-after-s",
        type=float,
        default=defaults.retry_after_s,
        help="retry-after header of 429 and 529 answers (SIM_RETRY_AFTER_S)",
    )
    for dest, help_text in (
        ("limit_requests_per_minute", "requests per minute"),
        ("limit_input_tokens_per_minute", "input tokens per minute"),
        ("limit_output_tokens_per_minute", "output tokens per minute"),
    ):
        p.add_argument(
            f"--{dest.replace('_', '-')}",
            dest=dest,
            type=float,
            default=getattr(defaults, dest),
            help=f"enforced {help_text}, 0 = no limit (SIM_{dest.upper()})",
        )
    p.add_argument(
        "--limit-burst-s",
        type=float,
        default=defaults.limit_burst_s,
        help="capacity of an enforced limit, in seconds of its rate (SIM_LIMIT_BURST_S)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the failure-injection RNG (SIM_SEED)",
    )
    p.add_argument(
        "--backlog", type=int, default=defaults.backlog, help="listen backlog (SIM_BACKLOG)"
    )
    p.add_argument(
        "--batch-processing-s",
        type=float,
        default=defaults.batch_processing_s,
        help="time a message batch takes to end (SIM_BATCH_PROCESSING_S)",
    )
    p.add_argument(
        "--batch-expire-s",
        type=float,
        default=defaults.batch_expire_s,
        help="a batch processing longer ends with every request expired (SIM_BATCH_EXPIRE_S)",
    )
    p.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=defaults.access_log,
        help="log every request (SIM_ACCESS_LOG)",
    )
    p.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use uvloop when it is installed",
    )
    p.add_argument("--log-level", default="INFO", help="logging level")
    return p


def parse_config(argv: Sequence[str] | None = None) -> tuple[SimulatorConfig, argparse.Namespace]:
    """The configuration from the environment and then the command line."""
    defaults = SimulatorConfig.from_env()
    args = build_parser(defaults).parse_args(argv)
    config = SimulatorConfig(
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        tokens_per_second=args.tokens_per_second,
        output_tokens=args.output_tokens,
        rate_429=args.rate_429,
        rate_529=args.rate_529,
        rate_500=args.rate_500,
        rate_drop=args.rate_drop,
        rate_error_event=args.rate_error_event,
        retry_after_s=args.retry_after_s,
        limit_requests_per_minute=args.limit_requests_per_minute,
        limit_input_tokens_per_minute=args.limit_input_tokens_per_minute,
        limit_output_tokens_per_minute=args.limit_output_tokens_per_minute,
        limit_burst_s=args.limit_burst_s,
        seed=args.seed,
        access_log=args.access_log,
        backlog=args.backlog,
        batch_processing_s=args.batch_processing_s,
        batch_expire_s=args.batch_expire_s,
    )
    return config, args


async def _serve(config: SimulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await run_simulator(config, stop=stop)


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT/SIGTERM; returns the exit status."""
    try:
        config, args = parse_config(argv)
    except ValueError as exc:
        print(f"conveyor-simulator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        with asyncio.Runner(loop_factory=_loop_factory(args.uvloop)) as runner:
            runner.run(_serve(config))
    except OSError as exc:  # e.g. the port is taken
        print(
            f"conveyor-simulator: cannot listen on {config.host}:{config.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    log.info("simulator stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
