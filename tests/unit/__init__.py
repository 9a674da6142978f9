"""Unit tests: pure functions and single components, no servers."""
