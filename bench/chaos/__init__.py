"""`python -m bench.chaos` (`make chaos`): proof under faults.

Starts a RabbitMQ node and a Postgres cluster of its own (never the machine's
servers, which other runs use), the simulator and the four services as processes,
then injects each fault while jobs run and checks what became of every job:

| fault            | what                                                              |
| kill -9 worker   | 10 rounds, each with at least 50 calls in flight                  |
| broker outage    | RabbitMQ stop_app / start_app during 1,000 submits                 |
| database restart | Postgres restart (immediate, as a crash) under load                |
| notifier kill    | kill -9 of a notifier with 100 open watches; they resume on another |
|                  | notifier, and every sequence number arrives exactly once            |
| broker loss      | the lane queues deleted with 1,000 jobs waiting; Postgres is the    |
|                  | source of truth, so every job still runs once                       |

For each: accepted (submits answered OK), lost (accepted jobs that did not
succeed; must be 0), finished twice (a job with two terminal transitions in its
history or two succeeded attempts; must be 0), duplicate model calls (calls the
simulator received beyond one per succeeded job; at most the calls in flight at the
fault, as the simulator counted them), and recovery (seconds from the end of the
fault until every job accepted by then had finished; for the notifier, until every
watch had resumed). The exit status is 1 when a figure breaks its bound, so CI fails.

Everything it started is stopped and removed on the way out, on Ctrl-C or SIGTERM
too; what a run killed outright left behind is removed by the next run.

Modules: `rig` (the `Chaos` rig the faults share and the accounting of every job),
`faults` (worker, broker and database faults), `notifier_kill`, `results` (`Row` and
its bounds, the table), `leftovers` (what killed runs left behind), `run` (the
faults by name and the command line).
"""

from __future__ import annotations

from .results import Row, table
from .run import SCENARIOS, main

__all__ = ["SCENARIOS", "Row", "main", "table"]
