"""`python -m bench compare REF [SCENARIO ...] [--pairs N] [--quick]`: before and after.

Runs the scenarios for REF (A) and this working tree (B) alternately, A B A B, each
by its own `python -m bench ... --out FILE`, interpreter and cwd. REF is checked out
at `run/compare/trees/<sha>` for the run (removed afterwards, on Ctrl-C or SIGTERM
too); its venv, `run/compare/venvs/<sha>`, is kept for the next compare (its editable
install points at that same path)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
from argparse import ArgumentParser, Namespace
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from bench import report
from bench.__main__ import signals_ignored

ROOT = Path(__file__).resolve().parent.parent
COMPARE_ROOT = ROOT / "run" / "compare"
RESULTS_DIR = ROOT / "bench" / "results"
READY = ".compare-ready"  # in a venv whose install finished; one without it is rebuilt

# A figure's scenario, label and how many times that label came before in the scenario
# (a sub-row such as "  p99" may stand twice).
Key = tuple[str, str, int]
Figures = Mapping[Key, "Fig"]
Pair = tuple[Figures, Figures]


class Fig(NamedTuple):
    value: float | None  # None: not a number
    unit: str
    target: str
    name: str  # the label; a sub-row's ("  p99") after its parent's, for the missing list


def figures_of(path: Path) -> dict[Key, Fig]:
    """Every figure of one `python -m bench` results file, in table order."""
    out: dict[Key, Fig] = {}
    for result in report.load(path)[1]:
        seen: dict[str, int] = {}
        parent = ""
        for fig in result.figures:
            n = seen[fig.label] = seen.get(fig.label, -1) + 1
            sub = fig.label.startswith(" ")
            parent = parent if sub else fig.label
            name = f"{parent} / {fig.label.strip()}" if sub and parent else fig.label
            v = fig.value
            number = float(v) if type(v) in (int, float) and v == v else None  # type: ignore[arg-type]
            out[(result.name, fig.label, n)] = Fig(number, fig.unit, fig.target, name)
    return out


def better(unit: str, target: str) -> str:
    """Which way a figure is better ("lower", "higher" or "" when unknown): from its
    target where it has one (< 10 ms, >= 1000, 0 errors, all succeeded), else its unit."""
    target = target.strip()
    if target.startswith("<") or target == "0":
        return "lower"
    if target.startswith(">") or target == "all" or unit.endswith("/s") or unit.startswith("of "):
        return "higher"
    return "lower" if re.fullmatch(r"(CPU )?(ms|µs|s)( wall|/job)?|[KMG]i?B", unit) else ""


def stats(values: Sequence[float | None]) -> tuple[float, float, float] | None:
    """Median (of an even count the lower middle: a value measured), min and max."""
    v = sorted(x for x in values if x is not None)
    return (v[(len(v) - 1) // 2], v[0], v[-1]) if v else None


def ratio(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None or a == 0 else b / a


@dataclass
class Row:
    """A figure both sides report: its value in every kept pair (None: that run lacks it)."""

    scenario: str
    label: str
    unit: str
    better: str
    a: list[float | None] = field(default_factory=list)
    b: list[float | None] = field(default_factory=list)

    def ratio(self) -> float | None:
        a, b = stats(self.a), stats(self.b)
        return ratio(b and b[0], a and a[0])

    def pair_ratios(self) -> list[float | None]:
        return [ratio(b, a) for a, b in zip(self.a, self.b, strict=True)]

    def verdict(self) -> str:
        """B better (or worse, or the same) when every pair agrees, else mixed."""
        signs = {(r > 1) - (r < 1) for r in self.pair_ratios() if r is not None}
        if not self.better or not signs:
            return ""
        up = "B better" if self.better == "higher" else "B worse"
        down = "B worse" if self.better == "higher" else "B better"
        return {1: up, -1: down, 0: "same"}[signs.pop()] if len(signs) == 1 else "mixed"

    def to_json(self) -> dict[str, Any]:
        a, b, r, v = stats(self.a), stats(self.b), self.ratio(), self.verdict()
        extra = {"median_a": a and a[0], "median_b": b and b[0], "ratio": r, "verdict": v}
        return asdict(self) | extra | {"pair_ratios": self.pair_ratios()}


def compare_figures(pairs: Sequence[Pair]) -> tuple[list[Row], list[str], list[str]]:
    """Rows for the figures both sides report, in table order, and the names of the
    figures only A reports and only B reports ("scenario: label")."""
    first: dict[Key, Fig] = {}
    for a, b in pairs:
        for key, fig in [*b.items(), *a.items()]:
            first.setdefault(key, fig)
    in_a = {k for a, _ in pairs for k in a}
    in_b = {k for _, b in pairs for k in b}
    rows = []
    for key, fig in first.items():
        if key in in_a and key in in_b:
            row = Row(key[0], key[1], fig.unit, better(fig.unit, fig.target))
            for a, b in pairs:
                row.a.append(a[key].value if key in a else None)
                row.b.append(b[key].value if key in b else None)
            rows.append(row)
    only_a = [f"{k[0]}: {first[k].name}" for k in first if k in in_a - in_b]
    only_b = [f"{k[0]}: {first[k].name}" for k in first if k in in_b - in_a]
    return rows, only_a, only_b


def table(rows: Sequence[Row], markdown: bool = False) -> str:
    """Scenario, figure, unit, A's and B's median with their spread, the ratio of the
    medians, every pair's ratio, which way is better and whether all pairs agree."""
    head = "scenario|figure|unit|A median (min–max)|B median (min–max)|B/A|B/A per pair|better|"
    cells = [tuple(head.split("|"))]

    def spread(values: Sequence[float | None]) -> str:
        s = stats(values)
        return f"{report.fmt(s[0])} ({report.fmt(s[1])}–{report.fmt(s[2])})" if s else "-"

    for n, r in enumerate(rows):
        new = n == 0 or rows[n - 1].scenario != r.scenario
        ratios = ["-" if x is None else f"{x:.2f}" for x in [r.ratio(), *r.pair_ratios()]]
        cells.append((r.scenario if new else "", r.label, r.unit, spread(r.a), spread(r.b)))
        cells[-1] += (ratios[0], " ".join(ratios[1:]), r.better, r.verdict())
    if markdown:
        lines = ["| " + " | ".join(c.strip() for c in row) + " |" for row in cells]
        return "\n".join([lines[0], "|" + "---|" * len(cells[0]), *lines[1:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

    def pad(i: int, cell: str) -> str:  # the numbers right-aligned
        return cell.rjust(widths[i]) if 3 <= i <= 5 else cell.ljust(widths[i])

    lines = ["  ".join(pad(i, c) for i, c in enumerate(row)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths).rstrip(), *lines[1:]])


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def tree_revision(repo: Path) -> str:
    """HEAD's sha, with "+dirty" when the working tree has changes (untracked files too)."""
    sha = git(repo, "rev-parse", "HEAD")
    return sha + ("+dirty" if git(repo, "--no-optional-locks", "status", "--porcelain") else "")


@contextlib.contextmanager
def worktree(repo: Path, sha: str, path: Path) -> Iterator[Path]:
    """`sha` checked out (detached) at `path`, removed on the way out. A lock keeps
    another compare of the same commit waiting; a leftover of a run killed outright
    is removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another compare of {sha[:12]} ...", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_worktree(repo, path)
        git(repo, "worktree", "add", "--detach", str(path), sha)
        try:
            yield path
        finally:
            with signals_ignored():
                _remove_worktree(repo, path)


def _remove_worktree(repo: Path, path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    git(repo, "worktree", "prune")  # forgets the worktrees whose folder is gone


def install_commands(tree: Path, venv: Path) -> list[list[str]]:
    """How the commit at `tree` installs itself into `venv`: its `make install`,
    else its dev lock file, else `pip install -e '.[dev]'`."""
    makefile = tree / "Makefile"
    if makefile.is_file() and re.search(r"^install:", makefile.read_text(), re.MULTILINE):
        return [["make", "install", f"VENV={venv}"]]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    locks = [n for n in ("requirements-dev.lock", "requirements.lock") if (tree / n).is_file()]
    if locks:
        return [[*pip, "--no-deps", "-r", locks[0]], [*pip, "--no-deps", "-e", "."]]
    return [[*pip, "-e", ".[dev]"]]


def side_env(venv: Path | None) -> dict[str, str]:
    """The environment of a side's processes: its venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
    return env


def ensure_venv(tree: Path, venv: Path, log: Path) -> Path:
    """The python of the venv of the commit at `tree`, installed unless cached."""
    if not (venv / READY).is_file():
        shutil.rmtree(venv, ignore_errors=True)
        print(f"installing {tree.name[:12]} into {venv} (log: {log}) ...", flush=True)
        with log.open("ab") as out:
            for cmd in [[sys.executable, "-m", "venv", str(venv)], *install_commands(tree, venv)]:
                done = subprocess.run(cmd, cwd=tree, env=side_env(venv), stdout=out, stderr=out)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}; see {log}")
        (venv / READY).write_text(tree.name + "\n")
    return venv / "bin" / "python"


@dataclass
class Side:
    key: str  # "A" or "B"
    revision: str  # shown: a short sha, "+dirty" for a working tree with changes
    python: Path
    cwd: Path
    venv: Path | None
    scenarios: list[str] = field(default_factory=list)  # its bench.__main__.SCENARIOS

    def known_scenarios(self) -> list[str]:
        code = "from bench.__main__ import SCENARIOS; print(' '.join(SCENARIOS))"
        cmd, env = [str(self.python), "-c", code], side_env(self.venv)
        done = subprocess.run(cmd, cwd=self.cwd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{self.key} ({self.revision}) has no `python -m bench`")
        return done.stdout.split()

    def run(self, names: Sequence[str], quick: bool, out: Path) -> int:
        """One `python -m bench` of this side, in a session of its own: on Ctrl-C or
        SIGTERM it gets one SIGTERM (it then removes what it started) and is waited for."""
        cmd = [str(self.python), "-m", "bench", *names, "--out", str(out)]
        cmd += ["--quick"] if quick else []
        env = side_env(self.venv)
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, start_new_session=True)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            with signals_ignored(), contextlib.suppress(subprocess.TimeoutExpired):
                proc.terminate()
                proc.wait(timeout=120)
            proc.kill()  # (only if it did not stop in time)
            raise


def run_pairs(
    sides: tuple[Side, Side], names: list[str], args: Namespace, run_dir: Path, notes: list[str]
) -> Iterator[Pair]:
    """A B A B ...: both sides' figures of every pair, as each pair ends. A failed run
    is retried once, then its pair is dropped with a note."""
    for n in range(1, args.pairs + 1):
        got: list[Figures] = []
        for side in sides:
            chosen = [s for s in names if s in side.scenarios]
            if names and not chosen:
                got.append({})  # none of the scenarios exists on this side
                continue
            for attempt in (1, 2):
                out = run_dir / f"pair{n}-{side.key}-{attempt}.json"
                title = f"pair {n}/{args.pairs}: {side.key} ({side.revision})"
                print(f"\n=== {title}", flush=True)
                rc = side.run(chosen, args.quick, out)
                if rc == 130:
                    raise KeyboardInterrupt
                if rc == 0 and out.is_file():
                    got.append(figures_of(out))
                    break
                again = "; running it again" if attempt == 1 else ""
                notes.append(f"pair {n}: the {side.key} run failed (exit {rc}){again}")
                print(notes[-1], file=sys.stderr, flush=True)
            else:
                notes.append(f"pair {n} dropped: its {side.key} run failed twice")
                break
        if len(got) == 2:
            yield got[0], got[1]


def parse_args(argv: Sequence[str] | None) -> Namespace:
    parser = ArgumentParser(
        prog="python -m bench compare",
        description="Benchmark a git ref (A) against this working tree (B), A B A B.",
    )
    parser.add_argument("ref", metavar="REF", help="git ref to compare with, e.g. origin/main")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="default: all")
    parser.add_argument("--pairs", type=int, default=3, metavar="N", help="A B pairs (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny counts in every run")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs takes a whole number from 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(dict.fromkeys(args.scenarios))
    started_at = datetime.now(UTC)
    try:
        sha = git(ROOT, "rev-parse", "--verify", "--quiet", f"{args.ref}^{{commit}}")
    except RuntimeError:
        print(f"{args.ref!r} names no commit in {ROOT}", file=sys.stderr)
        return 2
    revision_b = tree_revision(ROOT)
    short_b = revision_b[:12] + revision_b[40:]  # the sha cut, "+dirty" kept
    run_dir = COMPARE_ROOT / "runs" / started_at.strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    kept: list[Pair] = []
    notes: list[str] = []
    interrupted = False
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with worktree(ROOT, sha, COMPARE_ROOT / "trees" / sha) as tree:
            venv = COMPARE_ROOT / "venvs" / sha
            a = Side("A", sha[:12], ensure_venv(tree, venv, run_dir / "install.log"), tree, venv)
            b = Side("B", short_b, Path(sys.executable), ROOT, None)
            for side in (a, b):
                side.scenarios = side.known_scenarios()
            if unknown := [s for s in names if s not in a.scenarios + b.scenarios]:
                print(f"unknown scenario {', '.join(unknown)}", file=sys.stderr)
                return 2
            for side in (a, b):
                if missing := [s for s in names if s not in side.scenarios]:
                    notes.append(f"{side.key} has no scenario {', '.join(missing)}")
            for pair in run_pairs((a, b), names, args, run_dir, notes):
                kept.append(pair)  # one by one: an interrupted compare reports these
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted: only the pairs finished before are reported")
    except RuntimeError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)

    rows, only_a, only_b = compare_figures(kept)
    machine = report.machine(ROOT)
    print(f"\nConveyor benchmark compare — {report.describe_machine(machine)}")
    print(f"A = {args.ref} ({sha[:12]}), B = the working tree ({short_b}); ", end="")
    print(f"{len(kept)} of {args.pairs} pairs kept, each run A then B")
    print(table(rows, markdown=args.markdown))
    for title, missing in (("only A reports", only_a), ("only B reports", only_b)):
        if missing:
            print(f"\n{title}:\n" + "\n".join(f"  {m}" for m in missing))
    for note in notes:
        print(f"note: {note}")
    doc = {
        "format": "conveyor-bench-compare/1",
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "machine": machine,
        "a": {"ref": args.ref, "commit": sha},
        "b": {"ref": "working tree", "commit": revision_b},
        "config": {"scenarios": names, "pairs": args.pairs, "quick": args.quick},
        "runs": str(run_dir),
        "pairs_kept": len(kept),
        "figures": [r.to_json() for r in rows],
        "only_a": only_a,
        "only_b": only_b,
        "notes": notes,
    }
    out = RESULTS_DIR / f"compare-{run_dir.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(f"\ncomparison written to {out}")
    return 130 if interrupted else 0 if kept else 1
