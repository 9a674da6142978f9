"""One fault's figures (`Row`), the bounds they must keep, and the table of them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Row:
    """One fault's figures; `failures` says what broke a bound."""

    fault: str
    accepted: int = 0
    lost: int = 0
    finished_twice: int = 0
    duplicate_calls: int = 0
    in_flight: int = 0
    """Calls in flight at the fault (the bound of duplicate_calls)."""
    recovery_s: float = math.nan
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def check(self) -> None:
        """Record the bounds this row breaks."""
        if self.lost:
            self.failures.append(f"{self.lost} accepted jobs lost")
        if self.finished_twice:
            self.failures.append(f"{self.finished_twice} jobs finished twice")
        if self.duplicate_calls > self.in_flight:
            self.failures.append(
                f"{self.duplicate_calls} duplicate model calls, more than the"
                f" {self.in_flight} in flight at the fault"
            )

    @property
    def ok(self) -> bool:
        return not self.failures


def table(rows: Sequence[Row], markdown: bool = False) -> str:
    head = [
        "fault",
        "accepted",
        "lost",
        "finished twice",
        "dup. model calls",
        "in flight at fault",
        "recovery",
        "result",
    ]
    body = [
        [
            r.fault,
            str(r.accepted),
            str(r.lost),
            str(r.finished_twice),
            str(r.duplicate_calls),
            str(r.in_flight),
            f"{r.recovery_s:.1f} s" if math.isfinite(r.recovery_s) else "-",
            "ok" if r.ok else "FAILED",
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *map(line, body)])
