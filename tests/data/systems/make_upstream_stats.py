"""Print DeePMD-kit's data statistics for the test systems (reference numbers of test_data.py).

Run from the repository root with the Python of a DeePMD-kit 3.2 environment:

    /path/to/deepmd-venv/bin/python tests/data/systems/make_upstream_stats.py

For every case it normalizes a small DPA4 input, resolves ``sel`` from the training systems
as ``dp --pt train`` does, builds the trainer (which samples ``data_stat_nbatch`` batches per
system and computes the output and fitting-input statistics) and prints ``sel``,
``min_nbor_dist``, ``out_bias``, ``out_std`` and the fparam/aparam statistics. The batch
sizes are chosen so that the sampled batches cover every frame, which makes the numbers
independent of the loader's shuffling. The ``water`` case also writes ``upstream_stat.h5``
next to this script, the statistics cache that test_data.py reads.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from deepmd.pt.entrypoints.main import get_trainer
from deepmd.pt.model.model import BaseModel
from deepmd.utils.argcheck import normalize
from deepmd.utils.compat import update_deepmd_input
from deepmd.utils.data_system import get_data

HERE = Path(__file__).resolve().parent

DESCRIPTOR = {
    "channels": 8,
    "n_radial": 4,
    "lmax": 1,
    "mmax": 1,
    "n_blocks": 1,
    "use_amp": False,
    "precision": "float64",
    "seed": 1,
}
BASE = {
    "model": {"type": "dpa4", "fitting_net": {"neuron": [0], "seed": 1}},
    "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 10},
    "loss": {"type": "ener"},
    "training": {"numb_steps": 1, "seed": 1, "disp_file": "lcurve.out"},
}


def system_paths(*names: str) -> list[str]:
    return [str(HERE / n) for n in names]


def case(model: dict, training_data: dict, **extra) -> dict:
    config = copy.deepcopy(BASE)
    config["model"].update(copy.deepcopy(model))
    config["training"]["training_data"] = training_data
    for key, value in extra.items():
        config[key] = value
    return config


CASES = {
    "water": case(
        {"type_map": ["O", "H"], "descriptor": {**DESCRIPTOR, "rcut": 6.0, "sel": "auto"}},
        {"systems": system_paths("water/data_0", "water/data_1"), "batch_size": 1},
    ),
    "nopbc": case(
        {
            "type_map": ["H", "C", "O"],
            "descriptor": {**DESCRIPTOR, "rcut": 4.0, "sel": "auto:1.5"},
            "fitting_net": {
                "neuron": [0],
                "seed": 1,
                "precision": "float64",
                "numb_fparam": 2,
                "numb_aparam": 1,
            },
        },
        {"systems": system_paths("nopbc"), "batch_size": "auto"},
    ),
    "nopbc_preset": case(
        {
            "type_map": ["H", "C", "O", "N"],
            "descriptor": {**DESCRIPTOR, "rcut": 4.0, "sel": 20},
            "preset_out_bias": {"energy": [None, -1000.0, None, None]},
            "data_stat_nbatch": 1,
        },
        {"systems": system_paths("nopbc"), "batch_size": 8},
    ),
    "property_intensive": case(
        {
            "type_map": ["H", "C", "N", "O"],
            "descriptor": {**DESCRIPTOR, "rcut": 4.0, "sel": 30},
            "fitting_net": {
                "type": "property",
                "property_name": "band_prop",
                "task_dim": 3,
                "intensive": True,
                "distinguish_types": False,
                "neuron": [0],
                "seed": 1,
            },
        },
        {"systems": system_paths("property/data_0", "property/data_1"), "batch_size": 4},
        loss={"type": "property"},
    ),
    "property_extensive": case(
        {
            "type_map": ["H", "C", "N", "O"],
            "descriptor": {**DESCRIPTOR, "rcut": 4.0, "sel": 30},
            "fitting_net": {
                "type": "property",
                "property_name": "band_prop",
                "task_dim": 3,
                "intensive": False,
                "neuron": [0],
                "seed": 1,
            },
        },
        {"systems": system_paths("property/data_0", "property/data_1"), "batch_size": 4},
        loss={"type": "property"},
    ),
}


def run(name: str, config: dict, stat_file: str | None) -> dict:
    config = copy.deepcopy(config)
    if stat_file is not None:
        config["training"]["stat_file"] = stat_file
    config = normalize(update_deepmd_input(config, warning=False))
    type_map = config["model"]["type_map"]
    train_data = get_data(config["training"]["training_data"], 0, type_map, None)
    config["model"], min_nbor_dist = BaseModel.update_sel(train_data, type_map, config["model"])
    trainer = get_trainer(config)
    atomic = trainer.model.atomic_model
    fitting = atomic.fitting_net
    out = {
        "sel": config["model"]["descriptor"]["sel"],
        "min_nbor_dist": float(min_nbor_dist),
        "out_bias": atomic.out_bias.detach().cpu().numpy().tolist(),
        "out_std": atomic.out_std.detach().cpu().numpy().tolist(),
    }
    for key in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std"):
        value = getattr(fitting, key, None)
        if value is not None:
            out[key] = value.detach().cpu().numpy().tolist()
    return out


def main() -> None:
    np.set_printoptions(precision=17)
    results = {}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            for name, config in CASES.items():
                stat_file = str(Path(tmp) / "water_stat.h5") if name == "water" else None
                results[name] = run(name, config, stat_file)
            shutil.copy(Path(tmp) / "water_stat.h5", HERE / "upstream_stat.h5")
        finally:
            os.chdir(cwd)
    for name, values in results.items():
        print(f"{name}:")
        for key, value in values.items():
            print(f"  {key}: {json.dumps(value)}")


if __name__ == "__main__":
    main()
