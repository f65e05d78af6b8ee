"""Spin data: the older virtual-atom layout is explained, ``sezm test`` needs ``spin.npy`` and
reports the real and magnetic force errors as ``dp --pt test``.

``tests/data/spin/NiO``: 3 NiO frames in the spin format; ``dp_test.{json,npz}``:
``dp --pt test`` on it with the ``spin_native`` and ``spin_deepspin`` parity checkpoints (see
``tests/data/spin/make_spin_system.py``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.cli import main
from sezm.config import normalize_model
from sezm.data import DataError, DataSystem, fields_for_model
from sezm.infer.test import run_test

DATA = Path(__file__).parents[1] / "data"
NIO = DATA / "spin" / "NiO"
PARITY = DATA / "parity"
SPIN_MODEL = {
    "type_map": ["Ni", "O"],
    "spin": {"use_spin": [True, False], "virtual_scale": [0.314]},
}


def model_fields(model: dict) -> dict:
    """The fields of the model section ``model`` (default descriptor and fitting), normalized."""
    return fields_for_model(normalize_model({"descriptor": {}, **model}))


def virtual_atom_system(root: Path, scale: float = 0.314) -> Path:
    """``NiO`` in DeePMD-kit's older layout: each Ni spin as a type-2 atom at
    ``r + scale * s``, its row of force.npy holding the magnetic force; no spin.npy."""
    load = lambda name: np.load(NIO / "set.000" / f"{name}.npy").reshape(3, 32, 3)  # noqa: E731
    coord, force, spin, fmag = (load(k) for k in ("coord", "force", "spin", "force_mag"))
    sd = root / "set.000"
    sd.mkdir(parents=True)
    np.save(sd / "coord.npy", np.concatenate([coord, coord[:, :16] + scale * spin[:, :16]], 1))
    np.save(sd / "force.npy", np.concatenate([force, fmag[:, :16]], 1).reshape(3, -1))
    for name in ("energy", "box"):
        shutil.copy(NIO / "set.000" / f"{name}.npy", sd)
    types = (NIO / "type.raw").read_text().split() + ["2"] * 16
    (root / "type.raw").write_text("\n".join(types) + "\n")
    return root


# --- 1. the older virtual-atom layout ---------------------------------------------------------
def test_virtual_atom_layout_is_explained_when_training(tmp_path, monkeypatch) -> None:
    """The issue's case: a deepspin model (virtual_scale 0.314) on virtual-atom data."""
    monkeypatch.chdir(tmp_path)
    config = json.loads((PARITY / "spin_deepspin" / "input.json").read_text())
    config["model"]["spin"].update(use_spin=[True, False], virtual_scale=[0.314])
    system = str(virtual_atom_system(tmp_path / "old"))
    config["training"]["training_data"]["systems"] = [system]
    config["training"]["validation_data"]["systems"] = [system]
    (tmp_path / "input.json").write_text(json.dumps(config))
    with pytest.raises(DataError) as err:
        main(["train", "input.json", "--skip-neighbor-stat"])
    text = str(err.value)
    assert text.startswith(f"training/training_data: {system}: looks like DeePMD-kit's older")
    assert "virtual-atom spin format" in text and "outside 0..1" not in text
    for part in (
        "32 real atoms (types 0..1) and 16 virtual atoms (type 2)",
        "keep the 32 real atoms (the first ones) in their order",
        "add a type_map.raw naming the real types (Ni O)",
        "pair the k-th atom of type 2 with the k-th Ni atom",
        "spin.npy (nf, 96): (r_virtual - r_real) / virtual_scale on magnetic atoms",
        "the model's virtual_scale 0.314",
        "the virtual atoms sit 0.4 Å from their atoms, i.e. |spin| = 1.274 μB",
        "force_mag.npy (nf, 96): the virtual atom's row of force.npy on magnetic atoms",
        "use force = F_real + F_virtual and force_mag = virtual_scale * F_virtual",
    ):
        assert part in text, part


def test_virtual_atom_layout_conversion_recovers_the_spin_system(tmp_path) -> None:
    """Following the message on the old layout gives back ``NiO`` (spins and forces)."""
    old = virtual_atom_system(tmp_path / "old")
    with pytest.raises(DataError, match="virtual-atom spin format") as err:
        DataSystem(old, ["Ni", "O"], fields=model_fields(SPIN_MODEL))
    assert "with the model's virtual_scale 0.314" in str(err.value)
    c = np.load(old / "set.000" / "coord.npy").reshape(3, 48, 3)
    f = np.load(old / "set.000" / "force.npy").reshape(3, 48, 3)
    spin = np.zeros((3, 32, 3))
    spin[:, :16] = (c[:, 32:] - c[:, :16]) / 0.314
    fmag = np.zeros((3, 32, 3))
    fmag[:, :16] = f[:, 32:]
    ref = DataSystem(NIO, ["Ni", "O"], fields=model_fields(SPIN_MODEL)).systems[0].frames([0, 1, 2])
    np.testing.assert_allclose(spin, ref["spin"], atol=1e-9)
    np.testing.assert_allclose(fmag, ref["force_mag"], atol=1e-12)
    np.testing.assert_allclose(f[:, :32], ref["force"], atol=1e-12)


def test_virtual_atom_layout_with_native_scheme_and_type_map(tmp_path) -> None:
    """Without a virtual_scale (native scheme) the message says what it is; a type_map.raw of
    the real types is kept; the magnetic type may be named by symbol."""
    old = virtual_atom_system(tmp_path / "old")
    (old / "type_map.raw").write_text("Ni\nO\n")
    model = {"type_map": ["O", "Ni"], "spin": {"use_spin": ["Ni"], "scheme": "native"}}
    with pytest.raises(DataError, match="virtual-atom spin format") as err:
        DataSystem(old, model["type_map"], fields=model_fields(model))
    text = str(err.value)
    assert "virtual_scale = the offset of a virtual atom per μB of spin" in text
    assert "sit 0.4 Å from their atoms)" in text and "type_map.raw naming" not in text
    assert "pair the k-th atom of type 2 with the k-th Ni atom" in text


def test_other_type_errors_are_unchanged(tmp_path) -> None:
    old = virtual_atom_system(tmp_path / "old")
    # not a spin model: the plain type error
    with pytest.raises(DataError, match=r"type 2 at atom 32 is outside 0..1"):
        DataSystem(old, ["Ni", "O"])
    # not one extra atom per magnetic atom: the plain type error
    types = (old / "type.raw").read_text().split()
    types[-1] = "0"
    (old / "type.raw").write_text("\n".join(types) + "\n")
    with pytest.raises(DataError, match=r"type 2 at atom 32 is outside 0..1"):
        DataSystem(old, ["Ni", "O"], fields=model_fields(SPIN_MODEL))


# --- 2. spin.npy is required by `sezm test` ----------------------------------------------------
def without_spin(tmp_path: Path) -> Path:
    system = tmp_path / "nospin"
    shutil.copytree(NIO, system)
    (system / "set.000" / "spin.npy").unlink()
    return system


@pytest.mark.parametrize("allow_missing", [False, True])
def test_sezm_test_needs_spin_npy(tmp_path, allow_missing: bool) -> None:
    """As ``dp test``: the spins are required, whatever spin.allow_missing_label says."""
    model = PARITY / "spin_native" / "model.pt"
    if allow_missing:  # a model trained with allow_missing_label
        ckpt = torch.load(model, map_location="cpu", weights_only=False)
        ckpt["model"]["_extra_state"]["model_params"]["spin"]["allow_missing_label"] = True
        model = tmp_path / "allow_missing.pt"
        torch.save(ckpt, model)
    system = without_spin(tmp_path)
    with pytest.raises(DataError) as err:
        run_test(str(model), str(system))
    assert str(err.value).startswith(f"{system / 'set.000'}: spin.npy is missing;")
    assert "a spin model needs the atomic spins of every frame, (3, 96)" in str(err.value)


def test_training_spin_requirement_follows_allow_missing_label(tmp_path) -> None:
    """Training as ``dp --pt train``: spin.npy is required unless allow_missing_label, which
    fills in zero spins."""
    system = without_spin(tmp_path)
    with pytest.raises(DataError, match=r"spin\.npy is missing"):
        DataSystem(system, ["Ni", "O"], fields=model_fields(SPIN_MODEL))
    model = {**SPIN_MODEL, "spin": {**SPIN_MODEL["spin"], "allow_missing_label": True}}
    data = DataSystem(system, ["Ni", "O"], fields=model_fields(model))
    batch = data.batch(0, np.array([0, 1]), 4.0)
    assert batch.graph.spin is not None and not batch.graph.spin.any()


# --- 3. `sezm test` reports as `dp --pt test` ---------------------------------------------------
DP = json.loads((DATA / "spin" / "dp_test.json").read_text())
DP_TABLES = np.load(DATA / "spin" / "dp_test.npz")
KEYS = {
    "Energy MAE": "mae_e",
    "Energy RMSE": "rmse_e",
    "Energy MAE/Natoms": "mae_ea",
    "Energy RMSE/Natoms": "rmse_ea",
    "Force atom MAE": "mae_fr",
    "Force atom RMSE": "rmse_fr",
    "Force spin MAE": "mae_fm",
    "Force spin RMSE": "rmse_fm",
}


@pytest.mark.parametrize("case", ["spin_native", "spin_deepspin"])
def test_sezm_test_reports_real_and_magnetic_forces_as_dp_test(tmp_path, caplog, case) -> None:
    detail = tmp_path / "detail"
    with caplog.at_level(logging.INFO, logger="sezm"):
        got = run_test(str(PARITY / case / "model.pt"), str(NIO), detail_file=str(detail))
    want = {label: (value, unit) for label, value, unit in DP[case]["lines"] if label in KEYS}
    assert set(want) == set(KEYS)  # dp reports these, and no plain "Force MAE"
    assert set(got) == set(KEYS.values())
    for label, (value, unit) in want.items():
        assert got[KEYS[label]] == pytest.approx(value, rel=2e-5), label
        # the same line: label padded as dp's, then the value with 7 significant digits
        pattern = rf"^{re.escape(label)} +: (\S+) {re.escape(unit)}$"
        shown = re.findall(pattern, "\n".join(caplog.messages), re.M)
        assert len(shown) == 2, label  # the system, then the weighted average
        assert float(shown[0]) == pytest.approx(value, rel=2e-6 + 1e-5)
    # detail files: fr.out (every atom) and fm.out (magnetic atoms only), no f.out
    assert not detail.with_suffix(".f.out").exists()
    for key, name in (
        ("fr", "data_fx data_fy data_fz pred_fx pred_fy pred_fz"),
        ("fm", "data_fmx data_fmy data_fmz pred_fmx pred_fmy pred_fmz"),
    ):
        path = detail.with_suffix(f".{key}.out")
        assert path.read_text().splitlines()[0] == f"# {NIO}: {name}"
        table, ref = np.loadtxt(path), DP_TABLES[f"{case}/{key}"]
        assert table.shape == ref.shape == tuple(DP[case]["shapes"][key])
        np.testing.assert_allclose(table[:, :3], ref[:, :3], atol=1e-12)
        tol = 1e-5 + 1e-4 * np.abs(ref[:, 3:]).max()
        assert np.abs(table[:, 3:] - ref[:, 3:]).max() < tol
    assert len(np.loadtxt(detail.with_suffix(".e.out"))) == DP[case]["shapes"]["e"][0]


def test_sezm_test_without_force_mag_reports_the_real_force_only(tmp_path) -> None:
    system = tmp_path / "nofm"
    shutil.copytree(NIO, system)
    (system / "set.000" / "force_mag.npy").unlink()
    got = run_test(str(PARITY / "spin_native" / "model.pt"), str(system), numb_test=2)
    assert {"mae_fr", "rmse_fr"} <= set(got) and "mae_fm" not in got and "mae_f" not in got
