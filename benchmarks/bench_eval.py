"""Evaluation speed and memory: sezm vs DeePMD-kit 3.2 on the same checkpoint and frame.

    python benchmarks/bench_eval.py --case tiny --case mini [--oracle /tmp/oracle/bin/python]

Each engine runs in its own process (same thread count), evaluating energy + forces + virial
of one 192-atom periodic water frame; the two are run alternately for ``--rounds`` rounds and
the best time of each round is kept, so background load affects both alike. Reports the median
over rounds, the ratio upstream / sezm, and peak resident memory of each process.
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


def run(python: str, engine: str, case: str, reps: int, threads: int, mult: int) -> dict:
    code = WORKER.replace("{PARITY}", str(PARITY))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(
        [python, "-c", code, engine, case, str(reps), str(threads), str(mult)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="parity case (default: tiny, mini)")
    ap.add_argument("--oracle", default="/tmp/oracle/bin/python", help="python with deepmd-kit 3.2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--replicate", type=int, default=1, help="supercell multiplier (1, 8, 27, ...)")
    args = ap.parse_args()
    have_oracle = Path(args.oracle).is_file()
    for case in args.case or ["tiny", "mini"]:
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(run(sys.executable, "sezm", case, args.reps, args.threads, args.replicate))
            if have_oracle:
                theirs.append(
                    run(args.oracle, "deepmd", case, args.reps, args.threads, args.replicate)
                )
        t_ours = statistics.median(r["best"] for r in ours)
        line = (
            f"{case:6s} natoms {ours[0]['natoms']:6d} threads {args.threads}: sezm {t_ours:.3f} s"
        )
        line += f" (peak {max(r['peak_mb'] for r in ours):.0f} MB)"
        if theirs:
            t_up = statistics.median(r["best"] for r in theirs)
            line += f", deepmd-kit {t_up:.3f} s (peak {max(r['peak_mb'] for r in theirs):.0f} MB)"
            line += f", speed-up x{t_up / t_ours:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
