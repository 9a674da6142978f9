"""The lifecycle module against the README's transition table, and its rules."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conveyor.core.config import Settings
from conveyor.core.lifecycle import (
    CANCELLABLE,
    CLAIMABLE,
    LIVE,
    RETRYABLE,
    TERMINAL,
    TRANSITIONS,
    Job,
    JobState,
    Transition,
    backoff_s,
    failure_outcome,
    sources,
    transition,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def _states(text: str) -> str:
    """A table cell's states as the README writes them."""
    return " / ".join(part.strip() for part in text.split("/"))


def readme_rows() -> list[tuple[str, str, str, str]]:
    """(from, to, by, when) of each row of the README's `| transition | by | when |` table."""
    lines = README.read_text().splitlines()
    start = lines.index("| transition | by | when |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, line
        source, target = cells[0].split(" -> ")
        rows.append((_states(source), _states(target), cells[1], cells[2]))
    return rows


def _cell(states: tuple[JobState, ...]) -> str:
    if not states:
        return "new"
    if states == LIVE:
        return "live"
    return " / ".join(f"`{s.value}`" for s in states)


def code_rows(table: tuple[Transition, ...] = TRANSITIONS) -> list[tuple[str, str, str, str]]:
    return [(_cell(t.from_states), _cell(t.to), t.actor, t.condition) for t in table]


def test_readme_table_is_the_code_table() -> None:
    readme, code = readme_rows(), code_rows()
    assert [r for r in readme if r not in code] == []  # every README row is in the code
    assert [r for r in code if r not in readme] == []  # every code row is in the README
    assert readme == code  # in the same order


def test_a_change_on_one_side_only_is_caught() -> None:
    changed = tuple(
        Transition(t.name, t.from_states, t.to, "gateway", t.condition)
        if t.name == "release"
        else t
        for t in TRANSITIONS
    )
    assert readme_rows() != code_rows(changed)
    assert readme_rows() != code_rows(TRANSITIONS[:-1])


def test_state_sets_follow_the_table() -> None:
    assert set(LIVE) | TERMINAL == set(JobState)
    assert not set(LIVE) & TERMINAL
    assert CANCELLABLE == (JobState.PENDING, JobState.SCHEDULED, JobState.RUNNING)
    assert RETRYABLE == (JobState.FAILED, JobState.DEAD)
    assert CLAIMABLE == (JobState.PENDING,)
    assert sources(JobState.CANCELLED, "gateway") == (JobState.PENDING, JobState.SCHEDULED)
    assert sources(JobState.DEAD, "dispatcher") == LIVE
    assert transition("release").from_states == (JobState.SCHEDULED,)
    # No transition leaves a terminal state but RetryJob's replay.
    leaving = {s for t in TRANSITIONS if t.name != "replay" for s in t.from_states}
    assert not leaving & TERMINAL
    with pytest.raises(KeyError):
        transition("nonsense")


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 10, 40])
def test_backoff_bounds(attempt: int) -> None:
    base, cap = 0.5, 20.0
    ceiling = min(cap, base * 2 ** (attempt - 1))
    for _ in range(200):
        assert ceiling / 2 <= backoff_s(attempt, base, cap) <= ceiling
    # Never shorter than what the other side asked for, itself capped.
    assert backoff_s(attempt, base, cap, retry_after_s=15.0) >= min(15.0, cap)
    assert backoff_s(attempt, base, cap, retry_after_s=1e6) <= cap


@dataclass
class _Error:
    retryable: bool
    retry_after_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": "x", "message": "boom", "retryable": self.retryable}


def _job(attempts: int, max_attempts: int) -> Job:
    return Job(
        id=uuid.uuid4(),
        tenant="t",
        status=JobState.RUNNING,
        lane="default",
        model="m",
        attempts=attempts,
        max_attempts=max_attempts,
    )


def test_failure_rule() -> None:
    settings = Settings(retry_base_s=1.0, retry_cap_s=8.0)
    permanent = failure_outcome(_job(1, 3), _Error(retryable=False), settings)
    assert permanent.status == JobState.FAILED and permanent.retry_in_s is None
    retry = failure_outcome(_job(2, 3), _Error(retryable=True, retry_after_s=5.0), settings)
    assert retry.status == JobState.SCHEDULED
    assert retry.retry_in_s is not None and 5.0 <= retry.retry_in_s <= 8.0
    dead = failure_outcome(_job(3, 3), _Error(retryable=True), settings)
    assert dead.status == JobState.DEAD and dead.dead_reason == "attempts exhausted (3 of 3)"
    assert dead.error == {"code": "x", "message": "boom", "retryable": True}
