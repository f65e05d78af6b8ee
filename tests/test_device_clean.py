"""Device-clean evaluation: the model's energy and force pass runs on the ``meta`` device.

A meta tensor has a shape, a dtype and a device but no values. Whatever reads values back to
the host (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, ``.nonzero()``, a Python loop
over a data-dependent size) raises there, and so does any operation mixing a meta tensor with
a tensor created on the CPU (a constant made without ``device=``). Each of those is a host
sync or a wrong-device tensor on CUDA; this test finds them without a GPU.

The neighbour search is the one outside this contract (vesin, on the host; see
``device_edges`` for the on-device search, checked against the host one here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sezm.model.forces as forces_module
from sezm.geometry.neighbors import build_edges, device_edges
from sezm.model.build import load_model
from sezm.model.graph import build_graph

PARITY = Path(__file__).parent / "data" / "parity"
# every energy case of the parity set (spin, dens and property models take other inputs)
CASES = [
    "tiny", "mini", "cart_edge", "case_film", "chg_spin", "excl_fp64", "excl_model",
    "focus_fmix", "focus_heads", "fparam1", "fparam2", "lmax0", "lora", "mixed_type",
    "no_env_seed", "parity_node", "radial_gauss", "s2_grids", "s2_mixed", "schedule",
    "so3_grids", "zbl", "zbl_radii", "zero_block",
]  # fmt: skip


def meta_forward(case: str, frame: str = "water_pbc_0") -> dict[str, torch.Tensor]:
    """Energy, forces and virial of ``case`` on ``frame``, model and graph on ``meta``."""
    model, _ = load_model(PARITY / case / "model.pt")
    data = np.load(PARITY / case / "expected.npz")

    def optional(key: str):
        name = f"{frame}/{key}"
        return data[name][None] if name in data.files else None

    coord, atype = data[f"{frame}/coord"][None], data[f"{frame}/atype"][None]
    graph = build_graph(
        coord,
        optional("box"),
        atype,
        model.rcut,
        fparam=optional("fparam"),
        aparam=optional("aparam"),
        charge_spin=optional("charge_spin"),
    )
    return model.to("meta")(graph.to("meta"))


@pytest.mark.parametrize("case", CASES)
def test_energy_and_forces_run_on_meta(case):
    out = meta_forward(case)
    nat = 192
    assert out["force"].device.type == "meta" and out["force"].shape == (1, nat, 3)
    assert out["energy"].shape == (1,) and out["virial"].shape == (1, 9)


def test_a_host_read_is_caught(monkeypatch):
    """The check fails on a force pass that reads a value back (here ``.item()``)."""
    original = forces_module.forces

    def reads_back(grad, *args):
        grad.abs().max().item()
        return original(grad, *args)

    monkeypatch.setattr(forces_module, "forces", reads_back)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        meta_forward("tiny")


def test_a_host_constant_is_caught(monkeypatch):
    """The check fails on a tensor created on the CPU inside the pass."""
    original = forces_module.forces

    def host_constant(grad, *args):
        return original(grad * torch.ones(grad.shape[1], dtype=grad.dtype), *args)

    monkeypatch.setattr(forces_module, "forces", host_constant)
    with pytest.raises(RuntimeError, match=r"meta|device"):
        meta_forward("tiny")


@pytest.mark.parametrize("frame", ["water_pbc_0", "water_triclinic", "water_nopbc", "small_cell"])
def test_device_neighbour_search_matches_host(frame):
    """vesin's torch flavour (used for positions on CUDA) finds the host search's edges."""
    pytest.importorskip(
        "vesin_torch", reason='vesin-torch is not installed (pip install "sezm[gpu]")'
    )
    data = np.load(PARITY / "tiny" / "expected.npz")
    coord = data[f"{frame}/coord"]
    box = data[f"{frame}/box"] if f"{frame}/box" in data.files else None
    host = build_edges(coord[None], None if box is None else box[None], 6.0)
    src, dst, vec, shift = device_edges(
        torch.from_numpy(coord), None if box is None else torch.from_numpy(box), 6.0
    )
    assert len(host) > 0
    np.testing.assert_array_equal(src.numpy(), host.src)
    np.testing.assert_array_equal(dst.numpy(), host.dst)
    np.testing.assert_array_equal(shift.numpy(), host.shift)
    np.testing.assert_allclose(vec.numpy(), host.vec, rtol=0, atol=1e-12)
