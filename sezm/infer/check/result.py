"""One row of the ``sezm check`` table, and the table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Result:
    """``measured`` must be ``<= limit`` (``relation ">="``: at least ``limit``); a result
    without a measurement is skipped and ``note`` says why."""

    name: str
    measured: float | None
    limit: float | None
    unit: str = ""
    relation: str = "<="
    note: str = ""

    @property
    def status(self) -> str:
        if self.measured is None or self.limit is None:
            return "SKIP"
        # comparisons with NaN are False: a NaN measurement fails
        at_least = self.relation == ">="
        ok = self.measured >= self.limit if at_least else self.measured <= self.limit
        return "PASS" if ok else "FAIL"

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def skipped(name: str, why: str) -> Result:
    """A check that did not run, with the reason as its note."""
    return Result(name, None, None, note=why)


def relative_error(got, want) -> float:
    """``max|got - want| / (1 + max|want|)``."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / (1.0 + np.max(np.abs(want))))


def worst(errors: dict[str, float]) -> tuple[float, str]:
    """The largest error (NaN first) and its name."""
    name = max(errors, key=lambda k: math.inf if math.isnan(errors[k]) else errors[k])
    return errors[name], name


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = "inf" if math.isinf(value) else f"{value:.3g}"
    return f"{text} {unit}".strip()


def format_table(results: Sequence[Result]) -> str:
    """Aligned columns ``check | measured | tolerance | result``, notes after the result."""
    rows = [("check", "measured", "tolerance", "result")]
    for r in results:
        limit = "-" if r.limit is None else f"{r.relation} {_number(r.limit, r.unit)}"
        status = r.status + (f"  {r.note}" if r.note else "")
        rows.append((r.name, _number(r.measured, r.unit), limit, status))
    widths = [max(len(row[k]) for row in rows) for k in range(3)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
