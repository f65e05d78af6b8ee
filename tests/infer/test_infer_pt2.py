"""A frozen ``.pt2`` wherever a model is accepted: ``sezm test`` runs it as it runs the checkpoint,
``sezm embed`` refuses it with a message naming the file and the checkpoint to use instead
(DeePMD-kit 3.2's ``dp embed`` raises a bare ``NotImplementedError`` for a ``.pt2``).

One freeze of the tiny parity checkpoint (``--no-with-comm``, about a minute) serves the module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sezm.cli import main
from sezm.data import fields_for_model
from sezm.infer.embed import Embedder
from sezm.infer.pt2 import model_params
from sezm.infer.test import run_test

TESTS = Path(__file__).parents[1]
TINY = TESTS / "data" / "parity" / "tiny" / "model.pt"
WATER = TESTS / "data" / "systems" / "water" / "data_0"


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pt2") / "tiny"
    main(["freeze", "-c", str(TINY), "-o", str(out), "--no-with-comm"])
    return out.with_name("tiny.pt2")


@pytest.fixture
def water_with_virials(tmp_path) -> Path:
    """``water/data_0`` with virial labels, so that virials and stresses are tested too."""
    system = tmp_path / "data_0"
    shutil.copytree(WATER, system)
    nframes = len(np.load(system / "set.000" / "energy.npy"))
    virial = np.random.default_rng(0).normal(size=(nframes, 9))
    np.save(system / "set.000" / "virial.npy", virial)
    return system


def test_sezm_test_on_pt2_matches_checkpoint(frozen, water_with_virials, tmp_path):
    """``sezm test -m model.pt2`` gives the checkpoint's errors and detail tables."""
    system = str(water_with_virials)
    main(["test", "-m", str(frozen), "-s", system, "-n", "3", "-d", str(tmp_path / "pt2")])
    got = run_test(str(frozen), system, numb_test=3)
    want = run_test(str(TINY), system, numb_test=3, detail_file=str(tmp_path / "pt"))
    assert sorted(got) == sorted(want)
    assert {"mae_e", "mae_f", "mae_v", "mae_s"} <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for kind, atol in (("e", 1e-4), ("f", 1e-5), ("v", 1e-4)):
        a = np.loadtxt(tmp_path / f"pt2.{kind}.out")
        b = np.loadtxt(tmp_path / f"pt.{kind}.out")
        assert a.shape == b.shape, kind
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=atol, err_msg=kind)


def test_sezm_test_rejects_a_head_for_pt2(frozen):
    with pytest.raises(ValueError, match="one head"):
        run_test(str(frozen), str(WATER), head="water")


def test_embed_of_pt2_names_file_and_checkpoint(frozen, tmp_path):
    """The .pt2 contract has no descriptor output: the error says so and points to the .pt."""
    with pytest.raises(NotImplementedError) as err:
        Embedder(frozen, device="cpu")
    message = str(err.value)
    assert str(frozen) in message and "descriptor" in message
    assert ".pt checkpoint" in message and "(model.pt)" in message  # the frozen-from checkpoint
    out = tmp_path / "e.h5"
    with pytest.raises(SystemExit, match=r"embed failed: .*frozen \.pt2"):
        main(["embed", "-m", str(frozen), "-s", str(WATER), "-o", str(out)])
    assert not out.exists()


def test_input_fields_from_metadata():
    """The inputs a package needs, read from its metadata as from a checkpoint's model section."""
    meta = {
        "type_map": ["O", "H"],
        "dim_fparam": 2,
        "has_default_fparam": True,
        "default_fparam": [0.5, 1.0],
        "dim_aparam": 1,
        "dim_chg_spin": 2,
        "default_chg_spin": None,
    }
    fields = fields_for_model(model_params(meta))
    assert {"energy", "force", "virial"} <= set(fields)
    assert fields["fparam"].shape == (2,) and not fields["fparam"].must
    assert fields["aparam"].shape == (1,) and fields["aparam"].must and fields["aparam"].atomic
    assert fields["charge_spin"].shape == (2,) and fields["charge_spin"].must
    plain = {**meta, "dim_fparam": 0, "dim_aparam": 0, "dim_chg_spin": 0}
    assert not {"fparam", "aparam", "charge_spin"} & set(fields_for_model(model_params(plain)))
