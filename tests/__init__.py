"""Conveyor's tests: unit tests, and integration tests against real services."""
