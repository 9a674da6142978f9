"""`python -m bench compare`: pairs of runs become medians, ratios and spreads, and REF
is checked out into a worktree of its own that is removed afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from argparse import Namespace
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import compare, report
from bench.compare import Fig, Key, Side
from bench.harness import Result

TOTAL = "total (services + RabbitMQ + Postgres)"


def _results_file(path: Path, *results: Result) -> Path:
    report.write_json(
        path,
        machine_info={},
        config={},
        results=results,
        started_at=datetime.now(UTC),
        interrupted=False,
    )
    return path


def _e2e(throughput: float, p99: float, second_p99: float = 30.0) -> Result:
    result = Result("end-to-end", "e2e")
    result.add("2000 jobs: throughput", throughput, "jobs/s")
    result.add("  p99", p99, "ms")
    result.add("paced 50 jobs/s: overhead p50", 11.0, "ms", target="< 5 ms", met=False)
    result.add("  p99", second_p99, "ms")
    result.add("load generator", "h2load")
    return result


def _cost(total: float) -> Result:
    result = Result("cost", "CPU per job")
    result.add(TOTAL, total, "CPU ms/job")
    return result


def _pairs(tmp_path: Path, runs: Sequence[tuple[Result, Result]]) -> list[compare.Pair]:
    pairs: list[compare.Pair] = []
    for n, (a, b) in enumerate(runs):
        pairs.append(
            (
                compare.figures_of(_results_file(tmp_path / f"a{n}.json", a)),
                compare.figures_of(_results_file(tmp_path / f"b{n}.json", b)),
            )
        )
    return pairs


def test_each_figure_gets_both_medians_their_ratio_spread_and_every_pairs_ratio(
    tmp_path: Path,
) -> None:
    pairs = _pairs(
        tmp_path,
        [
            (_e2e(100, 50), _e2e(210, 40)),
            (_e2e(140, 60), _e2e(260, 44)),
            (_e2e(120, 55), _e2e(250, 42)),
        ],
    )
    rows, only_a, only_b = compare.compare_figures(pairs)
    throughput = rows[0]
    assert (throughput.scenario, throughput.label, throughput.unit) == (
        "end-to-end",
        "2000 jobs: throughput",
        "jobs/s",
    )
    assert compare.stats(throughput.a) == (120, 100, 140)
    assert compare.stats(throughput.b) == (250, 210, 260)
    assert throughput.ratio() == pytest.approx(250 / 120)
    assert throughput.pair_ratios() == pytest.approx([2.1, 260 / 140, 250 / 120])
    assert (throughput.better, throughput.verdict()) == ("higher", "B better")
    p99 = rows[1]
    assert (p99.label, p99.better, p99.verdict()) == ("  p99", "lower", "B better")
    assert only_a == only_b == []


def test_the_median_of_an_even_count_is_a_value_one_run_measured() -> None:
    assert compare.stats([10.0, 40.0, 20.0, 30.0]) == (20.0, 10.0, 40.0)
    assert compare.stats([None, 5.0]) == (5.0, 5.0, 5.0)
    assert compare.stats([None]) is None


def test_a_label_that_stands_twice_in_a_scenario_keeps_both_rows_in_order(
    tmp_path: Path,
) -> None:
    pairs = _pairs(tmp_path, [(_e2e(100, 50, second_p99=30), _e2e(100, 40, second_p99=36))])
    rows, _, _ = compare.compare_figures(pairs)
    assert [(r.label, r.a, r.b) for r in rows[:4]] == [
        ("2000 jobs: throughput", [100], [100]),
        ("  p99", [50], [40]),
        ("paced 50 jobs/s: overhead p50", [11], [11]),
        ("  p99", [30], [36]),
    ]
    assert [r.verdict() for r in rows[:4]] == ["same", "B better", "same", "B worse"]


def test_pairs_that_disagree_are_mixed_and_a_figure_of_no_known_direction_has_no_verdict(
    tmp_path: Path,
) -> None:
    pairs = _pairs(tmp_path, [(_cost(10), _cost(9)), (_cost(10), _cost(11))])
    (total,) = compare.compare_figures(pairs)[0]
    assert (total.better, total.verdict()) == ("lower", "mixed")
    row = compare.Row("submit", "tokens measured", "", "", [3000], [2000])
    assert row.verdict() == ""


def test_a_text_figure_is_listed_with_no_ratio(tmp_path: Path) -> None:
    rows, _, _ = compare.compare_figures(_pairs(tmp_path, [(_e2e(1, 1), _e2e(1, 1))]))
    generator = rows[-1]
    assert (generator.label, generator.a, generator.b, generator.ratio()) == (
        "load generator",
        [None],
        [None],
        None,
    )
    assert "load generator" in compare.table(rows)


def test_figures_one_side_lacks_are_listed_not_an_error(tmp_path: Path) -> None:
    pairs = _pairs(tmp_path, [(_e2e(100, 50), _cost(9.0))])
    extra_a = compare.figures_of(_results_file(tmp_path / "a.json", _e2e(100, 50)))
    pairs.append((extra_a, compare.figures_of(_results_file(tmp_path / "b.json", _cost(8.0)))))
    rows, only_a, only_b = compare.compare_figures(pairs)
    assert rows == []
    assert only_a[:2] == [
        "end-to-end: 2000 jobs: throughput",
        "end-to-end: 2000 jobs: throughput / p99",
    ]
    assert "end-to-end: paced 50 jobs/s: overhead p50 / p99" in only_a
    assert only_b == ["cost: total (services + RabbitMQ + Postgres)"]


def test_a_figure_missing_from_one_run_counts_as_no_value_in_that_pair() -> None:
    row = compare.Row("cost", "total", "CPU ms/job", "lower", [10.0, None, 12.0], [8.0, 9.0, 9.0])
    assert row.pair_ratios() == pytest.approx([0.8, None, 0.75])
    assert compare.stats(row.a) == (10.0, 10.0, 12.0)
    assert row.verdict() == "B better"
    assert row.to_json()["median_b"] == 9.0


def test_the_table_shows_medians_spread_ratio_per_pair_ratios_and_direction(
    tmp_path: Path,
) -> None:
    pairs = _pairs(tmp_path, [(_cost(12.0), _cost(6.0)), (_cost(14.0), _cost(6.5))])
    rows, _, _ = compare.compare_figures(pairs)
    lines = compare.table(rows).splitlines()
    assert lines[0].split("  ")[0] == "scenario"
    assert set(lines[1]) <= {"-", " "}
    row = lines[2]
    for cell in ("cost", "CPU ms/job", "12.0 (12.0–14.0)", "6.00 (6.00–6.50)", "0.50", "0.50 0.46"):
        assert cell in row
    assert row.split()[-3:] == ["lower", "B", "better"]
    markdown = compare.table(rows, markdown=True).splitlines()
    assert markdown[1] == "|---|---|---|---|---|---|---|---|---|"
    assert markdown[2].startswith("| cost | total (services + RabbitMQ + Postgres) | CPU ms/job |")


@pytest.mark.parametrize(
    ("unit", "target", "better"),
    [
        ("jobs/s", "", "higher"),
        ("ms", "", "lower"),
        ("CPU ms/job", "", "lower"),
        ("s wall", "", "lower"),
        ("MiB", "", "lower"),
        ("calls", ">= 1000", "higher"),
        ("calls", "0", "lower"),
        ("of 2000", "all", "higher"),
        ("ms", "< 10 ms", "lower"),
        ("", "", ""),
        ("calls", "", ""),
    ],
)
def test_which_way_is_better_comes_from_the_target_else_the_unit(
    unit: str, target: str, better: str
) -> None:
    assert compare.better(unit, target) == better


# --------------------------------------------------------------------------- running pairs


class FakeSide(Side):
    """A side whose runs write a results file (or fail) as a script says."""

    def __init__(self, key: str, script: list[int | float]) -> None:
        super().__init__(key, key.lower() * 12, Path("python"), Path("."), None, ["cost"])
        self.script = script
        self.calls: list[list[str]] = []

    def run(self, names: Sequence[str], quick: bool, out: Path) -> int:
        self.calls.append(list(names))
        step = self.script.pop(0)
        if isinstance(step, int):
            return step  # an exit status: the run failed
        _results_file(out, _cost(step))
        return 0


def test_runs_alternate_a_b_and_a_failed_run_is_retried_then_its_pair_dropped(
    tmp_path: Path,
) -> None:
    a = FakeSide("A", [10.0, 1, 11.0, 12.0])
    b = FakeSide("B", [5.0, 2, 2, 6.0])
    notes: list[str] = []
    args = Namespace(pairs=3, quick=True)
    kept = list(compare.run_pairs((a, b), ["cost"], args, tmp_path, notes))
    key = ("cost", TOTAL, 0)
    assert [(a_figs[key].value, b_figs[key].value) for a_figs, b_figs in kept] == [
        (10.0, 5.0),
        (12.0, 6.0),
    ]
    assert notes == [
        "pair 2: the A run failed (exit 1); running it again",
        "pair 2: the B run failed (exit 2); running it again",
        "pair 2: the B run failed (exit 2)",
        "pair 2 dropped: its B run failed twice",
    ]
    assert a.script == b.script == []


def test_a_side_without_any_chosen_scenario_is_not_run_and_reports_nothing(
    tmp_path: Path,
) -> None:
    a, b = FakeSide("A", []), FakeSide("B", [5.0])
    a.scenarios = ["submit"]
    kept = list(compare.run_pairs((a, b), ["cost"], Namespace(pairs=1, quick=False), tmp_path, []))
    assert a.calls == [] and b.calls == [["cost"]]
    rows, only_a, only_b = compare.compare_figures(kept)
    assert (rows, only_a, only_b) == ([], [], [f"cost: {TOTAL}"])


def test_an_interrupted_side_run_stops_the_comparison(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        list(
            compare.run_pairs(
                (FakeSide("A", [130]), FakeSide("B", [])),
                [],
                Namespace(pairs=1, quick=False),
                tmp_path,
                [],
            )
        )


def test_the_working_trees_side_knows_its_own_scenarios() -> None:
    side = Side("B", "tree", Path(sys.executable), compare.ROOT, None)
    assert {"submit", "end-to-end", "cost"} <= set(side.known_scenarios())


def test_a_folder_with_no_benchmark_is_an_error(tmp_path: Path) -> None:
    side = Side("A", "abc", Path(sys.executable), tmp_path, None)
    with pytest.raises(RuntimeError, match="has no `python -m bench`"):
        side.known_scenarios()


# --------------------------------------------------------------------------- git and venv


def _git(repo: Path, *args: str) -> str:
    env = os.environ | {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A tiny git repository with two commits of `version.txt`: "one", then "two"."""
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q", "-b", "main")
    for version in ("one", "two"):
        (root / "version.txt").write_text(version)
        _git(root, "add", "version.txt")
        _git(root, "commit", "-q", "-m", version)
    return root


def test_ref_is_checked_out_into_a_worktree_that_is_removed_afterwards(
    repo: Path, tmp_path: Path
) -> None:
    sha = _git(repo, "rev-parse", "HEAD~1")
    path = tmp_path / "trees" / sha
    with compare.worktree(repo, sha, path) as tree:
        assert (tree / "version.txt").read_text() == "one"
        assert _git(tree, "rev-parse", "HEAD") == sha
        assert str(path) in _git(repo, "worktree", "list")
    assert not path.exists()
    assert str(path) not in _git(repo, "worktree", "list")
    assert (repo / "version.txt").read_text() == "two"  # the working tree is untouched


def test_the_worktree_is_removed_on_ctrl_c_too(repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "tree"
    with (
        pytest.raises(KeyboardInterrupt),
        compare.worktree(repo, _git(repo, "rev-parse", "HEAD"), path),
    ):
        raise KeyboardInterrupt
    assert not path.exists()
    assert str(path) not in _git(repo, "worktree", "list")


def test_a_worktree_left_by_a_killed_compare_is_replaced(repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "tree"
    _git(repo, "worktree", "add", "--detach", str(path), "HEAD")
    (path / "leftover").write_text("from a run killed outright")
    with compare.worktree(repo, _git(repo, "rev-parse", "HEAD~1"), path) as tree:
        assert (tree / "version.txt").read_text() == "one"
        assert not (tree / "leftover").exists()
    assert not path.exists()


def test_the_working_trees_revision_is_marked_dirty_when_it_has_changes(repo: Path) -> None:
    head = _git(repo, "rev-parse", "HEAD")
    assert compare.tree_revision(repo) == head
    (repo / "new.py").write_text("")
    assert compare.tree_revision(repo) == head + "+dirty"
    (repo / "new.py").unlink()
    (repo / "version.txt").write_text("three")
    assert compare.tree_revision(repo) == head + "+dirty"


def test_a_ref_installs_the_way_its_own_files_say(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    assert compare.install_commands(tmp_path, venv) == [[*pip, "-e", ".[dev]"]]
    (tmp_path / "requirements-dev.lock").write_text("")
    assert compare.install_commands(tmp_path, venv) == [
        [*pip, "--no-deps", "-r", "requirements-dev.lock"],
        [*pip, "--no-deps", "-e", "."],
    ]
    (tmp_path / "Makefile").write_text("test:\n\tpytest\ninstall: venv  ## install\n\tpip ...\n")
    assert compare.install_commands(tmp_path, venv) == [["make", "install", f"VENV={venv}"]]


def test_a_finished_venv_is_reused_without_installing(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / compare.READY).write_text("abc\n")
    tree = tmp_path / "tree"  # does not exist: installing would fail
    assert compare.ensure_venv(tree, venv, tmp_path / "install.log") == venv / "bin" / "python"
    assert not (tmp_path / "install.log").exists()


def test_a_side_runs_with_its_own_venv_first_on_path() -> None:
    env = compare.side_env(Path("/x/venv"))
    assert env["PATH"].startswith("/x/venv/bin" + os.pathsep)
    assert env["VIRTUAL_ENV"] == "/x/venv"
    assert "PYTHONPATH" not in compare.side_env(None)


def test_a_key_is_scenario_label_and_occurrence(tmp_path: Path) -> None:
    figures = compare.figures_of(_results_file(tmp_path / "r.json", _e2e(1, 2, 3)))
    key: Key = ("end-to-end", "  p99", 1)
    assert figures[key] == Fig(3.0, "ms", "", "paced 50 jobs/s: overhead p50 / p99")
