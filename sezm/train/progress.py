"""Learning-curve file and progress lines (DeePMD-kit's ``lcurve.out`` columns)."""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from .checkpoint import atomic_write_text

log = logging.getLogger("sezm.train")


class LearningCurve:
    """``lcurve.out``: ``# step  <metric>_val <metric>_trn ...  lr`` (sorted metric names); in
    a multi-task run per branch ``<metric>_val_<b> <metric>_trn_<b>`` (only ``_trn`` columns
    for a branch without validation data), then ``lr``."""

    def __init__(self, handle: TextIO, labels: dict[str, str], write_header: bool) -> None:
        """``labels``: branch -> its name in the columns (``""``: none, a single task)."""
        self.handle = handle
        self.suffixes = {name: f"_{label}" if label else "" for name, label in labels.items()}
        self.needs_header = write_header

    def write(
        self,
        step: int,
        lr: float,
        train: Mapping[str, Mapping[str, float]],
        valid: Mapping[str, Mapping[str, float]],
    ) -> None:
        """One row: per branch its training (and validation) metrics."""
        if self.needs_header:
            self.handle.write(self._header(train, valid))
            self.needs_header = False
        line = f"{step:7d}"
        for name in self.suffixes:
            for k in sorted(train[name]):
                if valid[name]:
                    line += f"   {valid[name].get(k, math.nan):11.2e} {train[name][k]:11.2e}"
                else:
                    line += f"   {train[name][k]:11.2e}"
        self.handle.write(line + f"   {lr:8.1e}\n")
        self.handle.flush()

    def _header(self, train: Mapping[str, Mapping], valid: Mapping[str, Mapping]) -> str:
        head = "# {:5s}".format("step")
        for name, suffix in self.suffixes.items():
            for k in sorted(train[name]):
                val, trn = f"{k}_val{suffix}", f"{k}_trn{suffix}"
                head += f"   {val:>11s} {trn:>11s}" if valid[name] else f"   {trn:>11s}"
        head += "   {:8s}\n".format("lr")
        return head + "# If there is no available reference data, rmse_*_{val,trn} will print nan\n"


class StepTimer:
    """Wall time per display interval, the estimated time to finish, and the mean time of the
    steps this run made (a restarted run counts from its first step, not from step 0)."""

    def __init__(self, start_step: int, num_steps: int) -> None:
        self.num_steps = num_steps
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.last_step, self.last_time = start_step, self.start_time
        self.total_time, self.total_steps = 0.0, 0

    def lap(self, step: int) -> tuple[float, str]:
        """``(seconds since the last lap, ETA text)`` at completed ``step``."""
        now = time.perf_counter()
        elapsed, steps = now - self.last_time, max(step - self.last_step, 1)
        self.total_time += elapsed
        self.total_steps += steps
        self.last_step, self.last_time = step, now
        remaining = (self.num_steps - step) * self.total_time / self.total_steps
        finish = datetime.datetime.now() + datetime.timedelta(seconds=remaining)
        eta = f"{datetime.timedelta(seconds=int(remaining))} (at {finish:%Y-%m-%d %H:%M})"
        return elapsed, eta

    def steps_run(self, step: int) -> int:
        """Steps this run made when ``step`` steps are complete."""
        return max(step - self.start_step, 0)

    def mean_step_time(self, step: int) -> float:
        """Mean wall time (s) of the steps this run made, ``step`` being the last complete
        one: the time since the start over :meth:`steps_run` (0 when no step ran)."""
        steps = self.steps_run(step)
        return (time.perf_counter() - self.start_time) / steps if steps else 0.0


def format_metrics(step: int, tag: str, metrics: dict[str, float], lr: float | None) -> str:
    """One log line, ``batch <step> <tag>: <name> = <value>, ...[, lr = <lr>]``, sorted by name."""
    text = ", ".join(f"{k} = {v:8.2e}" for k, v in sorted(metrics.items()))
    lr_text = f", lr = {lr:8.2e}" if lr is not None else ""
    return f"batch {step:7d} {tag}: {text}{lr_text}"


def repair_curve(path: str | Path, last_step: int) -> bool:
    """Make ``lcurve.out`` fit for a run that continues after step ``last_step``: keep the
    comment lines and the complete rows up to ``last_step``, drop the rows after it and any
    partial row (a write cut by a kill or a full disk: no final newline, another number of
    columns than the header, or a field that is not a number). Whether a header remains."""
    file = Path(path)
    if not file.is_file():
        return False
    lines = file.read_text(errors="replace").splitlines(keepends=True)
    header = [ln for ln in lines if ln.startswith("#") and ln.endswith("\n")]
    width = len(header[0][1:].split()) if header else None
    kept, partial, later = [], [], 0
    for line in lines:
        if line.startswith("#") or not line.strip():
            (kept if line.endswith("\n") else partial).append(line)
            continue
        fields = line.split()
        if not line.endswith("\n") or (width and len(fields) != width) or not _numbers(fields):
            partial.append(line)
        elif int(float(fields[0])) <= last_step:
            kept.append(line)
        else:
            later += 1
    if partial:
        log.warning(
            "%s: dropped %d partial row(s) (an interrupted write): %s",
            file,
            len(partial),
            "; ".join(repr(ln.rstrip("\n")[:60]) for ln in partial[:3]),
        )
    if later:
        log.info(
            "%s: dropped %d row(s) after step %d, where this run restarts", file, later, last_step
        )
    atomic_write_text(file, "".join(kept))
    return bool(header) and any(ln.startswith("#") for ln in kept)


def _numbers(fields: list[str]) -> bool:
    try:
        [float(f) for f in fields]
    except ValueError:
        return False
    return True
