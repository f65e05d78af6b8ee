"""Training features around the loop: full validation and best checkpoints, checkpoint retention,
bias change after training, TensorBoard, precision switches, the compiled energy+force path."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import write_input

import sezm
from sezm.cli import main
from sezm.config import normalize_input, normalize_section
from sezm.train.compile import CompiledEnergyGradient, TrainingForward
from sezm.train.finetune import change_out_bias
from sezm.train.monitor import Monitor
from sezm.train.precision import evaluation_settings
from sezm.train.trainer import Resume, Trainer
from sezm.train.validation import BestCheckpoints, format_number, parse_metric, start_step

SLOW = pytest.mark.skipif(not os.environ.get("SEZM_SLOW_TESTS"), reason="set SEZM_SLOW_TESTS=1")


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def edit_input(path: Path, training: dict | None = None, **sections) -> Path:
    config = json.loads(path.read_text())
    config["training"].update(training or {})
    for key, value in sections.items():
        config[key] = value
    path.write_text(json.dumps(config))
    return path


def val_rows(path: Path) -> dict[int, list[float]]:
    rows = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            step, *values = line.split()
            rows[int(step)] = [float(v) for v in values]
    return rows


def checkpoint_state(path: Path) -> dict:
    return torch.load(path, weights_only=False)["model"]


# -- full validation ---------------------------------------------------------------------------


def test_full_validation_keeps_the_best_checkpoints(run_dir) -> None:
    validating = {
        "full_validation": True,
        "validation_freq": 1,
        "full_val_start": 0,
        "max_best_ckpt": 2,
        "validation_metric": "e:rmse",
        "save_best_dir": "best",
        "full_val_file": "full.log",
    }
    inp = edit_input(
        write_input(run_dir, steps=4),
        {"save_freq": 1, "ckpt_keep_ratio": 0.5, "save_dir": "ckpts"},
        validating=validating,
    )
    main(["train", str(inp), "--skip-neighbor-stat"])

    log_text = (run_dir / "full.log").read_text().splitlines()
    assert log_text[0].split() == [
        "#",
        "step",
        "E_MAE(meV/atom)",
        "E_RMSE(meV/atom)",
        "F_MAE(meV/Å)",
        "F_RMSE(meV/Å)",
        "S_MAE(meV/Å³)",
        "S_RMSE(meV/Å³)",
    ]
    rows = val_rows(run_dir / "full.log")
    assert sorted(rows) == [1, 2, 3, 4]
    # the two lowest E_RMSE (column 1), ties broken by the earlier step, ranked 1 and 2
    ranked = sorted(rows, key=lambda s: (rows[s][1], s))[:2]
    kept = sorted(p.name for p in (run_dir / "best").iterdir())
    assert kept == sorted(f"best.ckpt-{s}.t-{i}.pt" for i, s in enumerate(ranked, 1))
    infos = checkpoint_state(run_dir / "best" / f"best.ckpt-{ranked[0]}.t-1.pt")["_extra_state"]
    records = infos["train_infos"]["full_validation_topk_records"]
    assert infos["train_infos"]["full_validation_metric"] == "e:rmse"
    assert records[0]["step"] == ranked[0]  # rank 1 when written, so first in its records
    assert math.isclose(1000 * records[0]["metric"], rows[ranked[0]][1], rel_tol=1e-4)
    # ckpt_keep_ratio 0.5 of 4 checkpoints: the last two, in save_dir, linked from the cwd
    assert sorted(p.name for p in (run_dir / "ckpts").glob("model.ckpt-*.pt")) == [
        "model.ckpt-3.pt",
        "model.ckpt-4.pt",
    ]
    assert (run_dir / "model.ckpt.pt").resolve() == (run_dir / "ckpts" / "model.ckpt-4.pt")


def test_full_validation_restarts_exactly(run_dir) -> None:
    validating = {"full_validation": True, "validation_freq": 1, "full_val_start": 0}
    validating |= {"max_best_ckpt": 2, "validation_metric": "E:MAE"}
    inp = edit_input(write_input(run_dir, steps=4), {"save_freq": 2}, validating=validating)
    main(["train", str(inp), "--skip-neighbor-stat"])
    log_text = (run_dir / "val.log").read_text()
    best = sorted(p.name for p in run_dir.glob("best.ckpt-*.pt"))
    main(["train", str(inp), "--skip-neighbor-stat", "--restart", "model.ckpt-2.pt"])
    assert (run_dir / "val.log").read_text() == log_text
    assert sorted(p.name for p in run_dir.glob("best.ckpt-*.pt")) == best


def test_lora_best_checkpoint_is_merged(run_dir) -> None:
    inp = write_input(run_dir, steps=2)
    config = json.loads(inp.read_text())
    config["model"]["lora"] = {"rank": 2, "alpha": 4.0}
    config["validating"] = {"full_validation": True, "validation_freq": 1, "full_val_start": 0}
    inp.write_text(json.dumps(config))
    main(["train", str(inp), "--skip-neighbor-stat"])
    best = list(run_dir.glob("best.ckpt-*.t-1.pt"))
    assert len(best) == 1
    raw = torch.load(best[0], weights_only=False)
    assert set(raw) == {"model"}  # a plain DPA4 checkpoint: no optimizer state
    assert not any(".A_" in k or ".B_" in k for k in raw["model"])
    assert "lora" not in raw["model"]["_extra_state"]["model_params"]
    sezm.DeepPot(best[0])  # loads as a plain model


def test_validation_helpers(tmp_path) -> None:
    assert start_step(0.5, 10) == 5 and start_step(1, 10) is None and start_step(30, 10) == 30
    assert [format_number(x) for x in (3.26663, 10.3291, 590.912, 0.0, math.nan)] == [
        "3.2666",
        "10.329",
        "590.91",
        "0",
        "nan",
    ]
    assert parse_metric("V:rmse")[0].stem == "v_per_atom"
    with pytest.raises(ValueError, match="validation_metric"):
        parse_metric("E:MSE")
    best = BestCheckpoints(tmp_path, "best.ckpt", keep=2)
    for metric, step in ((3.0, 10), (2.0, 20), (1.0, 30)):
        rank = best.offer(metric, step)
        best.path(step, rank).write_text(str(step))
        best.reconcile()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.ckpt-20.t-2.pt",
        "best.ckpt-30.t-1.pt",
    ]
    assert best.offer(5.0, 40) is None


# -- bias change, disp_avg, TensorBoard --------------------------------------------------------


def test_change_bias_after_training(run_dir) -> None:
    inp = edit_input(
        write_input(run_dir, steps=2), {"save_freq": 1, "change_bias_after_training": True}
    )
    main(["train", str(inp), "--skip-neighbor-stat"])
    key = "model.Default.atomic_model.out_bias"
    before = checkpoint_state(run_dir / "model.ckpt-1.pt")[key]
    after = checkpoint_state(run_dir / "model.ckpt-2.pt")[key]
    assert not torch.allclose(before, after)  # out_bias is a buffer: only the change moves it
    # a second change-by-statistic on the same frames finds nothing left to move
    config = normalize_input(json.loads(inp.read_text()))
    trainer = Trainer(config, Resume(init_model=str(run_dir / "model.ckpt-2.pt")), device="cpu")
    task = trainer.tasks["Default"]
    change_out_bias(task.model, task.train_data, task.params, trainer.setup.seed)
    assert torch.allclose(task.model.out_bias, after, atol=1e-6)


def _tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _tensorboard_available(), reason="tensorboard is not installed")
def test_tensorboard_scalars_and_disp_avg(run_dir) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    inp = edit_input(
        write_input(run_dir, steps=4),
        {"tensorboard": True, "tensorboard_log_dir": "tb", "disp_avg": True, "disp_freq": 2},
    )
    main(["train", str(inp), "--skip-neighbor-stat"])
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"Default/lr", "Default/loss", "Default/rmse", "Default/grad/total_norm"} <= tags
    assert any(t.startswith("Default/grad_top10/") for t in tags)
    rmse = {e.step: e.value for e in events.Scalars("Default/rmse")}
    assert sorted(rmse) == [1, 2, 3, 4]
    # disp_avg: lcurve rows at 1, 2, 4 hold the mean over the steps since the last row
    curve = {}
    for line in (run_dir / "lcurve.out").read_text().splitlines():
        if not line.startswith("#"):
            step, *values = line.split()
            curve[int(step)] = float(values[-2])  # rmse_trn
    assert sorted(curve) == [1, 2, 4]
    assert curve[4] == pytest.approx((rmse[3] + rmse[4]) / 2, rel=1e-2)
    assert curve[2] == pytest.approx(rmse[2], rel=1e-2)


def test_tensorboard_missing_is_an_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    training = normalize_section("training", {"tensorboard": True})
    with pytest.raises(ImportError, match="pip install tensorboard"):
        Monitor(training)
    with pytest.raises(ImportError):  # on every rank, so that none waits for the others
        Monitor(training, active=False)


# -- precision and compile ---------------------------------------------------------------------


def test_evaluation_settings_shell_wins() -> None:
    validating = {"compiled_infer": True, "tf32_infer": True}
    s = evaluation_settings(validating, {})
    assert s.compile and s.tf32 == 1 and not s.amp
    s = evaluation_settings(validating, {"DP_COMPILE_INFER": "0", "DP_TF32_INFER": "2"})
    assert not s.compile and s.tf32 == 2


def test_precision_is_logged_as_in_force(run_dir, caplog) -> None:
    inp = write_input(run_dir, steps=1)
    config = normalize_input(json.loads(edit_input(inp, {}).read_text()))
    config["model"]["descriptor"]["use_amp"] = True
    config["model"]["use_compile"] = True
    with caplog.at_level(logging.INFO, logger="sezm"):
        trainer = Trainer(config, Resume(skip_neighbor_stat=True), device="cpu")
    text = caplog.text
    assert "use_amp) off (CUDA only, running on cpu)" in text
    assert "compile (use_compile) on" in text
    assert trainer.setup.forward.compiled  # the compiled path is set up (traced at the first step)


def _tiny_trainer(run_dir, batch_size: int = 1) -> Trainer:
    inp = write_input(run_dir, steps=1)
    config = normalize_input(json.loads(inp.read_text()))
    config["training"]["training_data"]["batch_size"] = batch_size
    trainer = Trainer(config, Resume(skip_neighbor_stat=True), device="cpu")
    model = trainer.tasks["Default"].model
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a model whose forces and gradients are all non-trivial
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return trainer


def _loss_and_grads(trainer: Trainer, forward: TrainingForward, frames, training: bool):
    task = trainer.tasks["Default"]
    model = task.model
    batch = task.train_data.batch(0, np.asarray(frames), model.rcut, "cpu")
    model.train(training)
    model.zero_grad()
    torch.manual_seed(0)
    pred = forward("Default", batch.graph, training)
    loss, _ = task.loss(
        pred,
        batch.labels,
        batch.find,
        batch.graph.atype.shape[1],
        1e-3,
        mask=batch.graph.atype >= 0,
    )
    if training:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), pred["force"].detach(), grads


def test_compiled_capture_matches_eager(run_dir) -> None:
    """The traced energy+force graph (the part ``use_compile`` lowers) reproduces the eager
    loss, forces and parameter gradients (second derivatives included), for other frame
    counts than the traced one, and follows in-place parameter updates."""
    trainer = _tiny_trainer(run_dir)
    model = trainer.tasks["Default"].model
    eager = TrainingForward({"Default": model})
    traced = CompiledEnergyGradient(model, backend=None)
    fast = TrainingForward({"Default": model}, {"Default": traced}, {"Default": traced})
    for frames, training in (([0], True), ([1, 2], True), ([0], False)):
        le, fe, ge = _loss_and_grads(trainer, eager, frames, training)
        lc, fc, gc = _loss_and_grads(trainer, fast, frames, training)
        assert lc == pytest.approx(le, rel=1e-9)
        assert torch.allclose(fc, fe, atol=1e-8)
        assert ge.keys() == gc.keys()
        for name in ge:
            assert torch.allclose(gc[name], ge[name], rtol=1e-4, atol=1e-6 * ge[name].abs().max())
    with torch.no_grad():
        model.out_bias.add_(1.0)
        next(model.parameters()).mul_(1.5)
    le, _, ge = _loss_and_grads(trainer, eager, [3], True)
    lc, _, gc = _loss_and_grads(trainer, fast, [3], True)
    assert lc == pytest.approx(le, rel=1e-9)


@SLOW
def test_use_compile_training_equals_eager(run_dir) -> None:
    """``model.use_compile`` (inductor) trains like eager: same learning curve, same weights
    to float32 rounding. About 2.5 minutes on one CPU core (inductor compiles ~2 min)."""
    curves, states = {}, {}
    for mode in ("eager", "compiled"):
        work = run_dir / mode
        work.mkdir()
        os.chdir(work)
        inp = write_input(work, steps=3)
        config = json.loads(inp.read_text())
        config["model"]["use_compile"] = mode == "compiled"
        config["model"]["descriptor"]["random_gamma"] = False
        inp.write_text(json.dumps(config))
        main(["train", str(inp), "--skip-neighbor-stat"])
        curves[mode] = (work / "lcurve.out").read_text()
        states[mode] = checkpoint_state(work / "model.ckpt-3.pt")
    assert curves["compiled"] == curves["eager"]
    for key, value in states["eager"].items():  # float32 rounding, grown by three Muon steps
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            close = torch.allclose(states["compiled"][key], value, atol=1e-3 * value.abs().max())
            assert close, key


def test_blocks_under_bf16_autocast(run_dir, monkeypatch) -> None:
    """``use_amp``: the interaction blocks run under bfloat16 autocast (CUDA in training; here
    CPU autocast stands in) with forces and parameter gradients close to float32."""
    from sezm.model.descriptor import Descriptor
    from sezm.nn.attention import envelope_gated_softmax

    trainer = _tiny_trainer(run_dir)
    forward = TrainingForward({"Default": trainer.tasks["Default"].model})
    le, fe, ge = _loss_and_grads(trainer, forward, [0], True)
    monkeypatch.setattr(
        Descriptor, "_block_autocast", lambda self, device: torch.autocast("cpu", torch.bfloat16)
    )
    lb, fb, gb = _loss_and_grads(trainer, forward, [0], True)
    assert lb == pytest.approx(le, rel=2e-2)
    assert torch.allclose(fb, fe, atol=5e-2 * fe.abs().max())
    for name in ge:
        assert torch.isfinite(gb[name]).all(), name

    gen = torch.Generator().manual_seed(0)
    n_edge, n_nodes = 40, 6
    logits = torch.randn(n_edge, 2, 3, generator=gen)
    env = torch.rand(n_edge, generator=gen)
    dst = torch.randint(0, n_nodes, (n_edge,), generator=gen)
    z = torch.randn(2, 3, generator=gen)
    ref = envelope_gated_softmax(logits, env, dst, n_nodes, z, 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = envelope_gated_softmax(logits.bfloat16(), env, dst, n_nodes, z, 1e-3)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), ref, atol=1e-2)
