"""Evaluation speed and memory: sezm vs DeePMD-kit 3.2 on the same checkpoint and frame.

    python benchmarks/bench_eval.py --case tiny --case mini [--oracle /tmp/oracle/bin/python]
    python benchmarks/bench_eval.py --case mini --replicate 1 8 27 64   # throughput, 192..12288 atoms

Each engine runs in its own process (same thread count), evaluating energy + forces + virial
of one 192-atom periodic water frame; the two are run alternately for ``--rounds`` rounds and
the best time of each round is kept, so background load affects both alike. Reports the median
over rounds, throughput in atoms/s, the ratio upstream / sezm, peak resident memory of each
process, and the machine's load average (other work on the cores moves the times).
``--replicate`` repeats the cell n = k^3 times (192 n atoms) for the throughput curve; a size
an engine cannot run (e.g. out of memory) is reported as failed.
Without an oracle interpreter only sezm is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "tests" / "data" / "parity"

WORKER = r"""
import json, resource, sys, time
import numpy as np, torch
engine, case, reps, threads, natoms_mult = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
path = f"{PARITY}/{case}/model.pt"
data = np.load(f"{PARITY}/{case}/expected.npz")
coord = data["water_pbc_0/coord"].reshape(-1, 3)
box = data["water_pbc_0/box"].reshape(3, 3)
atype = data["water_pbc_0/atype"]
if natoms_mult > 1:  # replicate the cell along x, y, z
    reps_xyz = [int(round(natoms_mult ** (1 / 3)))] * 3
    shifts = np.array([[i, j, k] for i in range(reps_xyz[0]) for j in range(reps_xyz[1]) for k in range(reps_xyz[2])]) @ box
    coord = (coord[None] + shifts[:, None]).reshape(-1, 3)
    atype = np.tile(atype, len(shifts))
    box = box * np.array(reps_xyz)[:, None]
if engine == "sezm":
    import sezm
    dp = sezm.DeepPot(path, device="cpu")
else:
    from deepmd.infer import DeepPot
    dp = DeepPot(path)
c, b = coord.reshape(1, -1), box.reshape(1, 9)
dp.eval(c, b, atype)
times = []
for _ in range(reps):
    t0 = time.perf_counter(); dp.eval(c, b, atype); times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"best": min(times), "peak_mb": peak, "natoms": len(atype)}))
"""


def run(
    python: str, engine: str, case: str, reps: int, threads: int, mult: int, **env_vars: str
) -> dict:
    code = WORKER.replace("{PARITY}", str(PARITY))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **env_vars)
    out = subprocess.run(
        [python, "-c", code, engine, case, str(reps), str(threads), str(mult)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["killed"])[-1]
        return {"failed": f"exit {out.returncode}: {tail[:120]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(name: str, runs: list[dict]) -> tuple[str, float | None]:
    good = [r for r in runs if "failed" not in r]
    if not good:
        return f"{name} failed ({runs[0]['failed']})", None
    best = statistics.median(r["best"] for r in good)
    peak = max(r["peak_mb"] for r in good)
    rate = good[0]["natoms"] / best
    return f"{name} {best:.3f} s = {rate:,.0f} atoms/s (peak {peak:.0f} MB)", best


def _peak(runs: list[dict]) -> float | None:
    good = [r["peak_mb"] for r in runs if "failed" not in r]
    return max(good) if good else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="parity case (default: tiny, mini)")
    ap.add_argument("--oracle", default="/tmp/oracle/bin/python", help="python with deepmd-kit 3.2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--replicate", type=int, nargs="+", default=[1], help="supercell multipliers (1 8 27 ...)"
    )
    ap.add_argument(
        "--plain", action="store_true", help="also time sezm's plain path (SEZM_EDGE_CHUNK=0)"
    )
    args = ap.parse_args()
    have_oracle = Path(args.oracle).is_file()
    for case in args.case or ["tiny", "mini"]:
        for mult in args.replicate:
            ours, plain, theirs = [], [], []
            for _ in range(args.rounds):
                ours.append(run(sys.executable, "sezm", case, args.reps, args.threads, mult))
                if args.plain:
                    plain.append(
                        run(
                            sys.executable,
                            "sezm",
                            case,
                            args.reps,
                            args.threads,
                            mult,
                            SEZM_EDGE_CHUNK="0",
                        )
                    )
                if have_oracle:
                    theirs.append(run(args.oracle, "deepmd", case, args.reps, args.threads, mult))
            natoms = 192 * mult
            text, t_ours = _summary("sezm", ours)
            line = f"{case:6s} natoms {natoms:6d} threads {args.threads}: {text}"
            if plain:
                line += f", {_summary('sezm plain path', plain)[0]}"
            if theirs:
                text, t_up = _summary("deepmd-kit", theirs)
                line += f", {text}"
                if t_ours and t_up:
                    line += f", speed-up x{t_up / t_ours:.2f}"
                mem = [_peak(ours), _peak(theirs)]
                if all(mem):
                    line += f", memory x{mem[0] / mem[1]:.2f} of deepmd-kit's"
            line += f" [load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores]"
            print(line, flush=True)


if __name__ == "__main__":
    main()
