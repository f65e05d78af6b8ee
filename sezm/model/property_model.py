"""The DPA4 property model: descriptor -> per-atom property -> sum or mean over atoms.

A direct (non-conservative) invariant head: ``p_i = (y_i * out_std[t_i] + out_bias[t_i]) m_i``
and ``P = sum_i p_i`` (extensive) or the mean over kept atoms (``intensive``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .descriptor import Descriptor
from .energy import descriptor_options
from .fitting import atom_keep_mask
from .graph import Graph
from .property import PropertyFitting, property_output

_FITTING_KEYS = set(inspect.signature(PropertyFitting.__init__).parameters) - {
    "self",
    "ntypes",
    "dim_descrpt",
}


class PropertyModel(nn.Module):
    def __init__(self, params: dict) -> None:
        super().__init__()
        if params["bridging_method"].lower() not in ("none", ""):
            raise ValueError("ZBL bridging is not available for property models")
        self.params = params
        self.type_map = list(params["type_map"])
        ntypes = len(self.type_map)
        self.descriptor = Descriptor(descriptor_options(params))
        fit_cfg = {k: v for k, v in params["fitting_net"].items() if k in _FITTING_KEYS}
        self.fitting_net = PropertyFitting(
            ntypes=ntypes, dim_descrpt=self.descriptor.dim_out, **fit_cfg
        )
        task_dim = self.fitting_net.task_dim
        self.register_buffer("out_bias", torch.zeros(1, ntypes, task_dim, dtype=torch.float64))
        self.register_buffer("out_std", torch.ones(1, ntypes, task_dim, dtype=torch.float64))
        self.register_buffer("dens_force_rmsd", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("min_nbor_dist", torch.tensor(-1.0, dtype=torch.float64))
        self.atom_exclude_types = [int(t) for t in params["atom_exclude_types"]]

    @property
    def rcut(self) -> float:
        return self.descriptor.opts.geometry.rcut

    @property
    def property_name(self) -> str:
        return self.fitting_net.property_name

    def forward(self, graph: Graph) -> dict[str, torch.Tensor]:
        desc, _ = self.descriptor(
            graph.atype, graph.src, graph.dst, graph.edge_vec, graph.edge_mask, graph.charge_spin
        )
        raw = self.fitting_net(desc, graph.atype, graph.fparam, graph.aparam)
        total, atom = property_output(
            raw,
            graph.atype,
            atom_keep_mask(graph.atype, self.atom_exclude_types),
            self.out_bias,
            self.out_std,
            intensive=self.fitting_net.intensive,
            distinguish_types=self.fitting_net.distinguish_types,
        )
        return {"property": total, "atom_property": atom}
