"""The machine's description, the printed table and the JSON file of a benchmark run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from bench.harness import Figure, Result

PACKAGES = (
    "grpcio",
    "protobuf",
    "aio-pika",
    "aiormq",
    "sqlalchemy",
    "asyncpg",
    "anthropic",
    "uvloop",
    "orjson",
    "aiohttp",
)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _run(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def memory_total_gib() -> float:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def rabbitmq_version() -> str:
    raw = _run("rabbitmqctl", "-q", "status", "--formatter", "json")
    if not raw:
        return ""
    try:
        status = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    erlang = str(status.get("erlang_version", "")).split(" [")[0]
    return f"{status.get('rabbitmq_version', '')} ({erlang})".strip()


def postgres_version() -> str:
    raw = _run("psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "SHOW server_version")
    return raw.split()[0] if raw else ""


def git_revision(root: Path) -> dict[str, Any]:
    """HEAD and whether the work tree differs from it (read-only git commands)."""
    head = _run("git", "-C", str(root), "rev-parse", "--short", "HEAD")
    changed = _run(
        "git",
        "-C",
        str(root),
        "--no-optional-locks",
        "status",
        "--porcelain",
        "--untracked-files=no",
    )
    return {"commit": head, "modified_files": len(changed.splitlines()) if changed else 0}


def machine(root: Path) -> dict[str, Any]:
    """What the figures were measured on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_total_gib(),
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
        "python": sys.version.split()[0],
        "rabbitmq": rabbitmq_version(),
        "postgres": postgres_version(),
        "loadavg_at_start": _read("/proc/loadavg").split()[:3],
        "packages": versions,
        "git": git_revision(root),
    }


def describe_machine(m: Mapping[str, Any]) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, RabbitMQ {m['rabbitmq'] or '?'}, Postgres {m['postgres'] or '?'}"
    )


def fmt(value: Any) -> str:
    """A figure's value for the table: thousands separated, few decimals."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def table(results: Iterable[Result], markdown: bool = False) -> str:
    """The figures as a table: scenario, metric, value, unit, target, verdict."""
    rows: list[tuple[str, str, str, str, str]] = []
    for r in results:
        if r.status != "ok" and not r.figures:
            rows.append((r.name, f"({r.status}) " + "; ".join(r.notes), "", "", ""))
            continue
        first = True
        for fig in r.figures:
            verdict = {"met": "ok", "missed": "MISSED"}.get(fig.verdict, "")
            target = f"{fig.target} {verdict}".strip()
            rows.append((r.name if first else "", fig.label, fmt(fig.value), fig.unit, target))
            first = False
    header = ("scenario", "metric", "value", "unit", "target")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    out = []
    for n, row in enumerate([header, *rows]):
        cells = [
            row[i].rjust(widths[i]) if i == 2 else row[i].ljust(widths[i]) for i in range(len(row))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(
    path: Path,
    *,
    machine_info: Mapping[str, Any],
    config: Mapping[str, Any],
    results: Sequence[Result],
    started_at: datetime,
    interrupted: bool,
) -> None:
    doc = {
        "format": "conveyor-bench/1",
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "machine": dict(machine_info),
        "config": dict(config),
        "scenarios": {r.name: r.to_json() for r in results},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY, default=str)
    )


def load(path: Path) -> tuple[dict[str, Any], list[Result]]:
    """A results file: its machine description and its scenarios' results."""
    doc = orjson.loads(path.read_bytes())
    results = []
    for name, raw in doc["scenarios"].items():
        result = Result(name, raw.get("title", name), status=raw.get("status", "ok"))
        result.notes = list(raw.get("notes", []))
        for fig in raw.get("figures", []):
            result.figures.append(
                Figure(fig["label"], fig["value"], fig["unit"], fig["target"], fig["met"])
            )
        results.append(result)
    return dict(doc["machine"]), results
