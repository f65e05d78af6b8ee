"""sezm against DeePMD-kit 3.2 on one device: time and peak memory of ``DeepPot.eval`` (energy,
forces, virial, neighbour search included) on water cells of growing size, same checkpoint.

    python benchmarks/gpu/side_by_side.py [--upstream-site DIR] [--cpu] [--case tiny --case mini]

Each engine runs in its own process (``--worker``), which prints one JSON line per system:
sezm with its automatic evaluation path, sezm with the plain path forced (``SEZM_EDGE_CHUNK=0``)
and DeePMD-kit (importable from ``--upstream-site``, see ``upstream_site.sh``). An engine stops
growing the system at its first out-of-memory error or once one evaluation takes longer than a
quarter of ``--time-cap`` seconds (the next size is 3-8x larger); after one warm-up call, each
size is timed up to three times within half of it (the median is reported). Peak memory is
``torch.cuda.max_memory_allocated`` for the evaluation alone (the process's resident peak with
``--cpu``). The GPU check calls :func:`section`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PARITY = ROOT / "tests" / "data" / "parity"
SIZES = ((1, 1, 1), (2, 2, 2), (4, 4, 4), (6, 6, 6), (8, 8, 8), (10, 10, 10))
ENGINES = {  # label -> (engine, extra environment)
    "DeePMD-kit 3.2": ("upstream", {}),
    "sezm (automatic path)": ("sezm", {}),
    "sezm (plain path)": ("sezm", {"SEZM_EDGE_CHUNK": "0"}),
}


@dataclass(frozen=True)
class Plan:
    """What each engine evaluates, and its limits."""

    cases: list[str]
    sizes: int  # how many of SIZES to try
    time_cap: float  # seconds per system size (see the module's text)
    cpu: bool
    site: Path | None  # where DeePMD-kit is importable from
    timeout: float  # seconds per engine's process


def worker(engine: str, plan: Plan) -> None:
    """Evaluate each case on growing cells; one JSON line per (case, size)."""
    import gc
    import resource

    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from gpu_check import water_cell

    cpu, time_cap = plan.cpu, plan.time_cap
    device = "cpu" if cpu else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # both engines at full float32
    for case in plan.cases:
        path = PARITY / case / "model.pt"
        if engine == "sezm":
            import sezm

            dp = sezm.DeepPot(path, device=device)
        else:
            from deepmd.infer import DeepPot

            dp = DeepPot(str(path))
        for reps in SIZES[: plan.sizes]:
            coord, box, atype = water_cell(reps)
            row = {"case": case, "atoms": len(atype)}
            if not cpu:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                dp.eval(coord[None], box[None], atype)  # warm-up: allocations, kernel choices
                times = []
                while len(times) < 3 and sum(times) < time_cap / 2:
                    if not cpu:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    dp.eval(coord[None], box[None], atype)
                    if not cpu:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
            except Exception as err:  # an engine's out-of-memory error ends its growth
                message = f"{type(err).__name__}: {err}"
                row["failed"] = "out of memory" if "out of memory" in message else message[:200]
                print(json.dumps(row), flush=True)
                break
            row["ms"] = 1e3 * float(np.median(times))
            row["peak_mb"] = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                if cpu
                else torch.cuda.max_memory_allocated() / 2**20
            )
            print(json.dumps(row), flush=True)
            if times[0] > time_cap / 4:  # the next size is ~3-8x larger
                break
        del dp


def run_engine(label: str, plan: Plan) -> list[dict]:
    """One engine's rows, from its own process."""
    engine, extra = ENGINES[label]
    env = dict(os.environ, **extra)
    if engine == "upstream" and plan.site is not None:
        env["PYTHONPATH"] = f"{plan.site}:{env.get('PYTHONPATH', '')}"
    command = [
        sys.executable,
        str(Path(__file__)),
        "--worker",
        engine,
        "--sizes",
        str(plan.sizes),
        "--time-cap",
        str(plan.time_cap),
    ] + [a for c in plan.cases for a in ("--case", c)]
    if plan.cpu:
        command.append("--cpu")
    try:
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=plan.timeout)
        status, stdout, stderr = f"exit {out.returncode}", out.stdout, out.stderr
    except subprocess.TimeoutExpired as err:  # keeps the rows printed so far
        status, stdout, stderr = "timeout", _text(err.stdout), _text(err.stderr)
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if status != "exit 0":
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        rows.append({"case": "-", "atoms": 0, "failed": f"{status}: {tail[:200]}"})
    return rows


def _text(output: str | bytes | None) -> str:
    return output.decode() if isinstance(output, bytes) else output or ""


def table(results: dict[str, list[dict]], cases: list[str]) -> list[str]:
    """Markdown: one row per (case, atoms), each engine's ms and MB, and the ratios."""
    labels = list(results)
    up, auto = "DeePMD-kit 3.2", "sezm (automatic path)"
    head = "| model | atoms | " + " | ".join(f"{k} ms / MB" for k in labels)
    lines = [
        head + " | speed, upstream / sezm auto | memory, sezm auto / upstream |",
        "|---|---|" + "---|" * (len(labels) + 2),
    ]
    index = {k: {(r["case"], r["atoms"]): r for r in rows} for k, rows in results.items()}
    for case in cases:
        sizes = sorted({a for rows in index.values() for (c, a) in rows if c == case})
        for atoms in sizes:
            cells, got = [], {k: index[k].get((case, atoms)) for k in labels}
            for k in labels:
                r = got[k]
                cells.append(
                    "-" if r is None else r.get("failed") or f"{r['ms']:.1f} / {r['peak_mb']:.0f}"
                )
            ratio = mem = ""
            if all(got.get(k) and "ms" in got[k] for k in (up, auto)):
                ratio = f"{got[up]['ms'] / got[auto]['ms']:.2f}x"
                mem = f"{got[auto]['peak_mb'] / got[up]['peak_mb']:.2f}x"
            lines.append(f"| {case} | {atoms} | " + " | ".join(cells) + f" | {ratio} | {mem} |")
    for k, rows in results.items():
        lines += [f"- {k}: {r['failed']}" for r in rows if r.get("case") == "-"]
    return lines


def side_by_side(plan: Plan, say=None) -> None:
    say = say or (lambda *lines: print("\n".join(lines), flush=True))
    results = {}
    for label in ENGINES:
        start = time.perf_counter()
        results[label] = run_engine(label, plan)
        say(f"- {label}: {time.perf_counter() - start:.0f} s")
    say("", *table(results, plan.cases))


def section(c) -> None:
    """The GPU check's section (``c``: its ``Check``)."""
    site = os.environ.get("SEZM_UPSTREAM_SITE")
    plan = Plan(
        cases=["tiny"] if c.dry_run else ["mini", "tiny"],
        sizes=1 if c.dry_run else len(SIZES),
        time_cap=60 if c.dry_run else 6.0,
        cpu=c.dry_run,
        site=Path(site) if site else None,
        timeout=max(30.0, min(80.0, c.left() / 5)),
    )
    side_by_side(plan, say=c.add)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=("sezm", "upstream"))
    ap.add_argument("--case", action="append")
    ap.add_argument("--sizes", type=int, default=len(SIZES), help="how many of SIZES to try")
    ap.add_argument(
        "--time-cap", type=float, default=8.0, help="seconds per system size (see above)"
    )
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--upstream-site", type=Path)
    args = ap.parse_args()
    plan = Plan(
        args.case or ["tiny", "mini"],
        args.sizes,
        args.time_cap,
        args.cpu,
        args.upstream_site,
        600.0,
    )
    if args.worker:
        worker(args.worker, plan)
    else:
        side_by_side(plan)


if __name__ == "__main__":
    main()
