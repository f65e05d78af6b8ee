"""Faults during `sezm train`: stop signals save a checkpoint and print the restart command,
killed saves leave nothing behind that breaks the next run, a partial learning-curve row is
repaired, a non-finite loss or an out-of-memory error stops with what to do, and a run with
nothing to train says so."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import WATER, curve_rows, write_input

import sezm
from sezm.cli import run
from sezm.train import checkpoint as ckpt_mod
from sezm.train.progress import repair_curve
from sezm.train.steps import StepRunner


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _steps(path: Path) -> list[int]:
    return [int(row.split()[0]) for row in curve_rows(path)]


def _saved_step(path: Path) -> int:
    raw = torch.load(path, weights_only=True)
    return raw["sezm"]["next_step"]


def _after_step(monkeypatch, at: int, action) -> None:
    """Run ``action()`` right after training step ``at`` (1-based) has been taken."""
    original = StepRunner.train_step

    def step(self, index, lr, watch):
        out = original(self, index, lr, watch)
        if index + 1 == at:
            action()
        return out

    monkeypatch.setattr(StepRunner, "train_step", step)


def _send(*signums: int):
    return lambda: [os.kill(os.getpid(), s) for s in signums]


# --- stop signals -----------------------------------------------------------------------------


def test_ctrl_c_in_a_terminal_saves_and_prints_the_restart_command(run_dir) -> None:
    """A real SIGINT to a `sezm` process: exit status 130, a checkpoint of the last whole
    step, the learning curve up to it, and the command that continues."""
    inp = write_input(run_dir, steps=500, save_freq=1000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sezm", "train", inp.name, "--skip-neighbor-stat"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    curve = run_dir / "lcurve.out"
    deadline = time.monotonic() + 90
    while not (curve.is_file() and curve_rows(curve)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    step = _steps(curve)[-1]
    assert f"SIGINT received: training stopped after step {step}" in err
    assert f"saved checkpoint model.ckpt-{step}.pt" in err
    assert f"to continue: sezm train input.json --restart model.ckpt-{step}.pt" in err
    assert _saved_step(run_dir / f"model.ckpt-{step}.pt") == step
    assert (run_dir / "checkpoint").read_text() == f"model.ckpt-{step}.pt"


def test_sigterm_stops_after_the_step_and_the_restart_command_finishes_the_run(
    run_dir, monkeypatch, capsys
) -> None:
    """SIGTERM (a batch scheduler) at step 2 of 4: status 143; the printed command continues
    the run to the same learning curve as a run never stopped."""
    inp = write_input(run_dir, save_freq=1000)
    sigint_handler = signal.getsignal(signal.SIGINT)  # SIG_IGN when launched in the background
    assert run(["train", str(inp), "--skip-neighbor-stat", "-o", "whole.json"]) == 0
    whole = curve_rows(run_dir / "lcurve.out")

    with monkeypatch.context() as patch:
        _after_step(patch, 2, _send(signal.SIGTERM))
        status = run(["train", str(inp), "--skip-neighbor-stat", "--numb-steps", "4"])
    err = capsys.readouterr().err
    assert status == 143
    assert "SIGTERM received: training stopped after step 2; saved checkpoint" in err
    assert _steps(run_dir / "lcurve.out") == [1, 2]
    assert _saved_step(run_dir / "model.ckpt-2.pt") == 2
    command = err.split("to continue: ")[1].splitlines()[0]
    argv = shlex.split(command)
    assert argv[:5] == ["sezm", "train", str(inp), "--restart", "model.ckpt-2.pt"]
    assert argv[5:] == ["--numb-steps", "4"]
    assert run(argv[1:]) == 0
    assert curve_rows(run_dir / "lcurve.out") == whole
    assert signal.getsignal(signal.SIGINT) is sigint_handler  # handlers restored


def test_second_ctrl_c_stops_at_once_without_saving(run_dir, monkeypatch, capsys) -> None:
    inp = write_input(run_dir, save_freq=1)
    _after_step(monkeypatch, 2, _send(signal.SIGINT, signal.SIGINT))
    assert run(["train", str(inp), "--skip-neighbor-stat"]) == 130
    assert "sezm: interrupted" in capsys.readouterr().err
    assert not (run_dir / "model.ckpt-2.pt").exists()
    assert (run_dir / "checkpoint").read_text() == "model.ckpt-1.pt"
    assert _saved_step(run_dir / "model.ckpt.pt") == 1


# --- what killed saves leave behind --------------------------------------------------------------


def test_stale_temporary_files_are_removed_at_start_and_only_sezm_ones(run_dir, caplog) -> None:
    inp = write_input(run_dir, steps=1)
    stale = [
        ".model.ckpt-2.pt.a1b2c3d4.tmp",  # a numbered checkpoint killed mid-write
        ".model.ckpt.pt.tmp",  # the link
        ".checkpoint.k9_x8y7z.tmp",  # the pointer file
        ".model.ckpt_ema-4.pt.abcdefgh.tmp",  # an EMA checkpoint
    ]
    kept = [".model.ckpt-2.pt.tmp.bak", "notes.tmp", ".other.ckpt-2.pt.a1b2c3d4.tmp", "x.tmp"]
    for name in stale + kept:
        (run_dir / name).write_bytes(b"partial")
    with caplog.at_level("INFO", logger="sezm"):
        assert run(["train", str(inp), "--skip-neighbor-stat"]) == 0
    left = {p.name for p in run_dir.iterdir()}
    assert not left & set(stale)
    assert set(kept) <= left
    assert "removed 3 temporary file(s) of an interrupted earlier save" in caplog.text
    assert "removed 1 temporary file(s)" in caplog.text  # the EMA store's


def test_pointer_file_is_replaced_atomically(tmp_path, monkeypatch) -> None:
    pointer = tmp_path / "checkpoint"
    ckpt_mod.atomic_write_text(pointer, "model.ckpt-2.pt")

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.atomic_write_text(pointer, "model.ckpt-4.pt")
    assert pointer.read_text() == "model.ckpt-2.pt"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_partial_learning_curve_row_is_repaired_on_restart(run_dir, caplog) -> None:
    """A row cut in the middle (kill or full disk during the write of step 3): the restart
    from step 2 drops it and the curve ends as the uninterrupted one."""
    inp = write_input(run_dir)
    assert run(["train", str(inp), "--skip-neighbor-stat"]) == 0
    curve = run_dir / "lcurve.out"
    whole = curve.read_text()
    cut = whole.index(whole.splitlines()[4]) + 20  # 2 header lines, rows 1-2, then row 3
    curve.write_text(whole[:cut])
    (run_dir / "model.ckpt-4.pt").unlink()
    with caplog.at_level("WARNING", logger="sezm"):
        assert run(["train", str(inp), "--skip-neighbor-stat", "-r", "model.ckpt-2.pt"]) == 0
    assert curve.read_text() == whole
    assert "lcurve.out: dropped 1 partial row(s)" in caplog.text


HEADER = "# step      rmse_val    rmse_trn   lr\n# If there is ...\n"


@pytest.mark.parametrize(
    ("tail", "rows", "dropped"),
    [
        ("      3   1.0e+00   2.0e+00   1.0e-03\n", [1, 2, 3], 0),
        ("      3   1.0e+00   2.0e+", [1, 2], 1),  # no newline
        ("      3   1.0e+00\n", [1, 2], 1),  # too few columns
        ("      3   1.0e+00   2.0e+00   1.0e-03      4   1.0e\n", [1, 2], 1),  # run together
        ("      3   1.0e+00   2.0e+\x00\x00\n", [1, 2], 1),  # zero-filled block
        ("      3   1.0e+00   2.0e+00   1.0e-03\n      9   1.0   2.0   3.0\n", [1, 2, 3], 0),
    ],
)
def test_repair_curve(tmp_path, caplog, tail, rows, dropped) -> None:
    curve = tmp_path / "lcurve.out"
    body = "".join(f"      {s}   1.0e+00   2.0e+00   1.0e-03\n" for s in (1, 2))
    curve.write_text(HEADER + body + tail)
    assert repair_curve(curve, last_step=8) is True
    assert _steps(curve) == [r for r in rows if r <= 8]
    assert ("partial row" in caplog.text) == bool(dropped)


def test_repair_curve_of_a_cut_header_starts_a_new_one(tmp_path) -> None:
    curve = tmp_path / "lcurve.out"
    curve.write_text("# step      rmse_v")
    assert repair_curve(curve, last_step=2) is False
    assert curve.read_text() == ""


# --- non-finite loss and out of memory -------------------------------------------------------------


def test_non_finite_loss_names_the_step_and_batch_and_keeps_the_checkpoint(
    run_dir, monkeypatch, capsys
) -> None:
    inp = write_input(run_dir, save_freq=1)
    original = StepRunner.step_loss
    calls = []

    def poisoned(self, task, batch, lr, training):
        loss, metrics = original(self, task, batch, lr, training)
        if training:
            calls.append(batch)
            if len(calls) == 3:
                return loss * float("nan"), metrics
        return loss, metrics

    monkeypatch.setattr(StepRunner, "step_loss", poisoned)
    assert run(["train", str(inp), "--skip-neighbor-stat"]) == 2
    err = capsys.readouterr().err
    frames = calls[2].frames.tolist()
    assert (
        f"step 3: the loss is nan on the batch of system {WATER / 'data_0'}, frames {frames}" in err
    )
    assert "learning_rate/start_lr" in err
    assert (run_dir / "checkpoint").read_text() == "model.ckpt-2.pt"
    assert not (run_dir / "model.ckpt-3.pt").exists()
    assert _steps(run_dir / "lcurve.out") == [1, 2]


def test_non_finite_gradient_norm_stops_before_the_update(run_dir, monkeypatch, capsys) -> None:
    inp = write_input(run_dir, gradient_max_norm=1.0)
    monkeypatch.setattr(
        "sezm.train.steps.clip_grad_norm", lambda params, norm: torch.tensor(float("inf"))
    )
    assert run(["train", str(inp), "--skip-neighbor-stat"]) == 2
    err = capsys.readouterr().err
    assert "step 1: the gradient norm is inf on the batch of system" in err
    assert not list(run_dir.glob("model.ckpt*"))


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        ),
        MemoryError(),
    ],
    ids=["cuda", "cpu", "host"],
)
def test_out_of_memory_says_which_settings_to_lower(run_dir, monkeypatch, capsys, error) -> None:
    inp = write_input(run_dir)

    def exhausted(self, step, lr, watch):
        raise error

    monkeypatch.setattr(StepRunner, "train_step", exhausted)
    assert run(["train", str(inp), "--skip-neighbor-stat"]) == 2
    err = capsys.readouterr().err
    assert "sezm: error: out of memory on cpu at step 1" in err
    assert "`training/training_data/batch_size` (now [1];" in err
    assert "`model/descriptor/sel` (now" in err and "channels 8" in err
    assert "Traceback" not in err


# --- nothing to train ------------------------------------------------------------------------------


def test_zero_steps_saves_the_untrained_model(run_dir, caplog) -> None:
    inp = write_input(run_dir)
    with caplog.at_level("INFO", logger="sezm"):
        assert run(["train", str(inp), "--skip-neighbor-stat", "--numb-steps", "0"]) == 0
    assert "no training step; saved the untrained model" in caplog.text
    assert "finished: ran" not in caplog.text
    assert (run_dir / "checkpoint").read_text() == "model.ckpt-0.pt"
    assert sezm.DeepPot(run_dir / "model.ckpt.pt").get_type_map() == ["O", "H"]


def test_restart_at_the_end_says_nothing_is_left_to_train(run_dir, capsys) -> None:
    inp = write_input(run_dir, steps=2)
    assert run(["train", str(inp), "--skip-neighbor-stat"]) == 0
    before = (run_dir / "model.ckpt-2.pt").read_bytes()
    assert run(["train", str(inp), "--restart", "model.ckpt-2.pt"]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint is at step 2 and `training/numb_steps` is 2: nothing left" in err
    assert "--numb-steps N with N > 2" in err
    assert (run_dir / "model.ckpt-2.pt").read_bytes() == before
