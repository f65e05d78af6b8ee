"""Device-clean evaluation: the model's energy and force pass runs on the ``meta`` device.

A meta tensor has a shape, a dtype and a device but no values. Whatever reads values back to
the host (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, ``.nonzero()``, a Python loop
over a data-dependent size) raises there, and so does any operation mixing a meta tensor with
a tensor created on the CPU (a constant made without ``device=``). Each of those is a host
sync or a wrong-device tensor on CUDA; this test finds them without a GPU.

The neighbour search on the device (``device_edge_batch``, what ``DeepPot`` runs on CUDA) cannot
run on ``meta`` (vesin needs values); there, every host read of a tensor is counted instead:
one per batch of frames, whatever the number of frames and atoms (its equality with the host
search is in ``tests/data/test_device_neighbors.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sezm.model.forces as forces_module
from sezm.data.graph import build_graph
from sezm.data.neighbors import device_edge_batch
from sezm.model.build import load_model

PARITY = Path(__file__).parents[1] / "data" / "parity"
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


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def count_host_reads(monkeypatch) -> list[str]:
    """Record every Python-level read of a tensor's values to the host from now on."""
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("n_frames", [1, 4])
def test_device_neighbour_search_reads_one_value_per_batch(monkeypatch, n_frames):
    """The device search validates on the host arrays and reads back one count (pairs closer
    than ``min_dist``), for any number of frames: no per-frame or per-edge reads."""
    pytest.importorskip(
        "vesin_torch", reason='vesin-torch is not installed (pip install "sezm[gpu]")'
    )
    data = np.load(PARITY / "tiny" / "expected.npz")
    coord = np.stack([data["water_triclinic/coord"] + 0.1 * k for k in range(n_frames)])
    box = np.stack([data["water_triclinic/box"]] * n_frames)
    reads = count_host_reads(monkeypatch)
    src, _, _ = device_edge_batch(coord, box, 6.0, torch.device("cpu"))
    monkeypatch.undo()
    assert len(src) > 1000 * n_frames
    assert reads == ["__int__"]


def test_the_read_counter_sees_reads(monkeypatch):
    reads = count_host_reads(monkeypatch)
    t = torch.arange(3)
    int(t[0]), float(t[1]), t.tolist(), bool(t[2])
    monkeypatch.undo()
    assert reads == ["__int__", "__float__", "tolist", "__bool__"]
