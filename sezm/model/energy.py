"""The DPA4 energy model: descriptor -> per-atom energies -> forces and virials.

    E_i = fitting(d_i) + out_bias[t_i] [+ E_i^ZBL],   masked by ``atom_exclude_types``
    E   = sum_i E_i                                   (float64)

Forces, virials and atomic virials come from one backward pass to the edge vectors
(``forces.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.descriptor_options import bridging_radii, descriptor_options
from ..config.fitting_options import fitting_options
from . import forces as F
from .descriptor import Descriptor
from .fitting import EnergyFitting, FittingBase, atom_keep_mask, energy_out_stat
from .graph import Graph
from .zbl import ZBL


def graph_spins(graph: Graph) -> torch.Tensor:
    """The atomic spins ``(nf, nloc, 3)`` of a spin model's graph."""
    if graph.spin is None:
        raise ValueError("this is a spin model: give the atomic spins (spin=...)")
    return graph.spin


def magnetic_mask(table: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
    """``table[t]`` per atom, 0 on phantom atoms (``t < 0``); ``table (ntypes,)``."""
    return torch.where(atype >= 0, table[atype.clamp(min=0)], torch.zeros_like(table[:1]))


class AtomicModel(nn.Module):
    """What the energy and property models share: the descriptor and fitting of a normalised
    ``model`` section, the per-type output statistics ``out_bias``/``out_std``
    ``(1, ntypes, dim_out)``, DeePMD-kit's ``dens_force_rmsd`` and ``min_nbor_dist`` buffers and
    the ``atom_exclude_types``."""

    def __init__(self, params: dict, fitting: type[FittingBase]) -> None:
        super().__init__()
        self.params = params
        self.type_map = list(params["type_map"])
        ntypes = len(self.type_map)
        self.descriptor = self._build_descriptor(params)
        self.fitting_net = fitting(ntypes, self.descriptor.dim_out, fitting_options(params))
        dim_out = self.fitting_net.dim_out
        self.register_buffer("out_bias", torch.zeros(1, ntypes, dim_out, dtype=torch.float64))
        self.register_buffer("out_std", torch.ones(1, ntypes, dim_out, dtype=torch.float64))
        self.register_buffer("dens_force_rmsd", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("min_nbor_dist", torch.tensor(-1.0, dtype=torch.float64))
        self.atom_exclude_types = [int(t) for t in params["atom_exclude_types"]]

    def _build_descriptor(self, params: dict) -> Descriptor:
        return Descriptor(descriptor_options(params))

    @property
    def rcut(self) -> float:
        return self.descriptor.opts.geometry.rcut


class EnergyModel(AtomicModel):
    """The energy model of a normalised ``model`` section: descriptor, energy fitting, per-type
    ``out_bias`` and, with ``bridging_method: "ZBL"``, the ZBL repulsion (see the module doc)."""

    def __init__(self, params: dict) -> None:
        super().__init__(params, EnergyFitting)
        self.inter_potential = ZBL(self._zbl_types()) if bridging_radii(params) else None
        use_spin = self.descriptor.use_spin  # (ntypes,) magnetic types of a native-spin model
        spin_mask = None if use_spin is None else torch.tensor(use_spin)
        self.register_buffer("spin_mask", spin_mask, persistent=False)

    def _zbl_types(self) -> list[str]:
        """Elements of the types that take part in the ZBL repulsion."""
        return self.type_map

    def atomic_energy(
        self, graph: Graph, edge_vec: torch.Tensor, spin: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-atom energies ``(nf, nloc)`` float64 for edge vectors ``edge_vec (E, 3)``
        (and atomic spins ``spin (nf, nloc, 3)`` of a native-spin model)."""
        desc, _ = self.descriptor(
            graph.atype, graph.src, graph.dst, edge_vec, graph.edge_mask, graph.charge_spin, spin
        )
        energy = self.fitting_net(desc, graph.atype, graph.fparam, graph.aparam)
        energy = energy_out_stat(energy, graph.atype, self.out_bias).squeeze(-1)
        keep = atom_keep_mask(graph.atype, self.atom_exclude_types)
        if self.inter_potential is not None:
            flat_keep = keep.reshape(-1)
            valid = (
                flat_keep[graph.src]
                & flat_keep[graph.dst]
                & self.descriptor.pair_keep[
                    graph.atype.reshape(-1)[graph.dst], graph.atype.reshape(-1)[graph.src]
                ]
            )
            if graph.edge_mask is not None:
                valid = valid & graph.edge_mask
            edge_index = torch.stack([graph.src, graph.dst])
            energy = energy + self.inter_potential(
                edge_vec.to(torch.float64), edge_index, graph.atype, valid
            )
        return energy * keep.to(energy.dtype)

    def forward(
        self,
        graph: Graph,
        *,
        virial: bool = True,
        atomic_virial: bool = False,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Energies, forces and (atomic) virials of a batch of frames; a spin model (one with a
        ``spin_mask``) adds ``force_mag = -dE/ds`` from the same backward and ``mask_mag``."""
        edge_vec = graph.edge_vec.detach().requires_grad_(True)
        leaves, spin = (edge_vec,), None
        if self.spin_mask is not None:
            spin = graph_spins(graph).detach().to(edge_vec.dtype).requires_grad_(True)
            leaves = (edge_vec, spin)
        with torch.enable_grad():
            atom_energy = self.atomic_energy(graph, edge_vec, spin)
            grad, *grad_spin = F.energy_gradients(atom_energy, leaves, create_graph)
        out = self._outputs(graph, atom_energy, edge_vec, grad, virial, atomic_virial)
        if spin is not None:
            out["force_mag"] = -grad_spin[0]
            out["mask_mag"] = magnetic_mask(self.spin_mask, graph.atype)
        return out

    def _outputs(
        self,
        graph: Graph,
        atom_energy: torch.Tensor,
        edge_vec: torch.Tensor,
        grad: torch.Tensor,
        virial: bool,
        atomic_virial: bool,
    ) -> dict[str, torch.Tensor]:
        """Energies, forces and (atomic) virials from the edge gradient ``grad = dE/dv``."""
        nf, nloc = graph.atype.shape
        if graph.edge_mask is not None:
            grad = grad * graph.edge_mask.unsqueeze(-1).to(grad.dtype)
        n = nf * nloc
        out = {
            "atom_energy": atom_energy,
            "energy": atom_energy.sum(-1),
            "force": F.forces(grad, graph.src, graph.dst, n).view(nf, nloc, 3),
        }
        if virial:
            frame = graph.dst // nloc
            out["virial"] = F.frame_virials(grad, edge_vec, frame, nf)
        if atomic_virial:
            out["atom_virial"] = F.atomic_virials(grad, edge_vec, graph.src, graph.dst, n).view(
                nf, nloc, 9
            )
        return out
