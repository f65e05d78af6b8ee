"""Fixture: a checkpoint written by `sezm train`, with DeePMD-kit 3.2's outputs on it.

Step 1 (project venv): train a small model for a few steps with sezm, perturb its weights so no
branch is at its zero initialisation, and save it in sezm's (DeePMD-kit-layout) checkpoint.
Step 2 (oracle venv, deepmd-kit 3.2): evaluate it with upstream `DeepPot` on the parity frames.

    .venv/bin/python tests/module_fixtures/make_sezm_written.py train OUT_DIR
    /tmp/oracle/bin/python tests/module_fixtures/make_sezm_written.py evaluate OUT_DIR
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SHARED_TOOLS = os.path.join(ROOT, "..", "shared", "tools")


def train(out_dir: str) -> None:
    import torch

    config = json.load(open(os.path.join(ROOT, "tests", "data", "parity", "tiny", "input.json")))
    config["model"]["descriptor"].update(
        channels=8, n_radial=4, lmax=2, radial_so2_mode="degree_channel"
    )
    water = os.path.join(ROOT, "tests", "data", "systems", "water")
    tr = config["training"]
    tr["training_data"]["systems"] = [os.path.join(water, "data_0")]
    tr["validation_data"]["systems"] = [os.path.join(water, "data_1")]
    tr.update(numb_steps=3, save_freq=3, disp_freq=1, seed=3)
    work = tempfile.mkdtemp()
    json.dump(config, open(os.path.join(work, "input.json"), "w"))
    subprocess.run([sys.executable, "-m", "sezm", "train", "input.json"], cwd=work, check=True)
    from sezm.model.build import load_model
    from sezm.train.checkpoint import model_state

    model, ckpt = load_model(os.path.join(work, "model.ckpt.pt"))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():  # parameters only: buffers are constants of the format
            scale = 0.3 * max(float(p.abs().mean()), 0.3)
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    state = model_state(model, ckpt.model_params, ckpt.train_infos["lr"], ckpt.train_infos["step"])
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"model": state}, os.path.join(out_dir, "model.pt"))
    Path(out_dir, "input.json").write_text(json.dumps(config, indent=1))


def evaluate(out_dir: str) -> None:
    sys.path.insert(0, SHARED_TOOLS)
    from make_parity_fixtures import evaluate as upstream_eval
    from make_parity_fixtures import water_frames

    res = upstream_eval(os.path.join(out_dir, "model.pt"), water_frames(), False)
    np.savez(os.path.join(out_dir, "expected.npz"), **res)
    meta = {
        "case": "sezm_written",
        "writer": "sezm train",
        "evaluated_by": "deepmd-kit 3.2.0",
        "frames": [f[0] for f in water_frames()],
    }
    Path(out_dir, "meta.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    {"train": train, "evaluate": evaluate}[sys.argv[1]](sys.argv[2])
