"""Validated frames to the model's :class:`~sezm.model.graph.Graph`: the neighbour search (on
the host or the device), the overlap check, and the tensors on the evaluation device."""

from __future__ import annotations

import numpy as np
import torch

from ..model.graph import Graph
from .frames import check_overlaps
from .neighbors import build_edges, device_edge_batch


def build_graph(
    coord: np.ndarray,
    cell: np.ndarray | None,
    atype: np.ndarray,
    rcut: float,
    *,
    device: torch.device | str = "cpu",
    fparam: np.ndarray | None = None,
    aparam: np.ndarray | None = None,
    charge_spin: np.ndarray | None = None,
    spin: np.ndarray | None = None,
    min_dist: float = 1e-3,
    search_on_device: bool = False,
) -> Graph:
    """Neighbour graph of validated frames: ``coord (nf, nat, 3)``, ``cell (nf, 3, 3) | None``,
    ``atype (nf, nat)``. Atoms closer than ``min_dist`` raise ``InputError``. With
    ``search_on_device``, the neighbour search runs on ``device`` (:func:`graph_edges`)."""
    src, dst, vec = graph_edges(coord, cell, rcut, device, search_on_device, min_dist)

    def tensor(a, dtype):
        if a is None:
            return None
        a = np.asarray(a)
        return torch.as_tensor(a if a.flags.writeable else a.copy(), dtype=dtype, device=device)

    return Graph(
        atype=tensor(atype, torch.long),
        src=src,
        dst=dst,
        edge_vec=vec,
        fparam=tensor(fparam, torch.float64),
        aparam=tensor(aparam, torch.float64),
        charge_spin=tensor(charge_spin, torch.float64),
        spin=None if spin is None else tensor(spin, torch.float64).reshape((*atype.shape, 3)),
    )


def graph_edges(
    coord: np.ndarray,
    cell: np.ndarray | None,
    rcut: float,
    device: torch.device | str = "cpu",
    search_on_device: bool = False,
    min_dist: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(src, dst, vec)`` of validated frames as tensors on ``device``, flattened atom
    indices (``f * nat + i``): searched on ``device`` with vesin-torch when
    ``search_on_device`` (:func:`~sezm.data.neighbors.device_edge_batch`, the same edges
    in the same order), else on the host. Atoms closer than ``min_dist`` raise ``InputError``
    either way."""
    if search_on_device:
        return device_edge_batch(coord, cell, rcut, torch.device(device), min_dist)
    edges = build_edges(coord, cell, rcut)
    if min_dist > 0:
        check_overlaps(edges, coord.shape[1], min_dist)
    return (
        torch.as_tensor(edges.src, dtype=torch.long, device=device),
        torch.as_tensor(edges.dst, dtype=torch.long, device=device),
        torch.as_tensor(edges.vec, dtype=torch.float64, device=device),
    )
