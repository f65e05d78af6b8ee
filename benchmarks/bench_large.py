"""The largest water system sezm evaluates (energy + forces + virial) on this machine.

    python benchmarks/bench_large.py --case mini --cells 7 7 6      # 192 * 294 = 56,448 atoms

Replicates the 192-atom periodic water frame of a parity case ``--cells`` times along the
three cell vectors, evaluates it once through ``sezm.DeepPot`` (streamed path, chunk chosen
automatically unless ``SEZM_EDGE_CHUNK`` is set) and prints atoms, edges, wall time and the
peak resident memory of the process. Run DeePMD-kit on the same cell with ``--engine deepmd``
under its own interpreter (``/tmp/oracle/bin/python``) to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np

PARITY = Path(__file__).resolve().parent.parent / "tests" / "data" / "parity"


def replicated(case: str, cells: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = np.load(PARITY / case / "expected.npz")
    coord = data["water_pbc_0/coord"].reshape(-1, 3)
    box = data["water_pbc_0/box"].reshape(3, 3)
    atype = data["water_pbc_0/atype"]
    grid = np.array(
        [[i, j, k] for i in range(cells[0]) for j in range(cells[1]) for k in range(cells[2])]
    )
    shifts = grid @ box
    coord = (coord[None] + shifts[:, None]).reshape(-1, 3)
    return coord, box * np.array(cells)[:, None], np.tile(atype, len(shifts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="mini")
    ap.add_argument("--cells", type=int, nargs=3, default=[2, 2, 2])
    ap.add_argument("--engine", choices=["sezm", "deepmd"], default="sezm")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    coord, box, atype = replicated(args.case, args.cells)
    if args.engine == "sezm":
        import sezm

        dp = sezm.DeepPot(PARITY / args.case / "model.pt")
    else:
        from deepmd.infer import DeepPot

        dp = DeepPot(str(PARITY / args.case / "model.pt"))
    start = time.perf_counter()
    energy = dp.eval(coord.reshape(1, -1), box.reshape(1, 9), atype)[0]
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "engine": args.engine,
                "atoms": len(atype),
                "seconds": round(seconds, 2),
                "peak_mb": round(peak_mb),
                "mb_per_atom": round(peak_mb / len(atype), 4),
                "energy_per_atom": float(np.asarray(energy).sum()) / len(atype),
            }
        )
    )


if __name__ == "__main__":
    main()
