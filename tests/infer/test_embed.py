"""``sezm embed``: DeePMD-kit's ``dp embed`` layout and numbers.

``tests/data/embed/<case>.h5`` is the output of DeePMD-kit 3.2 ``dp --pt embed`` for the
``tiny`` and ``mini`` parity checkpoints on ``tests/data/systems/water/data_0`` (periodic) and
``tests/data/embed/water_nopbc`` (open boundaries); see ``make_upstream_embed.py`` there.
``tests/data/embed/property.h5`` is that of the ``property`` parity checkpoint (intensive,
``task_dim`` 3) on ``tests/data/systems/property/data_{0,1}``, written from the repository root:

    printf 'tests/data/systems/property/data_0\ntests/data/systems/property/data_1\n' > l.txt
    dp --pt embed -m tests/data/parity/property/model.pt -f l.txt -o tests/data/embed/property.h5
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import sezm
from sezm.cli import main
from sezm.infer.embed import EMBEDDINGS, Embedder, embed, group_name

TESTS = Path(__file__).parents[1]
PARITY = TESTS / "data" / "parity"
REF = TESTS / "data" / "embed"
# relative paths, as the reference was written from the repository root
WATER = "tests/data/systems/water/data_0"
NOPBC = "tests/data/embed/water_nopbc"
PROPERTY = ["tests/data/systems/property/data_0", "tests/data/systems/property/data_1"]
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def tiny() -> Embedder:
    return Embedder(PARITY / "tiny" / "model.pt", device="cpu")


def assert_same_layout(ours: h5py.File, ref: h5py.File) -> None:
    assert list(ours.attrs["type_map"]) == list(ref.attrs["type_map"])
    assert ours.attrs["type_map"].dtype == ref.attrs["type_map"].dtype
    assert list(ours) == list(ref)
    for name in ref:
        assert dict(ours[name].attrs) == dict(ref[name].attrs)
        assert sorted(ours[name]) == sorted(ref[name])
        for key, want in ref[name].items():
            got = ours[name][key]
            layout = ("shape", "dtype", "chunks", "compression", "compression_opts", "shuffle")
            assert [getattr(got, a) for a in layout] == [getattr(want, a) for a in layout], key


@pytest.mark.parametrize(
    ("case", "systems"),
    [("tiny", [WATER, NOPBC]), ("mini", [WATER, NOPBC]), ("property", PROPERTY)],
)
def test_matches_upstream(case, systems, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = embed(PARITY / case / "model.pt", systems, tmp_path / "e.h5", device="cpu")
    with h5py.File(out) as ours, h5py.File(REF / f"{case}.h5") as ref:
        assert_same_layout(ours, ref)
        for name in ref:
            np.testing.assert_array_equal(ours[name]["atom_types"], ref[name]["atom_types"])
            for key in EMBEDDINGS:
                want = ref[name][key][()].astype(np.float64)
                got = ours[name][key][()]
                scale = np.abs(want).max()
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale, err_msg=key)


def test_batches_and_dtypes(tiny, tmp_path):
    """One frame per batch gives the same numbers; fp64 and native dtypes."""
    tiny.write([ROOT / WATER], tmp_path / "a.h5", dtype="fp64")
    small = Embedder(PARITY / "tiny" / "model.pt", device="cpu", batch_atoms=1)
    small.write([ROOT / WATER], tmp_path / "b.h5", dtype="native")
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert a["data_0/descriptor"].dtype == np.float64
        assert a["data_0/atomic_feature"].dtype == np.float64
        # native, as DeePMD-kit writes it: descriptor float64, features in the fitting dtype
        assert b["data_0/descriptor"].dtype == np.float64
        assert b["data_0/atomic_feature"].dtype == np.float32
        assert b["data_0/structural_feature"].dtype == np.float32
        for key in EMBEDDINGS:
            np.testing.assert_allclose(a["data_0"][key], b["data_0"][key], rtol=1e-6, atol=1e-5)


def test_structural_feature_is_bias_free_energy(tiny, tmp_path):
    """``output_layer(S) = E - sum_i (bias_atom_e + out_bias)[t_i]``; excluded types drop from S."""
    model = tiny.dp.model
    out = tiny.write([ROOT / WATER], tmp_path / "e.h5")
    data = sezm.data.System(ROOT / WATER, tiny.dp.type_map).frames([0, 1])
    e, *_ = tiny.dp.eval(data["coord"], data["box"], data["atype"])
    bias = (model.fitting_net.bias_atom_e[:, 0] + model.out_bias[0, :, 0]).detach().numpy()
    with h5py.File(out) as f:
        s = f["data_0/structural_feature"][:2]
        h = f["data_0/atomic_feature"][:2]
    w = model.fitting_net.net.output_layer.matrix.detach().double().numpy()
    # E is ~3e4 eV summed from float32 atomic energies: compare the ~8 eV remainder to 1e-4 eV
    np.testing.assert_allclose(s @ w, e - bias[data["atype"]].sum(1, keepdims=True), atol=1e-4)
    try:
        model.atom_exclude_types = [1]
        tiny.write([ROOT / WATER], tmp_path / "x.h5")
    finally:
        model.atom_exclude_types = []
    with h5py.File(tmp_path / "x.h5") as f:
        oxygen = data["atype"][0] == 0
        np.testing.assert_allclose(f["data_0/atomic_feature"][:2], h)
        np.testing.assert_allclose(
            f["data_0/structural_feature"][:2], h[:, oxygen].sum(1), rtol=1e-5, atol=1e-4
        )


def test_property_features_give_the_property(tmp_path):
    """Property head: ``h_i`` through the output layer, biases and output statistics gives the
    model's atomic property; ``S`` is the plain atom sum (the property is intensive)."""
    prop = Embedder(PARITY / "property" / "model.pt", device="cpu")
    model, system = prop.dp.model, ROOT / PROPERTY[0]
    out = prop.write([system], tmp_path / "p.h5", dtype="fp64")
    data = sezm.data.System(system, prop.dp.type_map).frames([0, 1])
    total, atomic = sezm.DeepProperty(PARITY / "property" / "model.pt", device="cpu").eval(
        data["coord"], None, data["atype"], atomic=True
    )
    with h5py.File(out) as f:
        h = torch.from_numpy(f["data_0/atomic_feature"][:2])
        s = f["data_0/structural_feature"][:2]
    t = torch.from_numpy(data["atype"])
    fit = model.fitting_net
    with torch.no_grad():
        y = fit.net.layers[-1](h.to(fit.dtype)).double() + fit.bias_atom_e[t]
        p = (y * model.out_std[0][t] + model.out_bias[0][t]).numpy()
    assert model.fitting_net.intensive
    np.testing.assert_allclose(p, atomic, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.mean(1), total, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, h.numpy().sum(1), rtol=1e-6, atol=1e-5)  # summed in fp32


def test_group_names(tiny, tmp_path):
    used: set[str] = set()
    assert [group_name(p, used) for p in ["a/water", "b/water/", "water", "x"]] == [
        "water",
        "water_1",
        "water_2",
        "x",
    ]
    copy = tmp_path / "other" / "data_0"
    shutil.copytree(ROOT / WATER, copy)
    tiny.write([ROOT / WATER, copy], tmp_path / "e.h5")
    with h5py.File(tmp_path / "e.h5") as f:
        assert list(f) == ["data_0", "data_0_1"]
        assert f["data_0_1"].attrs["system"] == str(copy)
        np.testing.assert_array_equal(f["data_0/descriptor"], f["data_0_1/descriptor"])


def test_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "cli.h5"
    model = str(PARITY / "tiny/model.pt")
    main(
        ["embed", "-m", model, "-s", "tests/data/systems/water", "-o", str(out), "--device", "cpu"]
    )
    with h5py.File(out) as f:
        assert list(f) == ["data_0", "data_1"]
        assert [f[g].attrs["nframes"] for g in f] == [4, 5]
        assert f["data_1/structural_feature"].shape == (5, 64)
    listing = tmp_path / "systems.txt"
    listing.write_text(f"{WATER}\n\n{NOPBC}\n")
    main(["embed", "-m", model, "-f", str(listing), "-o", str(out), "--dtype", "fp64"])
    with h5py.File(out) as f:
        assert list(f) == ["data_0", "water_nopbc"]
        assert f["water_nopbc/descriptor"].dtype == np.float64


def test_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        tiny.write([ROOT / WATER], tmp_path / "e.h5", dtype="fp16")


@pytest.mark.skipif(not os.environ.get("SEZM_SLOW_TESTS"), reason="set SEZM_SLOW_TESTS=1")
def test_compiled_embedding(tiny, tmp_path, monkeypatch):
    """DP_COMPILE_INFER=1 compiles the embedding pass (about a minute on one CPU core)."""
    tiny.write([ROOT / WATER], tmp_path / "eager.h5")
    monkeypatch.setenv("DP_COMPILE_INFER", "1")
    compiled = Embedder(PARITY / "tiny" / "model.pt", device="cpu", batch_atoms=400)
    compiled.write([ROOT / WATER, ROOT / NOPBC], tmp_path / "compiled.h5")  # 2+2 and 2 frames
    with h5py.File(tmp_path / "eager.h5") as a, h5py.File(tmp_path / "compiled.h5") as b:
        for key in EMBEDDINGS:
            want = a["data_0"][key][()]
            np.testing.assert_allclose(b["data_0"][key], want, atol=2e-6 * np.abs(want).max())
