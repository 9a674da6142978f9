"""What the worker knows of a job it runs: its lease, its call and the text streamed so far.

The lease is renewed by the heartbeat (services.worker.runner.JobRunner.renew_leases).
A worker keeps a call running only while its lease is provably its own: a lease taken
over, or not renewed within `lease_hold_s`, aborts the call (`LeaseLost`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from conveyor.bus.events import Shape
from conveyor.llm.provider import TEXT, Completion


@dataclass
class InFlight:
    """A job this worker is running."""

    job_id: uuid.UUID
    lease: uuid.UUID
    task: asyncio.Task[Completion] | None = None
    text: list[str] = field(default_factory=list)
    """The streamed pieces of the attempt (text, tool input, thinking...), in order."""
    shape: list[Shape] = field(default_factory=list)
    """What each piece of `text` is: (kind, block index, block_json, citation_json)."""
    cancel_requested: bool = False
    flush_handle: asyncio.Handle | None = None
    """The coming flush of a watched attempt (services.worker.runner), if one is due."""
    publishing: asyncio.Task[None] | None = None
    """The latest event publish (the RUNNING event, then each delta): each waits for
    the one before it, and the final status event waits for the last."""
    attempt: int = 0
    base_seq: int = 0
    """Sequence number of the attempt's RUNNING event: text piece n has base_seq + n."""
    flushed: list[int] = field(default_factory=list)
    """Where each delta event ends (len(text) when its run was cut), published or not:
    the text-so-far answer and the bus cut the pieces the same way."""
    published: int = 0
    """How many of `flushed` went out as delta events (always a prefix)."""
    published_at: float = float("-inf")
    """loop.time() of the last delta publish (pieces after it gather a few ms)."""
    tenant: str = ""
    watchers: set[str] = field(default_factory=set)
    """Notifiers that registered a watch of this attempt (services.worker.interest)."""
    renewed_at: float = field(default_factory=time.monotonic)
    """When (time.monotonic) the last heartbeat that renewed the lease was sent."""
    lease_lost: bool = False

    @property
    def cut(self) -> int:
        """How many pieces are cut into delta runs (published or not)."""
        return self.flushed[-1] if self.flushed else 0

    def run_of(self, start: int, end: int) -> tuple[str, Shape]:
        """The text and shape of the delta event made of pieces start..end."""
        return "".join(self.text[start:end]), self.shape[start]

    def answer_text(self) -> str:
        """The text of the text blocks so far (a cancelled run's partial result)."""
        return "".join(t for t, s in zip(self.text, self.shape, strict=True) if s[0] == TEXT)


class LeaseLost(Exception):
    """The attempt's lease was taken over, or could not be renewed in time: its call
    was aborted and its outcome must not be written."""


def lease_hold_s(lease_s: float, heartbeat_s: float) -> float:
    """How long a worker keeps a call running without a renewed lease.

    The sweeper may requeue a job `lease_s` after its last renewal; the worker looks
    once per heartbeat, so it gives up one heartbeat earlier (at least half the lease).
    """
    return max(lease_s - heartbeat_s, lease_s / 2)
