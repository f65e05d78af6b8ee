"""Reference output of ``dp --pt model-devi`` for ``tests/infer/test_model_devi.py``.

Run from anywhere with the DeePMD-kit venv:
``/tmp/oracle/bin/python tests/module_fixtures/make_model_devi.py``.

The committee is the ``tiny`` parity checkpoint (``tests/data/parity/tiny/model.pt``) and two
copies of it whose trainable parameters get Gaussian noise
(``p += REL * max(mean|p|, 0.1) * N(0,1)``, seeds 1 and 2; buffers, such as the energy bias and
the constant tables, stay as they are), so that the models disagree by about as much as the
forces they predict. The ``fparam`` case pairs the ``fparam1`` parity checkpoint (one frame
parameter, one atomic parameter used as a mask) with a perturbed copy (seed 3).

Output, in ``tests/data/model_devi/`` (about 0.6 MB):

* ``model_1.pt``, ``model_2.pt``, ``fparam_1.pt``: the perturbed checkpoints;
* ``nopbc/``: the first two frames of ``systems/water/data_0`` without periodic boundaries;
* ``sets/``: the first three frames of ``systems/water/data_0``, one frame per set: DeePMD-kit
  3.2 evaluates a system set by set, and its ``--relative_v`` only works on one-frame sets (the
  per-frame virial magnitude ``(nf,)`` is broadcast against the ``(nf, 9)`` deviations, which
  fails for other frame counts, and for nine frames divides by the wrong magnitudes);
* ``fparam/``: the first two frames of ``systems/water/data_0`` with ``fparam.npy`` and an
  ``aparam.npy`` mask (0 on three atoms);
* ``<case>.out``: ``dp --pt model-devi`` output of each case in ``CASES``, run with the working
  directory ``tests/data`` and the system paths as listed (so the ``# <system>`` header lines
  hold those relative paths). ``directory`` holds one block per system of ``systems/water``,
  in the order DeePMD-kit found them (file-system order).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from deepmd.pt.model.model import get_model

DATA = Path(__file__).resolve().parents[1] / "data"
OUT = DATA / "model_devi"
WATER = DATA / "systems" / "water" / "data_0"
REL = 0.05
MODELS = ["parity/tiny/model.pt", "model_devi/model_1.pt", "model_devi/model_2.pt"]
FPARAM_MODELS = ["parity/fparam1/model.pt", "model_devi/fparam_1.pt"]
CASES = {
    "plain": ["-s", "systems/water/data_1", "-f", "10"],
    "relative": ["-s", "systems/water/data_1", "--relative", "0.05"],
    "relative_v": ["-s", "model_devi/sets", "--relative", "0.1", "--relative_v", "0.2"],
    "atomic": ["-s", "systems/water/data_0", "--atomic", "-f", "3"],
    "nopbc": ["-s", "model_devi/nopbc", "--relative", "0.05"],
    "two_models": ["-s", "systems/water/data_0", "-m", *MODELS[:2]],
    "directory": ["-s", "systems/water", "-f", "2"],
    "fparam": ["-s", "model_devi/fparam", "-m", *FPARAM_MODELS],
}


def perturb(base: str, seed: int, path: Path) -> None:
    ckpt = torch.load(DATA / base, map_location="cpu", weights_only=False)
    state = ckpt["model"]
    params = copy.deepcopy(state["_extra_state"]["model_params"])
    trainable = {f"model.Default.{name}" for name, _ in get_model(params).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    for key in sorted(trainable):
        value = state[key]
        if value.numel():
            scale = REL * max(float(value.abs().mean()), 0.1)
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float64)
            state[key] = (value.double() + scale * noise).to(value.dtype)
    torch.save(ckpt, path)


def new_system(name: str, frames: list[list[int]], nopbc: bool = False) -> Path:
    """A copy of frames of ``WATER``: one set per entry of ``frames``."""
    dst = OUT / name
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    for raw in ("type.raw", "type_map.raw"):
        shutil.copy(WATER / raw, dst / raw)
    if nopbc:
        (dst / "nopbc").touch()
    for k, rows in enumerate(frames):
        out = dst / f"set.{k:03d}"
        out.mkdir()
        for key in ("coord",) if nopbc else ("coord", "box"):
            np.save(out / f"{key}.npy", np.load(WATER / "set.000" / f"{key}.npy")[rows])
    return dst


def make_systems() -> None:
    new_system("nopbc", [[0, 1]], nopbc=True)
    new_system("sets", [[0], [1], [2]])
    fparam = new_system("fparam", [[0, 1]]) / "set.000"
    nat = np.load(fparam / "coord.npy").shape[1] // 3
    np.save(fparam / "fparam.npy", np.array([[0.3], [-0.7]]))
    mask = np.ones((2, nat))
    mask[:, [1, 50, 100]] = 0.0
    np.save(fparam / "aparam.npy", mask)


def model_devi(name: str, args: list[str]) -> None:
    out = OUT / f"{name}.out"
    out.unlink(missing_ok=True)  # dp model-devi appends to an existing file
    models = [] if "-m" in args else ["-m", *MODELS]
    dp = Path(sys.executable).with_name("dp")
    cmd = [str(dp), "--pt", "model-devi", *models, *args, "-o", str(out.relative_to(DATA))]
    print(" ".join(cmd))
    subprocess.run(cmd, cwd=DATA, check=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    perturb(MODELS[0], 1, DATA / MODELS[1])
    perturb(MODELS[0], 2, DATA / MODELS[2])
    perturb(FPARAM_MODELS[0], 3, DATA / FPARAM_MODELS[1])
    make_systems()
    for name, args in CASES.items():
        model_devi(name, args)


if __name__ == "__main__":
    main()
