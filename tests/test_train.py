"""`sezm train`: a short run, exact restart, atomic checkpoints, DeePMD-kit checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sezm
from sezm.cli import main
from sezm.train import checkpoint as ckpt_mod

DATA = Path(__file__).parent / "data"
WATER = DATA / "systems" / "water"


def write_input(tmp_path: Path, steps: int = 4, **training) -> Path:
    config = json.loads((DATA / "parity" / "tiny" / "input.json").read_text())
    config["model"]["descriptor"].update(channels=8, n_radial=4)
    tr = config["training"]
    tr["training_data"]["systems"] = [str(WATER / "data_0")]
    tr["validation_data"]["systems"] = [str(WATER / "data_1")]
    tr.update(numb_steps=steps, disp_freq=1, save_freq=2, max_ckpt_keep=5, seed=1, **training)
    path = tmp_path / "input.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def curve_rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def test_train_writes_curve_and_checkpoints(run_dir) -> None:
    main(["train", str(write_input(run_dir)), "--skip-neighbor-stat"])
    rows = curve_rows(run_dir / "lcurve.out")
    assert [int(r.split()[0]) for r in rows] == [1, 2, 3, 4]
    assert (run_dir / "model.ckpt.pt").resolve().name == "model.ckpt-4.pt"
    assert json.loads((run_dir / "out.json").read_text())["model"]["descriptor"]["channels"] == 8
    raw = torch.load(run_dir / "model.ckpt.pt", weights_only=True)
    assert raw["model"]["_extra_state"]["train_infos"]["step"] == 3
    assert (
        "model.Default.atomic_model.descriptor.type_embedding.adam_type_embedding" in raw["model"]
    )
    # the checkpoint evaluates, and its energy bias came from the data
    dp = sezm.DeepPot(run_dir / "model.ckpt.pt")
    coord = np.load(WATER / "data_0" / "set.000" / "coord.npy")[:1]
    box = np.load(WATER / "data_0" / "set.000" / "box.npy")[:1]
    atype = np.loadtxt(WATER / "data_0" / "type.raw", dtype=int)
    e, _f, _v = dp.eval(coord, box, atype)
    e_ref = np.load(WATER / "data_0" / "set.000" / "energy.npy")[0]
    assert abs(e.item() - e_ref) / len(atype) < 1.0  # without the bias it would be ~150 eV/atom


def test_restart_continues_exactly(run_dir) -> None:
    inp = write_input(run_dir, steps=4)
    main(["train", str(inp), "--skip-neighbor-stat"])
    full = curve_rows(run_dir / "lcurve.out")
    (run_dir / "model.ckpt-4.pt").unlink()
    main(["train", str(inp), "--skip-neighbor-stat", "--restart", "model.ckpt-2.pt"])
    assert curve_rows(run_dir / "lcurve.out") == full


def test_interrupted_save_keeps_previous_checkpoint(run_dir, monkeypatch) -> None:
    main(["train", str(write_input(run_dir, steps=2)), "--skip-neighbor-stat"])
    before = (run_dir / "model.ckpt-2.pt").read_bytes()

    def crash(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.atomic_save({"x": 1}, run_dir / "model.ckpt-2.pt")
    assert (run_dir / "model.ckpt-2.pt").read_bytes() == before
    assert not list(run_dir.glob(".*.tmp"))


def test_unknown_key_names_the_file_and_suggestion(run_dir) -> None:
    inp = write_input(run_dir)
    config = json.loads(inp.read_text())
    config["model"]["descriptor"]["chanels"] = 8
    inp.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"chanels.*did you mean.*channels"):
        main(["train", str(inp)])
