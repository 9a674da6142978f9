"""Development tools, not shipped in the wheel: the local stack, the test sandbox and the Messages API simulator."""
