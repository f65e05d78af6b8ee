"""The float64 deepspin checkpoint of ``tests/infer/test_freeze_spin.py``, trained 2 steps on NiO.

Run with sezm's environment: ``python tests/module_fixtures/make_freeze_spin.py``. Writes
``tests/data/freeze_spin/nio_deepspin.pt`` (and its ``input.json``). ``sel`` 16 is below the
32 real neighbours a NiO atom has within 4.5 Å, so the deepspin neighbour cap is exercised.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from sezm.cli import main

TESTS = Path(__file__).resolve().parents[1]
OUT = TESTS / "data" / "freeze_spin"

MODEL = {
    "type": "dpa4",
    "type_map": ["Ni", "O"],
    "descriptor": {
        "channels": 8,
        "n_radial": 4,
        "lmax": 1,
        "mmax": 1,
        "n_blocks": 1,
        "n_atten_head": 1,
        "precision": "float64",
        "seed": 7,
        "rcut": 4.5,
        "sel": 16,
    },
    "fitting_net": {"neuron": [8], "precision": "float64", "seed": 7},
    "spin": {"use_spin": [True, False], "virtual_scale": [0.314], "scheme": "deepspin"},
}


def config(system: str) -> dict:
    return {
        "model": MODEL,
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4, "decay_steps": 1},
        "loss": {
            "type": "ener_spin",
            "start_pref_e": 1,
            "limit_pref_e": 1,
            "start_pref_fr": 10,
            "limit_pref_fr": 10,
            "start_pref_fm": 10,
            "limit_pref_fm": 10,
        },
        "optimizer": {"type": "Adam"},
        "training": {
            "training_data": {"systems": [system], "batch_size": 1},
            "numb_steps": 2,
            "disp_freq": 1,
            "save_freq": 2,
            "seed": 1,
        },
    }


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    system = str(TESTS / "data" / "spin" / "NiO")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        Path("input.json").write_text(json.dumps(config(system), indent=1))
        main(["train", "input.json", "--skip-neighbor-stat"])
        checkpoint = torch.load("model.ckpt.pt", weights_only=False)
        checkpoint.pop("optimizer")  # inference only: keep the fixture small
        torch.save(checkpoint, OUT / "nio_deepspin.pt")
        cfg = config("../spin/NiO")
        (OUT / "input.json").write_text(json.dumps(cfg, indent=1) + "\n")
