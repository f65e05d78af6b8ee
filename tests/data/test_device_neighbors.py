"""The neighbour search on the evaluation device (vesin-torch), checked on CPU tensors against
the host search (vesin, numpy): the same edges, in the same order, with the same shifts and
vectors, and the same errors. ``DeepPot`` and the ASE calculator take this search on CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.data.frames import InputError
from sezm.data.graph import build_graph
from sezm.data.neighbors import (
    MAX_OPEN_EXTENT,
    build_edges,
    device_edge_batch,
)

pytest.importorskip("vesin_torch", reason='vesin-torch is not installed (pip install "sezm[gpu]")')

TINY = Path(__file__).parents[1] / "data" / "parity" / "tiny"
FRAMES = ["water_pbc_0", "water_triclinic", "water_nopbc", "small_cell"]
RCUT = 6.0
CPU = torch.device("cpu")


def frame(name: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    data = np.load(TINY / "expected.npz")
    box = data[f"{name}/box"] if f"{name}/box" in data.files else None
    return data[f"{name}/coord"], box, data[f"{name}/atype"]


def assert_same_edges(device: tuple[torch.Tensor, ...], host) -> None:
    src, dst, vec = device[:3]
    assert len(host) > 0
    np.testing.assert_array_equal(src.numpy(), host.src)
    np.testing.assert_array_equal(dst.numpy(), host.dst)
    np.testing.assert_allclose(vec.numpy(), host.vec, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", FRAMES)
def test_batch_matches_host(name):
    """Three frames (the frame, then shifted and rescaled copies): flattened indices."""
    coord, box, _ = frame(name)
    coords = np.stack([coord, coord + 0.3, coord * 1.01])
    boxes = None if box is None else np.stack([box, box, box * 1.01])
    got = device_edge_batch(coords, boxes, RCUT, CPU)
    assert all(t.device == CPU for t in got)
    assert got[0].dtype == got[1].dtype == torch.int64 and got[2].dtype == torch.float64
    assert_same_edges(got, build_edges(coords, boxes, RCUT))


def test_close_atoms_raise_the_host_error():
    coord, box, _ = frame("water_pbc_0")
    coord = coord.copy()
    coord[5] = coord[4] + 1e-4
    with pytest.raises(InputError) as host:
        from sezm.data.frames import check_overlaps

        check_overlaps(build_edges(coord[None], box[None], RCUT), len(coord))
    with pytest.raises(InputError) as dev:
        device_edge_batch(coord[None], box[None], RCUT, CPU)
    assert str(dev.value) == str(host.value) and "atoms 4 and 5" in str(dev.value)


def test_tiny_cell_is_refused_before_the_search():
    coord, _, _ = frame("water_pbc_0")
    with pytest.raises(InputError, match="tiny for 192 atoms"):
        device_edge_batch(coord[None], np.eye(3)[None] * 0.5, RCUT, CPU)


def test_very_wide_open_frame_is_searched_on_the_host():
    """An open frame wider than a cell list takes: the host search splits it at its gaps."""
    coord, _, _ = frame("small_cell")
    far = np.concatenate([coord, coord + np.array([2 * MAX_OPEN_EXTENT * RCUT, 0.0, 0.0])])
    host = build_edges(far[None], None, RCUT)
    assert_same_edges(device_edge_batch(far[None], None, RCUT, CPU), host)


def test_deep_pot_device_graph_matches_host_graph():
    """``DeepPot``'s graph on the device search (taken on CUDA) gives the host graph's
    energies, forces and virials."""
    import sezm

    dp = sezm.DeepPot(TINY / "model.pt", device="cpu")
    coord, box, atype = frame("water_triclinic")
    host = dp._graph(coord[None], box[None], atype)
    dev = build_graph(coord[None], box[None], atype[None], dp.model.rcut, search_on_device=True)
    for key in ("src", "dst", "edge_vec", "atype"):
        assert torch.equal(getattr(dev, key), getattr(host, key)), key
    out_host, out_dev = dp.model(host), dp.model(dev)
    for key in ("energy", "force", "virial"):
        assert torch.equal(out_dev[key], out_host[key]), key
