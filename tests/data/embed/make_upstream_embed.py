"""Reference embeddings of DeePMD-kit 3.2 ``dp embed`` (read by tests/infer/test_embed.py).

Run from the repository root with a DeePMD-kit 3.2 environment on PATH:

    source /tmp/oracle/env.sh && python tests/data/embed/make_upstream_embed.py

It writes ``water_nopbc/`` (frames 0-1 of tests/data/systems/water/data_0 as an open-boundary
system) and, for the ``tiny`` and ``mini`` parity checkpoints, ``<case>.h5``: the output of
``dp --pt embed`` on ``tests/data/systems/water/data_0`` and ``water_nopbc`` (default fp32).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
WATER = Path("tests/data/systems/water/data_0")
NOPBC = HERE / "water_nopbc"


def make_nopbc() -> None:
    shutil.rmtree(NOPBC, ignore_errors=True)
    (NOPBC / "set.000").mkdir(parents=True)
    for name in ("type.raw", "type_map.raw"):
        shutil.copy(ROOT / WATER / name, NOPBC / name)
    (NOPBC / "nopbc").touch()
    coord = np.load(ROOT / WATER / "set.000/coord.npy")[:2]
    np.save(NOPBC / "set.000/coord.npy", coord)


def main() -> None:
    make_nopbc()
    listing = HERE / "systems.txt"
    listing.write_text(f"{WATER}\n{NOPBC.relative_to(ROOT)}\n")
    for case in ("tiny", "mini"):
        model = f"tests/data/parity/{case}/model.pt"
        out = HERE / f"{case}.h5"
        cmd = ["dp", "--pt", "embed", "-m", model, "-f", str(listing), "-o", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT)
    listing.unlink()


if __name__ == "__main__":
    main()
