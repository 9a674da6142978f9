"""Conveyor's benchmark: `make bench` or `python -m bench [scenario ...] [--quick]`.

Each scenario is a module of this package (`submit`, `end_to_end`, `storm`,
`streaming`, `backlog`, `cost`) with `NAME`, `TITLE` and `async def run(ctx)`;
`bench.harness` holds what they share and `bench.report` the table, the JSON file
and the machine's description. See `bench.__main__` for what a run does.
"""
