"""Conveyor: durable background jobs for LLM calls.

The shared library of the four services: settings, database, broker topology,
telemetry, errors, the generated gRPC stubs (`conveyor.v1`), a typed client
and the `conveyor` CLI.
"""

__version__ = "0.1.0"
