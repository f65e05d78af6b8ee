"""Training step time and peak memory: ``sezm train`` vs ``dp --pt train`` on the same input.

    python benchmarks/bench_train.py [--input examples/water/input_mini.json] [--steps 16]

Both trainers run the same input (DPA4-Mini on the bundled water data, batch size 1, 192 atoms)
for ``--steps`` steps with a display every ``--every`` steps; the mean step time is taken from
their own interval timings, skipping the first interval (start-up, first-touch allocations).
Peak resident memory is the process's ``ru_maxrss``. Runs sezm and upstream alternately for
``--rounds`` rounds and reports medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SEZM = """
import resource, sys
from sezm.cli import main
main(["train", "input.json", "--skip-neighbor-stat"])
print("PEAK_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
UPSTREAM = """
import resource, sys
from deepmd.main import main
main(["--pt", "train", "input.json", "--skip-neighbor-stat"])
print("PEAK_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def prepare(workdir: Path, source: Path, steps: int, every: int) -> None:
    config = json.loads(source.read_text())
    tr = config["training"]
    for key in ("training_data", "validation_data"):
        if key in tr:
            tr[key]["systems"] = [str((source.parent / s).resolve()) for s in tr[key]["systems"]]
    tr.pop("validation_data", None)  # time the training step only
    tr.update(
        numb_steps=steps, disp_freq=every, save_freq=steps, disp_avg=False, time_training=True
    )
    tr.pop("stat_file", None)
    config.get("validating", {}).update(full_validation=False)
    (workdir / "input.json").write_text(json.dumps(config))


def step_time(log: str, every: int) -> float:
    """Mean seconds per step over the display intervals after the first."""
    sezm = [float(x) for x in re.findall(r"wall time ([0-9.]+) s", log)]
    upstream = [float(x) for x in re.findall(r"total wall time = ([0-9.]+) s", log)]
    times = sezm or upstream
    if len(times) < 3:
        raise RuntimeError("not enough timed intervals in the log:\n" + log[-2000:])
    return statistics.mean(times[2:]) / every  # intervals: step 1, then every `every` steps


def run(python: str, code: str, args, threads: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.input, args.steps, args.every)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run(
            [python, "-c", code], cwd=work, env=env, capture_output=True, text=True, check=False
        )
        text = out.stdout + out.stderr
        if out.returncode:
            raise RuntimeError(text[-3000:])
        peak = float(re.findall(r"PEAK_MB ([0-9.]+)", text)[-1])
        return step_time(text, args.every), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", type=Path, default=ROOT / "examples" / "water" / "input.json")
    ap.add_argument("--oracle", default="/tmp/oracle/bin/python")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(run(sys.executable, SEZM, args, args.threads))
        if Path(args.oracle).is_file():
            theirs.append(run(args.oracle, UPSTREAM, args, args.threads))
    t_ours = statistics.median(t for t, _ in ours)
    m_ours = max(m for _, m in ours)
    line = f"train step ({args.input.name}, {args.threads} threads): sezm {t_ours:.3f} s, peak {m_ours:.0f} MB"
    if theirs:
        t_up = statistics.median(t for t, _ in theirs)
        m_up = max(m for _, m in theirs)
        line += f"; deepmd-kit {t_up:.3f} s, peak {m_up:.0f} MB; speed-up x{t_up / t_ours:.2f}, memory x{m_ours / m_up:.2f}"
    print(line)


if __name__ == "__main__":
    main()
