"""Magnetic (spin) energy models: ``model.spin.scheme`` ``native`` or ``deepspin`` (default).

Both take atomic spins ``s (nf, nloc, 3)`` on the graph and return, besides the energy model's
outputs, the magnetic force ``force_mag (nf, nloc, 3)`` (zero off magnetic types) and
``mask_mag (nf, nloc)`` (magnetic, real atoms).

native    the descriptor reads ``s`` as an equivariant input (:class:`~sezm.nn.embedding.
          SpinEmbedding` and the spin rows of the environment seed);
          ``force_mag = -dE/ds`` from the same backward as the forces.
deepspin  atom ``i`` gets a virtual partner ``i'`` of type ``t_i + ntypes`` at ``r_i + d_i``,
          ``d_i = lambda_{t_i} s_i`` (``lambda = virtual_scale``, 0 on non-magnetic types,
          whose partners are placeholders cut from every pair); the plain model runs on the
          ``2 nloc`` atoms, virtual types excluded from the energy. Then
          ``F_i = F_i^2 + F_i'^2``, ``force_mag_i = lambda_{t_i} F_i'^2``,
          ``W = W^2 - sum_i F_i'^2 (x) d_i`` and ``W_i = W_i^2 + W_i'^2 - F_i'^2 (x) d_i``.
          Neighbours (DeePMD-kit's virtual-atom list): the ``sum(sel)`` real neighbours ``j``
          nearest to ``i`` within ``rcut`` (a hard cap); centres ``i`` and ``i'`` both see
          ``{partner, j, j'}`` of that list, kept where ``1e-5 < |r| <= rcut``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config.descriptor_options import descriptor_options, neighbour_cap
from ..config.spin import spin_scheme, use_spin_flags, virtual_model_params, virtual_scales
from .descriptor import Descriptor
from .energy import EnergyModel, graph_spins, magnetic_mask
from .graph import Graph


def build_spin_model(params: dict) -> EnergyModel:
    """The spin model of a normalised model section with a ``spin`` block."""
    fitting = params["fitting_net"]["type"]
    if fitting not in ("dpa4_ener", "sezm_ener"):
        raise ValueError(f"spin models need a dpa4_ener fitting, not {fitting!r}")
    if spin_scheme(params) == "native":
        return NativeSpinModel(params)
    return VirtualSpinModel(params)


class NativeSpinModel(EnergyModel):
    """Spin as a descriptor input (:meth:`EnergyModel.forward` adds ``force_mag = -dE/ds``)."""

    has_spin = True

    def _build_descriptor(self, params: dict) -> Descriptor:
        return Descriptor(
            descriptor_options(params), use_spin_flags(params["spin"], params["type_map"])
        )


class VirtualSpinModel(EnergyModel):
    """DeePMD-kit's virtual-atom spin model ("deepspin") on top of the plain energy model."""

    has_spin = True

    def __init__(self, params: dict) -> None:
        self.real_type_map = list(params["type_map"])
        super().__init__(virtual_model_params(params))
        self.type_map = self.real_type_map
        self.real_nsel = neighbour_cap(params)
        scale = virtual_scales(params["spin"], use_spin_flags(params["spin"], self.type_map))
        self.register_buffer(
            "virtual_scale", torch.tensor(scale, dtype=torch.float64), persistent=False
        )

    def _zbl_types(self) -> list[str]:
        return self.real_type_map  # virtual types are unknown to ZBL: no repulsion

    @property
    def stat_params(self) -> dict:
        """The model section the output statistics see: real and virtual types, the latter
        excluded (so their bias is 0)."""
        return self.params

    def forward(
        self,
        graph: Graph,
        *,
        virial: bool = True,
        atomic_virial: bool = False,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        nf, n = graph.atype.shape
        scale = magnetic_mask(self.virtual_scale, graph.atype)  # (nf, n)
        disp = graph_spins(graph).to(torch.float64) * scale.unsqueeze(-1)  # (nf, n, 3)
        out = super().forward(
            drop_masked_edges(self.virtual_graph(graph, disp)),
            virial=virial,
            atomic_virial=atomic_virial,
            create_graph=create_graph,
        )
        f_real, f_virt = out["force"].split(n, dim=1)  # (nf, n, 3) each
        corr = -f_virt.unsqueeze(-1) * disp.to(f_virt.dtype).unsqueeze(-2)  # (nf, n, 3, 3)
        res = {
            "atom_energy": out["atom_energy"][:, :n],
            "energy": out["energy"],
            "force": f_real + f_virt,
            "force_mag": f_virt * scale.unsqueeze(-1).to(f_virt.dtype),
            "mask_mag": scale > 0,
        }
        if virial:
            res["virial"] = out["virial"] + corr.sum(1).reshape(nf, 9)
        if atomic_virial:
            av = out["atom_virial"]
            res["atom_virial"] = av[:, :n] + av[:, n:] + corr.reshape(nf, n, 9)
        return res

    def virtual_graph(self, graph: Graph, disp: torch.Tensor) -> Graph:
        """The graph of real and virtual atoms: frame ``f`` holds ``[real 0..n-1, virtual
        0..n-1]``; ``disp (nf, n, 3)`` are the virtual offsets ``d_i``.

        Every candidate edge is kept, with ``edge_mask`` False (and a zero vector) where it
        is cut, so the edge count follows from the input alone (no data-dependent shapes:
        the frozen package traces this); :func:`drop_masked_edges` removes them.
        """
        nf, n = graph.atype.shape
        src, dst, vec = graph.src, graph.dst, graph.edge_vec
        capped = capped_edge_mask(graph, self.real_nsel)  # (E,)
        d = disp.reshape(-1, 3)
        real = torch.arange(nf * n, device=vec.device)
        real = real + (real // n) * n  # flat atom -> real node of the doubled frame
        is_atom = graph.atype.reshape(-1) >= 0  # (nf n,) phantom atoms have no partner
        rs, rd, d_src, d_dst = real[src], real[dst], d.index_select(0, src), d.index_select(0, dst)
        src2 = torch.cat([real + n, real, rs, rs + n, rs, rs + n])
        dst2 = torch.cat([real, real + n, rd, rd, rd + n, rd + n])
        vec2 = torch.cat([d, -d, vec, vec + d_src, vec - d_dst, vec + d_src - d_dst])
        candidate = torch.cat([is_atom, is_atom, capped, capped, capped, capped])
        keep = candidate & (vec2.norm(dim=-1) <= self.rcut) & (vec2.square().sum(-1) > 1e-10)
        atype = graph.atype
        virtual_type = torch.where(atype >= 0, atype + len(self.real_type_map), atype)
        aparam = graph.aparam
        if aparam is not None:
            aparam = torch.cat([aparam, torch.zeros_like(aparam)], dim=1)
        return Graph(
            atype=torch.cat([atype, virtual_type], dim=1),
            src=src2,
            dst=dst2,
            edge_vec=torch.where(keep.unsqueeze(-1), vec2, torch.zeros_like(vec2)),
            edge_mask=keep,
            fparam=graph.fparam,
            aparam=aparam,
            charge_spin=graph.charge_spin,
        )


def drop_masked_edges(graph: Graph) -> Graph:
    """``graph`` without its masked edges (``edge_mask`` None)."""
    keep = graph.edge_mask
    return dataclasses.replace(
        graph,
        src=graph.src[keep],
        dst=graph.dst[keep],
        edge_vec=graph.edge_vec[keep],
        edge_mask=None,
    )


def capped_edge_mask(graph: Graph, cap: int) -> torch.Tensor:
    """``(E,)`` bool: the edges of ``graph`` among the ``cap`` nearest (valid) sources of
    their destination; masked edges are never kept. Ties keep the edge order."""
    order, kept = _nearest_first(graph, cap)
    return torch.zeros_like(kept).index_put((order,), kept)


def _capped_edges(graph: Graph, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edges of ``graph`` limited to the ``cap`` nearest sources of each destination, ordered
    by destination, then distance."""
    order, kept = _nearest_first(graph, cap)
    order = order[kept]
    return graph.src[order], graph.dst[order], graph.edge_vec[order]


def _nearest_first(graph: Graph, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge order by destination, then distance (masked edges last, ties in edge order), and
    ``(E,)`` bool in that order: a valid edge among the ``cap`` nearest of its destination."""
    dst, vec = graph.dst, graph.edge_vec
    valid = torch.ones_like(dst, dtype=torch.bool) if graph.edge_mask is None else graph.edge_mask
    length = torch.where(valid, vec.norm(dim=-1), torch.full_like(vec[:, 0], torch.inf))
    order = torch.argsort(length, stable=True)
    order = order[torch.argsort(dst[order], stable=True)]
    counts = torch.zeros(graph.atype.numel(), dtype=torch.long, device=dst.device)
    counts = counts.index_add(0, dst, torch.ones_like(dst))  # (n_nodes,) edges per centre
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(dst.shape[0], device=dst.device) - first[dst[order]]
    return order, (rank < cap) & valid[order]
