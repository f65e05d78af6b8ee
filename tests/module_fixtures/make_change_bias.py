"""Fixture: DeePMD-kit 3.2's ``dp --pt change-bias`` on the ``tiny`` parity checkpoint.

Run from the repository root with the Python of a DeePMD-kit 3.2 environment:

    /tmp/oracle/bin/python tests/module_fixtures/make_change_bias.py

Two small systems are made from frames of ``tests/data/systems/water``: ``full`` (frames 0-2 of
``data_0``, 64 O + 128 H) and ``cut`` (frames 0-2 of ``data_1`` without the last 2 O and the
last 8 H atoms, energies scaled by 182/192), so that the two compositions make the per-type
least squares well posed. ``dp --pt change-bias`` then runs on
``tests/data/parity/tiny/model.pt`` with ``-n 0`` (every frame, so the loader's shuffling does
not matter) in mode ``change``, mode ``set`` and with ``-b``. DeePMD-kit 3.2 refuses ``-b`` for
DPA4 models (it asserts ``model_type == "ener"``, and its DPA4 model says ``"SeZM"``), so the
``-b`` run calls the same ``change_bias`` entry point in this process with the class attribute
``model_type`` set to ``"ener"`` for the call; nothing else on that path reads it. The frames
and the resulting
``out_bias``/``out_std`` of each run go to ``tests/data/modules/change_bias.npz``:

    <system>/coord (nf, nat*3), <system>/box (nf, 9), <system>/energy (nf,), <system>/type (nat,)
    type_map (ntypes,) str; bias_value (ntypes,) the -b values
    <run>/out_bias (1, ntypes, 1), <run>/out_std (1, ntypes, 1)   run: change | set | user
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
WATER = ROOT / "tests" / "data" / "systems" / "water"
MODEL = ROOT / "tests" / "data" / "parity" / "tiny" / "model.pt"
OUT = ROOT / "tests" / "data" / "modules" / "change_bias.npz"
TYPE_MAP = ["O", "H"]
BIAS_VALUE = [-93.25, -187.5]


def _frames(name: str, frames: list[int]) -> dict[str, np.ndarray]:
    base = WATER / name
    sets = base / "set.000"
    return {
        "coord": np.load(sets / "coord.npy")[frames],
        "box": np.load(sets / "box.npy")[frames],
        "energy": np.load(sets / "energy.npy")[frames],
        "type": np.loadtxt(base / "type.raw", dtype=np.int64),
    }


def systems() -> dict[str, dict[str, np.ndarray]]:
    full = _frames("data_0", [0, 1, 2])
    cut = _frames("data_1", [0, 1, 2])
    atype = cut["type"]
    oxygen, hydrogen = np.flatnonzero(atype == 0), np.flatnonzero(atype == 1)
    keep = np.sort(np.concatenate([oxygen[:-2], hydrogen[:-8]]))
    coord = cut["coord"].reshape(len(cut["coord"]), -1, 3)[:, keep].reshape(len(cut["coord"]), -1)
    cut = {
        "coord": coord,
        "box": cut["box"],
        "energy": cut["energy"] * len(keep) / len(atype),
        "type": atype[keep],
    }
    return {"full": full, "cut": cut}


def write_system(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """A DeePMD-kit npy system: ``type.raw``, ``type_map.raw`` and ``set.000``."""
    (folder / "set.000").mkdir(parents=True)
    np.savetxt(folder / "type.raw", arrays["type"], fmt="%d")
    (folder / "type_map.raw").write_text("\n".join(TYPE_MAP) + "\n")
    for key in ("coord", "box", "energy"):
        np.save(folder / "set.000" / f"{key}.npy", arrays[key])


def change_bias(work: Path, data: Path, name: str, *options: str) -> dict[str, np.ndarray]:
    """``dp --pt change-bias`` with ``options`` (mode or bias values); its new statistics."""
    out = work / f"{name}.pt"
    if "-b" in options:
        _user_bias(out, [float(v) for v in options[1:]])
    else:
        dp = Path(sys.executable).parent / "dp"
        cmd = [str(dp), "--pt", "change-bias", str(MODEL), "-o", str(out), *options]
        subprocess.run([*cmd, "-s", str(data), "-n", "0"], check=True, cwd=work)
    state = torch.load(out, map_location="cpu", weights_only=True)["model"]
    prefix = "model.Default.atomic_model."
    return {
        "out_bias": state[prefix + "out_bias"].numpy(),
        "out_std": state[prefix + "out_std"].numpy(),
    }


def _user_bias(out: Path, values: list[float]) -> None:
    """DeePMD-kit's ``-b`` path, past its energy-model assertion (see the module doc)."""
    from deepmd.pt.entrypoints.main import change_bias as upstream
    from deepmd.pt.model.model.sezm_model import SeZMModel

    saved = SeZMModel.model_type
    SeZMModel.model_type = "ener"
    try:
        upstream(input_file=str(MODEL), bias_value=values, output=str(out))
    finally:
        SeZMModel.model_type = saved


def main() -> None:
    arrays = systems()
    result: dict[str, np.ndarray] = {
        "type_map": np.array(TYPE_MAP),
        "bias_value": np.array(BIAS_VALUE),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, system in arrays.items():
            write_system(work / "data" / name, system)
            result.update({f"{name}/{k}": v for k, v in system.items()})
        runs = {
            "change": ("-m", "change"),
            "set": ("-m", "set"),
            "user": ("-b", *map(str, BIAS_VALUE)),
        }
        for run, options in runs.items():
            for key, value in change_bias(work, work / "data", run, *options).items():
                result[f"{run}/{key}"] = value
    np.savez(OUT, **result)
    for key in sorted(k for k in result if k.endswith(("out_bias", "out_std"))):
        print(key, result[key].reshape(-1).tolist())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
