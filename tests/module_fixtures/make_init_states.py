"""Upstream's initial weights for the model sections of the parity inputs (and the shared example
recipes), so that sezm can be checked to build exactly the same starting model.

Run with the oracle venv (DeePMD-kit 3.2): ``/tmp/oracle/bin/python <this file>``. Writes
``tests/data/init/init_states.npz``: per case ``<case>/config`` (the model section, JSON, with
``seed`` 7 in the descriptor and fitting), ``<case>/dens`` (the model carries the dens heads), ``<case>/keys`` (JSON: the floating-point state
tensors in DeePMD-kit's key names with their shapes) and ``<case>/digest`` ``(n_keys, 34)``
float64, per tensor a digest that no other draw of random numbers can meet: the first 16
values, 16 values spread over the tensor (NaN-padded for small tensors), the sum and the sum
of squares.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from deepmd.pt.model.model import get_model
from deepmd.utils.argcheck import model_args

TESTS = Path(__file__).resolve().parents[1]
OUT = TESTS / "data" / "init" / "init_states.npz"
SHARED = TESTS.parents[1] / "shared" / "upstream-examples" / "water" / "dpa4"
SEED = 7
# LoRA adapters draw from the global RNG (no seed), as in DeePMD-kit: not reproducible by seed.
SKIP = {"lora"}


def cases() -> dict[str, tuple[dict, bool]]:
    """``name -> (model section, dens)``; ``dens``: the model carries the dens heads."""
    inputs = {p.stem: p for p in sorted((TESTS / "data" / "parity_inputs").glob("*.json"))}
    for name in ("tiny", "mini", "zbl", "property"):
        inputs[name] = TESTS / "data" / "parity" / name / "input.json"
    inputs["lmp_recipe"] = SHARED / "lmp" / "input.json"
    inputs["water_recipe"] = SHARED / "input.json"
    out = {}
    for name, path in inputs.items():
        if name not in SKIP:
            config = json.loads(path.read_text())
            out[name] = (config["model"], config.get("loss", {}).get("type") == "dens")
    return out


def normalize(model: dict) -> dict:
    model = copy.deepcopy(model)
    model["descriptor"]["seed"] = SEED
    model.setdefault("fitting_net", {})["seed"] = SEED
    arg = model_args()
    return arg.normalize_value(model, trim_pattern="_*")


def digest(t: torch.Tensor) -> np.ndarray:
    """``(34,)``: head 16, strided 16 (NaN-padded), sum, sum of squares."""
    flat = t.detach().reshape(-1).double()
    out = np.full(34, np.nan)
    head = flat[:16].numpy()
    spread = flat[:: max(1, flat.numel() // 16)][:16].numpy()
    out[: head.size], out[16 : 16 + spread.size] = head, spread
    out[32], out[33] = flat.sum().item(), flat.square().sum().item()
    return out


def main() -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, (raw, dens) in cases().items():
        params = normalize(raw)
        torch.manual_seed(0)
        model = get_model(copy.deepcopy(params))
        if dens:
            model.atomic_model.get_dens_fitting_net()
        arrays[f"{name}/config"] = np.array(json.dumps(params))
        arrays[f"{name}/dens"] = np.array(dens)
        keys, rows = [], []
        for key, value in model.state_dict().items():
            if torch.is_tensor(value) and value.dtype.is_floating_point and value.numel():
                keys.append([key, list(value.shape)])
                rows.append(digest(value))
        arrays[f"{name}/keys"] = np.array(json.dumps(keys))
        arrays[f"{name}/digest"] = np.stack(rows)
        print(f"{name}: {len(keys)} tensors")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} kB)")


if __name__ == "__main__":
    main()
