"""The model input: a batch of frames as one graph, flattened atoms ``frame * nloc + i`` and
directed edges (built from frames by :func:`sezm.data.graph.build_graph`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Graph:
    """The model input: ``nf`` frames of ``nloc`` atoms as one graph of ``E`` directed edges
    (atom ``frame * nloc + i``), with the optional per-frame and per-atom inputs."""

    atype: torch.Tensor  # (nf, nloc) long
    src: torch.Tensor  # (E,) long, message source (neighbour)
    dst: torch.Tensor  # (E,) long, message destination (centre)
    edge_vec: torch.Tensor  # (E, 3) float64, r_src + shift - r_dst
    edge_mask: torch.Tensor | None = None  # (E,) bool, False for padding edges
    fparam: torch.Tensor | None = None  # (nf, numb_fparam)
    aparam: torch.Tensor | None = None  # (nf, nloc, numb_aparam)
    charge_spin: torch.Tensor | None = None  # (nf, 2)
    spin: torch.Tensor | None = None  # (nf, nloc, 3) atomic spins of spin models
    force_input: torch.Tensor | None = None  # (nf, nloc, 3) dens: forces of corrupted atoms
    noise_mask: torch.Tensor | None = None  # (nf, nloc) bool, dens: corrupted atoms

    @property
    def n_frames(self) -> int:
        return self.atype.shape[0]

    def to(self, device: torch.device | str) -> Graph:
        def move(t):
            return None if t is None else t.to(device)

        return Graph(*(move(getattr(self, f)) for f in self.__dataclass_fields__))
