"""Broken data systems: `sezm train` and `sezm test` name the system, the file and (where one
frame is at fault) the frame, say what is expected, and exit with status 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_run import WATER, tiny_config, write_input

from sezm.cli import run

SET = "set.000"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Files a run writes to the working folder (out.json, lcurve.out) go to the test's own."""
    monkeypatch.chdir(tmp_path)


def _npy(name: str, change):
    """A mutation of ``set.000/<name>``: ``change(array) -> new array`` (``None``: delete)."""

    def mutate(system: Path) -> None:
        path = system / SET / name
        new = change(np.load(path))
        if new is None:
            path.unlink()
        else:
            np.save(path, new)

    return mutate


def _write(name: str, text: str):
    return lambda system: (system / name).write_text(text)


def _remove(name: str):
    def mutate(system: Path) -> None:
        target = system / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return mutate


def _coord_at(frame: int, atom: int, value):
    def change(coord):
        coord = coord.reshape(len(coord), -1, 3).copy()
        coord[frame, atom] = value
        return coord.reshape(len(coord), -1)

    return _npy("coord.npy", change)


CASES = {
    "no set folder": (_remove(SET), ["no set.*"]),
    "no type.raw": (_remove("type.raw"), ["type.raw"]),
    "no coord.npy": (_npy("coord.npy", lambda a: None), ["coord.npy"]),
    "no box.npy": (_npy("box.npy", lambda a: None), ["box.npy"]),
    "coord.npy of another atom count": (_npy("coord.npy", lambda a: a[:, :-3]), ["coord.npy"]),
    "box.npy of another frame count": (_npy("box.npy", lambda a: a[:-1]), ["box.npy"]),
    "box.npy not 9 numbers": (_npy("box.npy", lambda a: a[:, :6]), ["box.npy"]),
    "energy.npy of another frame count": (_npy("energy.npy", lambda a: a[:-1]), ["energy.npy"]),
    "force.npy of another atom count": (_npy("force.npy", lambda a: a[:, :-3]), ["force.npy"]),
    "coord.npy as text": (
        lambda s: (s / SET / "coord.npy").write_text("1 2 3"),
        ["coord.npy"],
    ),
    "empty type.raw": (_write("type.raw", ""), ["type.raw"]),
    "type.raw with a word": (_write("type.raw", "0 1 one\n"), ["type.raw"]),
    "type index past type_map": (_write("type.raw", "0 " * 191 + "7\n"), ["type.raw", "7"]),
    "negative type index": (_write("type.raw", "0 " * 191 + "-1\n"), ["type.raw", "-1"]),
    "element not in the model": (_write("type_map.raw", "O\nXe\n"), ["Xe"]),
    "NaN coordinate": (_coord_at(2, 5, np.nan), ["coord.npy: frame 2 holds NaN or inf"]),
    "infinite coordinate": (_coord_at(1, 0, np.inf), ["coord.npy: frame 1 holds NaN or inf"]),
    "atoms on top of each other": (
        _npy("coord.npy", lambda a: np.tile(a[:, :3], 192)),
        ["frame 0", "atoms 0 and 1"],
    ),
    "cell in nm": (_npy("box.npy", lambda a: a / 10), ["frame 0", "tiny", "units"]),
    "flat cell": (
        _npy("box.npy", lambda a: np.concatenate([a[:, :6], np.zeros((len(a), 3))], 1)),
        ["frame 0", "cell"],
    ),
    "NaN cell": (_npy("box.npy", lambda a: np.where(np.arange(9) == 4, np.nan, a)), ["box"]),
}


@pytest.fixture
def broken(tmp_path):
    """A copy of a water system to break."""
    system = tmp_path / "water"
    shutil.copytree(WATER / "data_0", system)
    return system


@pytest.mark.parametrize(("mutate", "expected"), CASES.values(), ids=CASES.keys())
def test_broken_training_system(tmp_path, broken, capsys, mutate, expected) -> None:
    mutate(broken)
    config = tiny_config()
    config["training"]["training_data"]["systems"] = [str(broken)]
    config["training"].pop("validation_data")
    inp = write_input(tmp_path, config=config)
    assert run(["train", str(inp), "--skip-neighbor-stat", "--numb-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sezm: error: "), err
    assert str(broken) in err, err
    for text in expected:
        assert text in err, err
    assert "Traceback" not in err


def test_system_that_does_not_exist(tmp_path, capsys) -> None:
    config = tiny_config()
    config["training"]["training_data"]["systems"] = [str(tmp_path / "missing")]
    inp = write_input(tmp_path, config=config)
    assert run(["train", str(inp), "--skip-neighbor-stat"]) == 2
    err = capsys.readouterr().err
    assert "training/training_data" in err and str(tmp_path / "missing") in err


def test_validation_system_errors_name_their_section(tmp_path, broken, capsys) -> None:
    (broken / "type.raw").write_text("")
    config = tiny_config()
    config["training"]["validation_data"]["systems"] = [str(broken)]
    inp = write_input(tmp_path, config=config)
    assert run(["train", str(inp), "--skip-neighbor-stat"]) == 2
    err = capsys.readouterr().err
    assert "training/validation_data" in err and str(broken) in err


def test_empty_systems_list(tmp_path, capsys) -> None:
    config = tiny_config()
    config["training"]["training_data"]["systems"] = []
    inp = write_input(tmp_path, config=config)
    assert run(["train", str(inp), "--skip-neighbor-stat"]) == 2
    err = capsys.readouterr().err
    assert "training/training_data" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("batch_size", "expected"),
    [(0, "batch_size"), (-2, "batch_size"), ("many", "many"), ("auto:x", "auto:x")],
)
def test_bad_batch_size(tmp_path, capsys, batch_size, expected) -> None:
    config = tiny_config()
    config["training"]["training_data"]["batch_size"] = batch_size
    inp = write_input(tmp_path, config=config)
    assert run(["train", str(inp), "--skip-neighbor-stat", "--numb-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
