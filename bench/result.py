"""The shape of a scenario's result (`Result` of `Figure`s), the median of repeated
runs, and the statistics the scenarios report (percentiles, summaries, rounding)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Verdict = Literal["met", "missed", ""]


@dataclass
class Figure:
    """One measured number, with its unit and, where DESIGN.md sets one, its target."""

    label: str
    value: float | int | str | None
    unit: str = ""
    target: str = ""
    """Human-readable target, e.g. "< 10 ms"."""
    met: bool | None = None

    @property
    def verdict(self) -> Verdict:
        if self.met is None:
            return ""
        return "met" if self.met else "missed"


@dataclass
class Result:
    """What a scenario reports: its figures (in table order), raw extras, notes."""

    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping in the JSON file (distributions, counters)."""
    notes: list[str] = field(default_factory=list)
    status: Literal["ok", "skipped", "error", "interrupted"] = "ok"
    elapsed_s: float = 0.0
    resources: dict[str, Any] = field(default_factory=dict)
    """CPU and memory of every process over the scenario, filled in by the harness."""

    def add(
        self,
        label: str,
        value: float | int | str | None,
        unit: str = "",
        *,
        target: str = "",
        met: bool | None = None,
    ) -> Figure:
        fig = Figure(label, value, unit, target, met)
        self.figures.append(fig)
        return fig

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for fig, raw in zip(self.figures, out["figures"], strict=True):
            raw["verdict"] = fig.verdict
        return out


def median_of(runs: Sequence[Result]) -> Result:
    """One result from several runs of a scenario: each figure is the median of its
    runs' values (the lower middle one of an even count, so it is a value one run
    measured), with that run's verdict. Every run's values stay in `extra["runs"]`."""
    if len(runs) == 1:
        return runs[0]
    last = runs[-1]
    merged = Result(last.name, last.title, extra=dict(last.extra), resources=last.resources)
    merged.status = next((r.status for r in runs if r.status != "ok"), "ok")
    merged.elapsed_s = sum(r.elapsed_s for r in runs)
    merged.notes = list(dict.fromkeys(n for r in runs for n in r.notes))
    merged.notes.append(f"each figure is the median of {len(runs)} runs")
    # A label may stand twice in a run (a sub-row such as "  p99" under two runs of a
    # scenario): figures are matched by label and by how many times it came before.
    by_key: dict[tuple[str, int], list[Figure]] = {}
    for run in runs:
        seen: dict[str, int] = {}
        for fig in run.figures:
            n = seen[fig.label] = seen.get(fig.label, -1) + 1
            by_key.setdefault((fig.label, n), []).append(fig)
    for (label, _), figs in by_key.items():
        numeric = [f for f in figs if isinstance(f.value, int | float) and not math.isnan(f.value)]
        if len(numeric) < len(figs) or not numeric:
            merged.figures.append(figs[-1])
            continue
        middle = sorted(numeric, key=lambda f: float(f.value or 0))[(len(numeric) - 1) // 2]
        merged.figures.append(Figure(label, middle.value, middle.unit, middle.target, middle.met))
    merged.extra["runs"] = [[[f.label, f.value] for f in r.figures] for r in runs]
    return merged


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, linearly interpolated."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def summarize(values: Iterable[float], scale: float = 1.0) -> dict[str, float]:
    """count, mean, p50, p95, p99 and max of `values` times `scale` (e.g. 1000 for ms)."""
    data = sorted(v * scale for v in values)
    if not data:
        return {"count": 0}
    return {
        "count": len(data),
        "mean": sum(data) / len(data),
        "p50": percentile(data, 50),
        "p95": percentile(data, 95),
        "p99": percentile(data, 99),
        "max": data[-1],
    }


def rounded(value: float, digits: int = 2) -> float:
    return round(value, digits) if math.isfinite(value) else value
