"""Repeated benchmark runs: a figure reported is the median of what the runs measured."""

from __future__ import annotations

from bench.harness import Result, median_of


def _run(throughput: float, p99: float, note: str = "") -> Result:
    result = Result("submit", "SubmitJob")
    result.add("accepted", throughput, "jobs/s", target=">= 1500", met=throughput >= 1500)
    result.add("p99", p99, "ms")
    result.add("load generator", "h2load")
    if note:
        result.notes.append(note)
    return result


def test_each_figure_is_the_median_of_the_runs_with_that_runs_verdict() -> None:
    merged = median_of([_run(1600, 9.0), _run(900, 30.0), _run(1550, 12.0)])
    accepted, p99, generator = merged.figures
    assert (accepted.value, accepted.verdict) == (1550, "met")
    assert p99.value == 12.0
    assert generator.value == "h2load"
    assert merged.extra["runs"][1] == [
        ["accepted", 900],
        ["p99", 30.0],
        ["load generator", "h2load"],
    ]
    assert merged.notes[-1] == "each figure is the median of 3 runs"


def test_an_even_count_reports_a_value_one_run_measured() -> None:
    merged = median_of([_run(1000, 5.0), _run(1600, 7.0)])
    assert merged.figures[0].value == 1000 and merged.figures[0].verdict == "missed"


def test_a_single_run_is_reported_as_it_is() -> None:
    run = _run(1200, 8.0, note="one run")
    assert median_of([run]) is run


def test_a_label_that_stands_twice_in_a_run_keeps_both_rows() -> None:
    def run(first: float, second: float) -> Result:
        result = Result("end-to-end", "e2e")
        result.add("paced 50 jobs/s", 10.0, "ms")
        result.add("  p99", first, "ms")
        result.add("paced 10 jobs/s", 12.0, "ms")
        result.add("  p99", second, "ms")
        return result

    merged = median_of([run(20, 30), run(22, 31), run(21, 35)])
    assert [(f.label, f.value) for f in merged.figures] == [
        ("paced 50 jobs/s", 10.0),
        ("  p99", 21),
        ("paced 10 jobs/s", 12.0),
        ("  p99", 31),
    ]
