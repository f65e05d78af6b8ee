"""DeePMD-kit's own Python ``DeepPot`` on sezm's frozen spin packages (``.pt2``).

Run with the oracle venv (DeePMD-kit 3.2):
``/tmp/oracle/bin/python tests/module_fixtures/deepmd_eval_spin_pt2.py OUT.npz NAME=MODEL.pt2 ...``.
For each package ``NAME`` and each frame of ``tests/data/spin/NiO`` (periodic ``pbc_<i>``, and
frame 0 without a cell, ``nopbc``) it stores ``NAME/FRAME/<key>`` for ``energy (1, 1)``,
``force``, ``virial``, ``atom_energy``, ``atom_virial``, ``force_mag``, ``mask_mag`` (what
``DeepPot.eval(..., atomic=True, spin=...)`` returns). ``tests/infer/test_freeze_spin.py`` runs it
when the oracle exists; its output for the fixture checkpoints is committed as
``tests/data/freeze_spin/deepmd_pt2.npz``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

NIO = Path(__file__).resolve().parents[1] / "data" / "spin" / "NiO"
KEYS = ("energy", "force", "virial", "atom_energy", "atom_virial", "force_mag", "mask_mag")


def nio_frames():
    """``(name, coord (1, nat*3), cell (1, 9) | None, atype (nat,), spin (1, nat*3))``."""
    atype = np.loadtxt(NIO / "type.raw", dtype=int)
    data = {k: np.load(NIO / "set.000" / f"{k}.npy") for k in ("coord", "box", "spin")}
    for i in range(len(data["coord"])):
        yield (
            f"pbc_{i}",
            data["coord"][i : i + 1],
            data["box"][i : i + 1],
            atype,
            data["spin"][i : i + 1],
        )
    yield "nopbc", data["coord"][:1], None, atype, data["spin"][:1]


def main(out: str, packages: list[str]) -> None:
    from deepmd.infer import DeepPot  # here: the tests import nio_frames without DeePMD-kit

    result = {}
    for item in packages:
        name, path = item.split("=", 1)
        dp = DeepPot(path)
        assert dp.deep_eval.get_has_spin(), f"{path}: DeePMD-kit does not see a spin model"
        for frame, coord, cell, atype, spin in nio_frames():
            values = dp.eval(coord, cell, atype, atomic=True, spin=spin)
            for key, value in zip(KEYS, values):
                result[f"{name}/{frame}/{key}"] = np.asarray(value)
    np.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
