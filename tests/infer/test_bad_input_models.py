"""Wrong checkpoints, wrong API calls and wrong command lines: a message that names the file,
argument or frame and what is expected (status 2 for commands), or a warning where the input
is legal but suspect; never a traceback, a crash or silence."""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_run import WATER, tiny_config, write_input

import sezm
from sezm.cli import run
from sezm.compat.deepmd import CheckpointError
from sezm.config import ConfigWarning
from sezm.data.frames import InputError
from sezm.data.neighbors import build_edges
from sezm.infer.deep_pot import InputWarning

FRAMES = WATER / "data_0" / "set.000"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-step checkpoint (with the data's neighbour statistics) and its input."""
    folder = tmp_path_factory.mktemp("trained")
    config = tiny_config(steps=1)
    config["training"].update(save_ckpt=str(folder / "model.ckpt"), disp_file=str(folder / "lc"))
    inp = write_input(folder, config=config)
    here = os.getcwd()
    os.chdir(folder)  # the `checkpoint` pointer file is written to the working folder
    try:
        assert run(["train", str(inp)]) == 0
    finally:
        os.chdir(here)
    return folder


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _ckpt(trained: Path) -> str:
    return str(next(trained.glob("model.ckpt-*.pt")))


def _water(nframes: int = 1):
    coord = np.load(FRAMES / "coord.npy")[:nframes]
    box = np.load(FRAMES / "box.npy")[:nframes]
    atype = np.loadtxt(WATER / "data_0" / "type.raw", dtype=int)
    return coord, box, atype


def _status_and_error(argv, capsys) -> tuple[int, str]:
    status = run(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return status, err


# --- files that are not what they are named --------------------------------------------------------


def _text(path: Path) -> None:
    path.write_text("not a model\n")


def _empty_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")


def _tensor(path: Path) -> None:
    torch.save(torch.zeros(3), path)


def _dict_without_params(path: Path) -> None:
    torch.save({"model": {"w": torch.zeros(2)}}, path)


NOT_FOUND = "(checkpoint|frozen model|model file|model) not found"
FILES = {
    "text .pt": ("m.pt", _text, "readable PyTorch checkpoint"),
    "text .pt2": ("m.pt2", _text, "not a (frozen model|.pt2 package)"),
    "zip without metadata .pt2": ("m.pt2", _empty_zip, "no extra/metadata.json"),
    "tensor .pt": ("m.pt", _tensor, "(expected a dict checkpoint|_extra_state.model_params)"),
    "dict without model_params": ("m.pt", _dict_without_params, "_extra_state.model_params"),
    "missing .pt": ("m.pt", None, NOT_FOUND),
    "missing .pt2": ("m.pt2", None, NOT_FOUND),
}


@pytest.mark.parametrize(("name", "make", "expected"), FILES.values(), ids=FILES.keys())
@pytest.mark.parametrize("command", ["test", "model-devi", "show", "api"])
def test_not_a_model(tmp_path, capsys, command, name, make, expected) -> None:
    path = tmp_path / name
    if make is not None:
        make(path)
    if command == "api":
        with pytest.raises((CheckpointError, FileNotFoundError), match=expected) as info:
            sezm.DeepPot(path)
        assert str(path) in str(info.value)
        return
    argv = {
        "test": ["test", "-m", str(path), "-s", str(WATER / "data_1")],
        "model-devi": ["model-devi", "-m", str(path), str(path), "-s", str(WATER / "data_1")],
        "show": ["show", str(path)],
    }[command]
    status, err = _status_and_error(argv, capsys)
    assert status == 2 and re.search(expected, err) and str(path) in err, err


@pytest.mark.parametrize("option", ["--finetune", "--init-model", "--restart"])
@pytest.mark.parametrize("make", [_text, _tensor, None], ids=["text", "tensor", "missing"])
def test_train_from_a_file_that_is_no_checkpoint(tmp_path, capsys, option, make) -> None:
    path = tmp_path / "pretrained.pt"
    if make is not None:
        make(path)
    inp = write_input(tmp_path)
    status, err = _status_and_error(["train", str(inp), option, str(path)], capsys)
    assert status == 2 and str(path) in err, err


# --- checkpoints of another model ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"channels": 16}, ["model/descriptor/channels: 8 in the checkpoint, 16 here"]),
        ({"lmax": 2}, ["model/descriptor/lmax: 1 in the checkpoint, 2 here"]),
        ({"n_blocks": 2}, ["model/descriptor/n_blocks: 1 in the checkpoint, 2 here"]),
    ],
)
@pytest.mark.parametrize("option", ["--restart", "--init-model"])
def test_checkpoint_of_another_architecture(trained, tmp_path, capsys, option, change, expected):
    config = tiny_config()
    config["model"]["descriptor"].update(change)
    inp = write_input(tmp_path, config=config)
    status, err = _status_and_error(["train", str(inp), option, _ckpt(trained)], capsys)
    assert status == 2, err
    assert f"{option} {_ckpt(trained)}: the checkpoint holds another model" in err
    for text in expected:
        assert text in err
    assert "--finetune" in err and "atomic_model" not in err


def test_restart_with_another_type_map(trained, tmp_path, capsys) -> None:
    config = tiny_config()
    config["model"]["type_map"] = ["O", "H", "C"]
    inp = write_input(tmp_path, config=config)
    status, err = _status_and_error(["train", str(inp), "--restart", _ckpt(trained)], capsys)
    assert status == 2 and "model/type_map: ['O', 'H'] in the checkpoint" in err, err


@pytest.mark.parametrize(
    ("where", "key"),
    [("descriptor", "chanels"), ("fitting_net", "neurons"), (None, "type_mapp")],
)
def test_unknown_key_in_stored_model_params_is_named(trained, tmp_path, where, key) -> None:
    raw = torch.load(_ckpt(trained), weights_only=True)
    params = raw["model"]["_extra_state"]["model_params"]
    (params[where] if where else params)[key] = 1
    path = tmp_path / "edited.pt"
    torch.save(raw, path)
    with pytest.warns(ConfigWarning, match=rf"{path}: the stored model_params .*{key}"):
        dp = sezm.DeepPot(path)
    assert dp.get_type_map() == ["O", "H"]  # still usable


def test_genuine_checkpoint_loads_without_warnings(trained) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        sezm.DeepPot(_ckpt(trained))


def test_head_of_a_single_task_checkpoint(trained, capsys) -> None:
    argv = ["test", "-m", _ckpt(trained), "-s", str(WATER / "data_1"), "--head", "water"]
    status, err = _status_and_error(argv, capsys)
    assert status == 2 and "single-task checkpoint has no head 'water'" in err


def test_restart_at_the_last_step(trained, capsys) -> None:
    inp = trained / "input.json"
    status, err = _status_and_error(["train", str(inp), "--restart", _ckpt(trained)], capsys)
    assert status == 2 and "nothing left to train" in err


# --- DeepPot.eval arguments ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dp(trained):
    return sezm.DeepPot(_ckpt(trained))


API = {
    "fparam to a model without": (dict(fparam=[1.0]), "fparam given, but this model takes none"),
    "aparam to a model without": (
        dict(aparam=np.ones(192)),
        "aparam given, but this model takes none (fitting_net/numb_aparam is 0)",
    ),
    "spin to a model without": (dict(spin=np.zeros((192, 3))), "takes no atomic spins"),
}


@pytest.mark.parametrize(("kwargs", "expected"), API.values(), ids=API.keys())
def test_inputs_the_model_does_not_take(dp, kwargs, expected) -> None:
    coord, box, atype = _water()
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        dp.eval(coord, box, atype, **kwargs)


FRAME_ERRORS = {
    "coords of the wrong size": (lambda c, b, t: (c[:, :-1], b, t), "coord"),
    "cells of the wrong size": (lambda c, b, t: (c, b[:, :6], t), "cell"),
    "types of another length": (lambda c, b, t: (c, b, t[:-3]), "atom"),
    "type past the type_map": (lambda c, b, t: (c, b, np.where(t == 1, 5, t)), "5"),
    "negative type": (lambda c, b, t: (c, b, np.where(t == 1, -2, t)), "-2"),
    "NaN coordinate": (lambda c, b, t: (np.where(np.arange(576) == 7, np.nan, c), b, t), "NaN"),
    "NaN cell": (lambda c, b, t: (c, np.full_like(b, np.nan), t), "cell"),
    "cell in nm": (lambda c, b, t: (c / 10, b / 10, t), "units"),
    "flat cell": (lambda c, b, t: (c, b * np.array([1, 1, 1, 1, 1, 1, 0, 0, 0]), t), "cell"),
}


@pytest.mark.parametrize(("change", "expected"), FRAME_ERRORS.values(), ids=FRAME_ERRORS.keys())
def test_frames_that_cannot_be_evaluated(dp, change, expected) -> None:
    coord, box, atype = change(*_water())
    with pytest.raises(InputError, match=expected):
        dp.eval(coord, box, atype)


def test_energy_api_on_a_property_call(trained) -> None:
    with pytest.raises(TypeError, match=r"use sezm\.DeepPot"):
        sezm.DeepProperty(_ckpt(trained)).eval(*_water())


def test_coordinates_far_closer_than_training_data_warn_once(dp) -> None:
    coord, box, atype = _water(2)
    close = coord.reshape(2, -1, 3).copy()
    close[1, 5] = close[1, 4] + 0.1
    dp._warned_close = False
    with pytest.warns(InputWarning, match=r"frame 1: atoms 4 and 5 are 0.1732 Å apart"):
        dp.eval(close, box, atype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        dp.eval(close, box, atype)  # said once per model
        sezm.DeepPot(dp.checkpoint.path).eval(coord, box, atype)  # normal frames: silent


def test_one_atom_very_far_away_is_evaluated(dp) -> None:
    """A non-periodic frame with one atom 1e7 Å away: no crash in the neighbour search, and
    the far atom is isolated (no force on it)."""
    coord, _, atype = _water()
    far = coord.reshape(1, -1, 3)[:, :24].copy()
    far[0, 3] = [1e7, 0.0, 0.0]
    _, force, _ = dp.eval(far, None, atype[:24])
    assert np.all(np.isfinite(force)) and np.allclose(force[0, 3], 0.0)


@pytest.mark.parametrize("distance", [1e6, 1e12, 1e300])
def test_neighbour_search_splits_frames_too_wide_for_one_cell_list(distance) -> None:
    rng = np.random.default_rng(0)
    coord = rng.random((1, 12, 3)) * 4.0
    coord[0, 7] = [distance, -distance, 0.0]
    kept = np.delete(coord, 7, axis=1)
    edges, reference = build_edges(coord, None, 3.0), build_edges(kept, None, 3.0)
    renumber = np.delete(np.arange(12), 7)  # reference indices -> indices with atom 7
    assert len(edges) == len(reference) and 7 not in edges.src and 7 not in edges.dst
    assert np.array_equal(edges.src, renumber[reference.src])
    assert np.array_equal(edges.dst, renumber[reference.dst])


def test_neighbour_search_refuses_a_chain_wider_than_it_can_handle() -> None:
    chain = np.zeros((1, 30_001, 3))
    chain[0, :, 0] = np.arange(30_001) * 2.5  # 75 km of atoms 2.5 Å apart
    with pytest.raises(InputError, match=r"frame 0: the atoms span 7\.5e\+04 Å along axis x"):
        build_edges(chain, None, 3.0)


# --- command lines ----------------------------------------------------------------------------------------


def test_test_on_a_system_without_labels(trained, tmp_path, capsys) -> None:
    system = tmp_path / "unlabelled"
    (system / "set.000").mkdir(parents=True)
    for name in ("type.raw", "type_map.raw"):
        (system / name).write_text((WATER / "data_0" / name).read_text())
    for name in ("coord.npy", "box.npy"):
        (system / "set.000" / name).write_bytes((FRAMES / name).read_bytes())
    status, err = _status_and_error(["test", "-m", _ckpt(trained), "-s", str(system)], capsys)
    assert status == 2
    assert f"{system}: no energy, force or virial labels to test against" in err


def test_test_on_a_missing_system(trained, tmp_path, capsys) -> None:
    status, err = _status_and_error(
        ["test", "-m", _ckpt(trained), "-s", str(tmp_path / "nowhere")], capsys
    )
    assert status == 2 and str(tmp_path / "nowhere") in err


def test_detail_file_in_a_new_folder_is_written(trained, tmp_path) -> None:
    detail = tmp_path / "results" / "run1" / "detail"
    argv = ["test", "-m", _ckpt(trained), "-s", str(WATER / "data_1"), "-n", "1", "-d"]
    assert run([*argv, str(detail)]) == 0
    assert (detail.parent / "detail.e.out").is_file()


def test_output_folder_is_made_before_the_work(trained, tmp_path) -> None:
    out = tmp_path / "new" / "folder" / "devi.out"
    model = _ckpt(trained)
    argv = ["model-devi", "-m", model, model, "-s", str(WATER / "data_1"), "-o", str(out)]
    assert run(argv) == 0 and out.is_file()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["neighbor-stat", "-s", "nowhere", "-r", "6"], "nowhere"),
        (["plot", "input.json"], "input.json"),
        (["plot", "missing.out"], "missing.out"),
        (["freeze", "-c", "missing.pt"], "missing.pt"),
        (["change-bias", "missing.pt", "-s", str(WATER / "data_1")], "missing.pt"),
        (["model-devi", "-m", "a.pt", "b.pt", "-s", ".", "-f", "-1"], "--frequency"),
        (["embed", "-m", "missing.pt", "-s", str(WATER / "data_1")], "missing.pt"),
    ],
    ids=["neighbor-stat", "plot a json", "plot missing", "freeze", "change-bias", "devi", "embed"],
)
def test_command_line_mistakes(tmp_path, capsys, argv, expected) -> None:
    (tmp_path / "input.json").write_text(json.dumps({"model": {}}))
    status, err = _status_and_error(argv, capsys)
    assert status == 2 and expected in err, err


def test_change_bias_with_the_wrong_number_of_values(trained, capsys) -> None:
    status, err = _status_and_error(["change-bias", _ckpt(trained), "-b", "1.0"], capsys)
    assert status == 2 and "2" in err and "bias" in err, err
