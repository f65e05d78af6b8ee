"""A tiny training setup shared by the fault and bad-input tests: an input.json of a small DPA4
water model (8 channels, lmax 1, one block) on the test systems, written into a folder."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
WATER = DATA / "systems" / "water"


def tiny_config(steps: int = 4, **training) -> dict:
    """The input of a few-step run: ``disp_freq`` 1, ``save_freq`` 2, seed 1."""
    config = json.loads((DATA / "parity" / "tiny" / "input.json").read_text())
    config["model"]["descriptor"].update(channels=8, n_radial=4)
    tr = config["training"]
    tr["training_data"]["systems"] = [str(WATER / "data_0")]
    tr["validation_data"]["systems"] = [str(WATER / "data_1")]
    tr.update(numb_steps=steps, disp_freq=1, save_freq=2, max_ckpt_keep=5, seed=1)
    tr.update(training)
    return config


def write_input(folder: Path, steps: int = 4, config: dict | None = None, **training) -> Path:
    """``folder/input.json`` of :func:`tiny_config` (or ``config``); its path."""
    path = Path(folder) / "input.json"
    path.write_text(json.dumps(config or tiny_config(steps, **training)))
    return path


def curve_rows(path: Path) -> list[str]:
    """The data rows of a learning-curve file."""
    return [line for line in Path(path).read_text().splitlines() if not line.startswith("#")]
