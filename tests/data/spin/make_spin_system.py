"""The spin test system ``NiO`` and the ``dp --pt test`` numbers of ``tests/data/test_spin_data.py``.

``NiO``: the first 3 frames of DeePMD-kit's ``examples/spin/data/data_1`` (the shared data
``data/spin/data_1``), which store each Ni spin as a virtual atom (type 2) 0.4 Å from its Ni,
converted to the spin format as DeePMD-kit documents its TensorFlow layout
(``doc/model/train-energy-spin.md``): types Ni, O (32 atoms); ``spin.npy = (r_virtual - r_Ni) /
0.314`` (``virtual_scale = virtual_len / spin_norm = 0.4 / 1.2737``); ``force.npy`` = the real
atoms' rows of the old ``force.npy``; ``force_mag.npy`` = the virtual atoms' rows (the magnetic
force) on Ni, 0 on O.

``dp_test.json``: for the parity checkpoints ``spin_native`` and ``spin_deepspin``, the report
lines of ``dp --pt test -m model.pt -s NiO -d detail`` (label, value, unit) and the shapes of
its detail files; ``dp_test.npz``: the ``CASE/fr`` and ``CASE/fm`` detail tables.

usage (DeePMD-kit 3.2.0 environment, from the repository root):
  python tests/data/spin/make_spin_system.py [DATA_1]
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PARITY = os.path.join(HERE, "..", "parity")
SCALE = 0.314
NREAL, NMAG, NFRAMES = 32, 16, 3  # atoms 0..15 Ni, 16..31 O, 32..47 the Ni virtual atoms


def convert(src: str, dst: str) -> None:
    sd = os.path.join(dst, "set.000")
    os.makedirs(sd, exist_ok=True)
    load = lambda name: np.load(os.path.join(src, "set.000", name))[:NFRAMES]  # noqa: E731
    c, f = load("coord.npy").reshape(NFRAMES, -1, 3), load("force.npy").reshape(NFRAMES, -1, 3)
    spin = np.zeros((NFRAMES, NREAL, 3))
    spin[:, :NMAG] = (c[:, NREAL:] - c[:, :NMAG]) / SCALE
    fmag = np.zeros((NFRAMES, NREAL, 3))
    fmag[:, :NMAG] = f[:, NREAL:]
    arrays = {"coord": c[:, :NREAL], "force": f[:, :NREAL], "spin": spin, "force_mag": fmag}
    for name, value in arrays.items():
        np.save(os.path.join(sd, f"{name}.npy"), value.reshape(NFRAMES, -1))
    np.save(os.path.join(sd, "energy.npy"), load("energy.npy"))
    np.save(os.path.join(sd, "box.npy"), load("box.npy"))
    types = np.loadtxt(os.path.join(src, "type.raw"), dtype=int)[:NREAL]
    open(os.path.join(dst, "type.raw"), "w").write("\n".join(map(str, types)) + "\n")
    open(os.path.join(dst, "type_map.raw"), "w").write("Ni\nO\n")


LINE = re.compile(r"DEEPMD INFO\s+(\S.*?)\s*:\s*([-+0-9.e]+)\s*(\S*)\s*$")


def dp_test(case: str, system: str, work: str) -> tuple[list, dict]:
    detail = os.path.join(work, case)
    out = subprocess.run(
        [
            "dp",
            "--pt",
            "test",
            "-m",
            os.path.join(PARITY, case, "model.pt"),
            "-s",
            system,
            "-d",
            detail,
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stderr
    body = out.split("weighted average of errors")[0]  # the per-system report
    lines = [[m[1], float(m[2]), m[3]] for m in map(LINE.search, body.splitlines()) if m]
    tables = {k: np.loadtxt(f"{detail}.{k}.out", ndmin=2) for k in ("e", "fr", "fm")}
    return lines, tables


def main() -> None:
    src = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/spin/data_1"
    system = os.path.join(HERE, "NiO")
    convert(src, system)
    work = tempfile.mkdtemp(prefix="spin_dp_test_")
    report, arrays = {}, {}
    for case in ("spin_native", "spin_deepspin"):
        lines, tables = dp_test(case, system, work)
        report[case] = {"lines": lines, "shapes": {k: list(v.shape) for k, v in tables.items()}}
        arrays.update({f"{case}/{k}": v for k, v in tables.items() if k != "e"})
    meta = {"upstream": "deepmd-kit 3.2.0", "command": "dp --pt test -m MODEL -s NiO -d DETAIL"}
    json.dump({**meta, **report}, open(os.path.join(HERE, "dp_test.json"), "w"), indent=1)
    np.savez(os.path.join(HERE, "dp_test.npz"), **arrays)
    print("wrote", system, "and dp_test.{json,npz}")


if __name__ == "__main__":
    main()
