"""A local stand-in for the Anthropic Messages API, for tests, demos and the benchmark.

The worker talks to it when no `ANTHROPIC_API_KEY` is set. It speaks
`POST /v1/messages` (whole messages and SSE streams, shaped like the real API so the
real `anthropic` SDK works against it), generates deterministic text at a
configurable latency and speed, and injects failures at random rates or on demand
through `x-sim-*` request headers. See `devtools.simulator.app` for the details and
`python -m devtools.simulator --help` for the command line.

Programmatic use::

    async with start_simulator(SimulatorConfig(port=0)) as sim:
        client = anthropic.AsyncAnthropic(api_key="sim", base_url=sim.base_url)
"""

from devtools.simulator.app import (
    FAIL_KINDS,
    SIMULATOR_KEY,
    RunningSimulator,
    Simulator,
    SimulatorConfig,
    SimulatorStats,
    build_app,
    run_simulator,
    start_simulator,
)

__all__ = [
    "FAIL_KINDS",
    "SIMULATOR_KEY",
    "RunningSimulator",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "build_app",
    "run_simulator",
    "start_simulator",
]
