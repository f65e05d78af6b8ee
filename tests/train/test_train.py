"""`sezm train`: a short run, exact restart, atomic checkpoints, DeePMD-kit checkpoint layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import sezm
from sezm.cli import main
from sezm.config import ConfigError
from sezm.data import DataError
from sezm.train import checkpoint as ckpt_mod
from sezm.train import progress

DATA = Path(__file__).parents[1] / "data"
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


def test_restart_continues_exactly(run_dir, caplog) -> None:
    inp = write_input(run_dir, steps=4)
    main(["train", str(inp), "--skip-neighbor-stat"])
    full = curve_rows(run_dir / "lcurve.out")
    (run_dir / "model.ckpt-4.pt").unlink()
    with caplog.at_level(logging.INFO, logger="sezm"):
        main(["train", str(inp), "--skip-neighbor-stat", "--restart", "model.ckpt-2.pt"])
    assert curve_rows(run_dir / "lcurve.out") == full
    # the mean step time is over the two steps this run made, not zero
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finished")]
    assert "ran steps 3-4" in line and "over these 2 steps" in line
    assert float(line.split("mean step time ")[1].split(" s")[0]) > 0


def test_step_timer_counts_the_steps_of_this_run(monkeypatch) -> None:
    clock = iter([100.0, 130.0, 150.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    timer = progress.StepTimer(start_step=2000, num_steps=2500)  # restarted at step 2000
    timer.lap(2001)  # the displays are at step 1 and every 1000 steps: one lap here
    assert timer.steps_run(2500) == 500
    assert timer.mean_step_time(2500) == pytest.approx(50.0 / 500)


MINIMAL_MODEL = {"type": "dpa4", "type_map": ["O", "H"], "descriptor": {"rcut": 6.0}}


def test_documented_minimal_model_trains(run_dir) -> None:
    """The spec's minimal model (type, type_map, rcut) trains; every other option takes its
    DeePMD-kit default, and what DeePMD-kit has no default for is named, not a KeyError."""
    config = {
        "model": MINIMAL_MODEL,
        "training": {"training_data": {"systems": [str(WATER / "data_0")]}},
    }
    path = run_dir / "input.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"`learning_rate/start_lr`: required key is missing"):
        main(["train", str(path), "--numb-steps", "2"])
    config["learning_rate"] = {"start_lr": 1e-3}
    path.write_text(json.dumps(config))
    main(["train", str(path), "--numb-steps", "2"])
    assert [int(r.split()[0]) for r in curve_rows(run_dir / "lcurve.out")] == [1]
    assert (run_dir / "model.ckpt.pt").resolve().name == "model.ckpt-2.pt"
    out = json.loads((run_dir / "out.json").read_text())
    assert out["training"]["numb_steps"] == 2 and out["loss"]["type"] == "ener"
    assert out["model"]["descriptor"]["sel"] == 256 and out["optimizer"]["type"] == "Adam"


def test_out_json_records_the_resolved_sel(run_dir) -> None:
    inp = write_input(run_dir, steps=1)
    config = json.loads(inp.read_text())
    config["model"]["descriptor"]["sel"] = "auto"
    inp.write_text(json.dumps(config))
    main(["train", str(inp)])
    out = json.loads((run_dir / "out.json").read_text())
    assert out["model"]["descriptor"]["sel"] == 112  # what `dp --pt train` writes for data_0


def test_numb_epoch_sets_the_run_length(run_dir) -> None:
    inp = write_input(run_dir, steps=1)
    config = json.loads(inp.read_text())
    del config["training"]["numb_steps"]
    config["training"]["numb_epoch"] = 1.5  # data_0: 4 frames, batch_size 1 -> 4 batches
    inp.write_text(json.dumps(config))
    main(["train", str(inp), "--skip-neighbor-stat"])
    assert [int(r.split()[0]) for r in curve_rows(run_dir / "lcurve.out")] == [1, 2, 3, 4, 5, 6]


def test_min_pair_dist_removing_every_frame_names_the_section(run_dir) -> None:
    inp = write_input(run_dir, steps=1)
    config = json.loads(inp.read_text())
    config["training"]["training_data"]["min_pair_dist"] = 1.0  # the dens example's value
    inp.write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"^training/training_data: no frame left") as info:
        main(["train", str(inp), "--skip-neighbor-stat"])
    assert "the closest is 0.915 Å" in str(info.value)


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


def test_terms_without_labels_are_not_shown(run_dir, caplog) -> None:
    """A virial term on data without virials shows no always-nan column in lcurve.out or the
    log; the terms that have labels still do."""
    inp = write_input(run_dir, steps=2)
    config = json.loads(inp.read_text())
    config["loss"].update(start_pref_v=1.0, limit_pref_v=1.0)
    inp.write_text(json.dumps(config))
    with caplog.at_level("INFO"):
        main(["train", str(inp), "--skip-neighbor-stat"])
    header = (run_dir / "lcurve.out").read_text().splitlines()[0]
    assert "_v_" not in header and "_f_val" in header and "_e_trn" in header
    shown = [r.getMessage() for r in caplog.records if " trn: " in r.getMessage()]
    assert shown and not any("_v =" in m or "nan" in m for m in shown)
