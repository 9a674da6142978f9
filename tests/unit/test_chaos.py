"""`make chaos` fails CI exactly when a fault lost a job, ran one twice, or called the
model more often than the calls it interrupted."""

from __future__ import annotations

from bench.chaos import Row, table


def checked(
    lost: int = 0, finished_twice: int = 0, duplicate_calls: int = 0, in_flight: int = 0
) -> Row:
    row = Row("broker outage", 1000, lost, finished_twice, duplicate_calls, in_flight)
    row.check()
    return row


def test_a_fault_that_loses_nothing_and_repeats_only_interrupted_calls_passes() -> None:
    row = checked(duplicate_calls=50, in_flight=50)
    assert row.ok and row.failures == []


def test_a_lost_job_fails_the_row() -> None:
    row = checked(lost=1)
    assert not row.ok and row.failures == ["1 accepted jobs lost"]


def test_a_job_finished_twice_fails_the_row() -> None:
    row = checked(finished_twice=1)
    assert not row.ok and row.failures == ["1 jobs finished twice"]


def test_more_duplicate_calls_than_calls_in_flight_at_the_fault_fail_the_row() -> None:
    row = checked(duplicate_calls=51, in_flight=50)
    assert not row.ok
    assert row.failures == ["51 duplicate model calls, more than the 50 in flight at the fault"]


def test_the_table_has_a_line_per_fault_with_its_verdict() -> None:
    rows = [checked(duplicate_calls=3, in_flight=60), checked(lost=2)]
    rows[0].recovery_s = 8.25
    lines = table(rows).splitlines()
    assert lines[0].split()[:2] == ["fault", "accepted"]
    assert lines[2].split()[-2:] == ["s", "ok"] and "8.2" in lines[2]
    assert lines[3].split()[-2:] == ["-", "FAILED"]
    markdown = table(rows, markdown=True).splitlines()
    assert markdown[1].startswith("|---|") and markdown[3].endswith("| FAILED |")
