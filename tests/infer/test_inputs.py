"""``sezm.DeepPot`` on bad inputs and bad checkpoints: clear errors that say what and where.

Model: ``tests/data/parity/tiny/model.pt`` (O/H water, rcut 6 Å). Accepted input layouts are
checked to agree with each other first, so the error tests start from a known-good call.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import sezm
from sezm.compat.deepmd import CheckpointError
from sezm.data.frames import InputError

MODEL = Path(__file__).parents[1] / "data" / "parity" / "tiny" / "model.pt"
NAT = 6
ATYPE = np.array([0, 1, 1, 0, 1, 1])
CELL = 9.0 * np.eye(3)


@pytest.fixture(scope="module")
def dp() -> sezm.DeepPot:
    return sezm.DeepPot(MODEL, device="cpu")


@pytest.fixture(scope="module")
def coord() -> np.ndarray:
    """One frame ``(1, 6, 3)``: two water-like triples, all pairs > 0.9 Å."""
    o = np.array([[1.0, 1.0, 1.0], [4.0, 4.5, 3.5]])
    h = np.array([[0.95, 0.1, 0.0], [-0.3, 0.9, 0.0]])
    return np.concatenate([o[:1], o[:1] + h, o[1:], o[1:] + h])[None]


def test_accepted_layouts_agree(dp, coord) -> None:
    e, f, _ = dp.eval(coord, CELL.reshape(1, 9), ATYPE)
    variants = [
        (coord.reshape(1, -1), CELL.reshape(9), ATYPE),
        (coord[0], CELL, ATYPE),
        (coord.reshape(-1), CELL[None], ATYPE[None]),
        (coord.tolist(), CELL.tolist(), ATYPE.tolist()),
        (coord, CELL[[1, 0, 2]], ATYPE),  # left-handed rows, same lattice
    ]
    for c, cell, at in variants:
        e2, f2, _ = dp.eval(c, cell, at)
        np.testing.assert_allclose(e2, e, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(f2, f, rtol=1e-5, atol=1e-6)


# --- coordinates -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape",
    [(1, 5, 3), (1, 6, 2), (1, 1, 6, 3), (17,), (2, 17), (6, 4)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_wrong_coordinate_shape(dp, shape) -> None:
    with pytest.raises(InputError, match=r"coords: expected shape .*nat=6 atoms.*got") as err:
        dp.eval(np.zeros(shape), None, ATYPE)
    assert str(shape) in str(err.value)


def test_coordinates_not_numeric(dp) -> None:
    with pytest.raises(InputError, match="coords cannot be read as a numeric array"):
        dp.eval("not coordinates", None, ATYPE)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_coordinates(dp, coord, bad) -> None:
    frames = np.concatenate([coord, coord])
    frames[1, 4, 2] = bad
    with pytest.raises(InputError, match=r"frame 1: non-finite coordinates .* atom\(s\) \[4\]"):
        dp.eval(frames, CELL, ATYPE)


def test_atoms_on_top_of_each_other(dp, coord) -> None:
    c = coord.copy()
    c[0, 4] = c[0, 1]
    for cell in (None, CELL):
        with pytest.raises(
            InputError, match=r"frame 0: atoms (1 and 4|4 and 1) sit on top of each other"
        ):
            dp.eval(c, cell, ATYPE)


def test_atoms_on_top_of_each_other_through_a_periodic_image(dp, coord) -> None:
    c = coord.copy()
    c[0, 4] = c[0, 1] + CELL[0] - CELL[2]  # the same point, one image away
    with pytest.raises(InputError, match=r"atoms (1 and 4|4 and 1) sit on top of each other"):
        dp.eval(c, CELL, ATYPE)
    c[0, 4, 1] += 5e-4  # nearly: the message names the image
    with pytest.raises(
        InputError,
        match=r"(1 and 4|4 and 1) are 0.0005 Å apart through periodic image \(-?1, 0, -?1\)",
    ):
        dp.eval(c, CELL, ATYPE)
    dp.eval(c, None, ATYPE)  # without the cell the two atoms are far apart


# --- atom types --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, 2, 99])
def test_unknown_atom_types(dp, coord, bad) -> None:
    at = ATYPE.copy()
    at[3] = bad
    with pytest.raises(
        InputError,
        match=rf"unknown atom type\(s\) \[{bad}\] at atom\(s\) \[3\]; valid types are 0=O, 1=H",
    ):
        dp.eval(coord, CELL, at)


def test_atom_types_not_integers(dp, coord) -> None:
    with pytest.raises(InputError, match="atom_types must be integers"):
        dp.eval(coord, CELL, ATYPE + 0.5)
    with pytest.raises(InputError, match="atom_types cannot be read as a numeric array"):
        dp.eval(coord, CELL, ["O", "H", "H", "O", "H", "H"])


def test_atom_types_frames_disagree_with_coordinates(dp, coord) -> None:
    with pytest.raises(InputError, match=r"atom_types has 2 frames .* but coords has 1"):
        dp.eval(coord, CELL, np.stack([ATYPE, ATYPE]))


# --- empty systems -------------------------------------------------------------------------------
def test_empty_system(dp) -> None:
    with pytest.raises(InputError, match="the system is empty: atom_types lists 0 atoms"):
        dp.eval(np.zeros((1, 0)), CELL, np.zeros(0, dtype=int))


def test_no_frames(dp) -> None:
    with pytest.raises(InputError, match="coords holds 0 frames"):
        dp.eval(np.zeros((0, 3 * NAT)), None, ATYPE)


def test_single_atom_is_a_valid_system(dp) -> None:
    e, f, v = dp.eval(np.zeros((1, 3)), None, [0])
    assert np.isfinite(e).all()
    np.testing.assert_array_equal(f, 0.0)
    np.testing.assert_array_equal(v, 0.0)


# --- cells -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cell",
    [
        [[5, 0, 0], [0, 5, 0], [5, 5, 0]],  # coplanar
        [[5, 0, 0], [0, 5, 0], [0, 0, 1e-6]],  # flat
        np.zeros((3, 3)),
    ],
    ids=["coplanar", "flat", "zero"],
)
def test_degenerate_cell(dp, coord, cell) -> None:
    with pytest.raises(InputError, match=r"frame 0: degenerate cell, volume .* linearly dependent"):
        dp.eval(coord, np.asarray(cell, dtype=float), ATYPE)


def test_non_finite_cell(dp, coord) -> None:
    cell = CELL.copy()
    cell[1, 1] = np.nan
    with pytest.raises(InputError, match="frame 0: cell contains NaN or inf"):
        dp.eval(coord, cell, ATYPE)


def test_cell_too_small_for_its_atoms(dp, coord) -> None:
    with pytest.raises(InputError, match=r"the cell .* is tiny for 6 atoms.*Check the cell units"):
        dp.eval(coord * 0.05, 0.5 * np.eye(3), ATYPE)


@pytest.mark.parametrize("shape", [(6,), (1, 8), (1, 3, 4), (3, 3, 3), (2, 9)], ids=str)
def test_cell_with_wrong_shape(dp, coord, shape) -> None:
    with pytest.raises(InputError, match=r"cells(:| has)") as err:
        dp.eval(coord, np.ones(shape), ATYPE)
    assert str(shape) in str(err.value)


# --- checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_path_does_not_exist(tmp_path) -> None:
    path = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint not found: {path}")):
        sezm.DeepPot(path, device="cpu")


def test_file_that_is_not_a_checkpoint(tmp_path) -> None:
    path = tmp_path / "input.json"
    path.write_text('{"model": {}}')
    with pytest.raises(
        CheckpointError, match=re.escape(f"{path}: not a readable PyTorch checkpoint")
    ):
        sezm.DeepPot(path, device="cpu")


def test_torch_file_without_model_params(tmp_path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=r"no '_extra_state\.model_params' entry"):
        sezm.DeepPot(path, device="cpu")
    torch.save(torch.zeros(2), path)
    with pytest.raises(CheckpointError, match="expected a dict checkpoint, got Tensor"):
        sezm.DeepPot(path, device="cpu")


def modified_checkpoint(tmp_path, edit) -> Path:
    raw = torch.load(MODEL, map_location="cpu", weights_only=True)
    raw = copy.copy(raw)
    raw["model"] = dict(raw["model"])
    edit(raw["model"])
    path = tmp_path / "modified.pt"
    torch.save(raw, path)
    return path


@pytest.mark.parametrize(
    "key, named",
    [
        ("model.Default.atomic_model.descriptor.bogus_weight", "descriptor.bogus_weight"),
        ("model.Default.atomic_model.fitting_net.bogus", "fitting_net.bogus"),
        ("model.Default.atomic_model.bogus", "atomic_model.bogus"),
        ("model.Default.bogus.weight", "bogus.weight"),
    ],
)
def test_checkpoint_with_an_unexpected_key(tmp_path, key, named) -> None:
    path = modified_checkpoint(tmp_path, lambda state: state.update({key: torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=re.escape(named)):
        sezm.DeepPot(path, device="cpu")


@pytest.mark.parametrize("key", ["model.bogus", "model.Other.atomic_model.descriptor.x", "bogus"])
def test_checkpoint_with_an_unexpected_key_outside_the_branch(tmp_path, key) -> None:
    path = modified_checkpoint(tmp_path, lambda state: state.update({key: torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=re.escape(key)):
        sezm.DeepPot(path, device="cpu")


def test_checkpoint_with_a_missing_key(tmp_path) -> None:
    key = "model.Default.atomic_model.descriptor.film_scale_strength_log"
    path = modified_checkpoint(tmp_path, lambda state: state.pop(key))
    with pytest.raises(CheckpointError, match=r"lacks: descriptor\.film_scale_strength_log"):
        sezm.DeepPot(path, device="cpu")


def test_checkpoint_with_a_wrong_shape(tmp_path) -> None:
    key = "model.Default.atomic_model.out_bias"

    def widen(state):
        state[key] = torch.zeros(1, 3, 1, dtype=torch.float64)

    path = modified_checkpoint(tmp_path, widen)
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: out_bias \(1, 3, 1\) vs \(1, 2, 1\)"
    ):
        sezm.DeepPot(path, device="cpu")
