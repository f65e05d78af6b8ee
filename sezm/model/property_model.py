"""The DPA4 property model: descriptor -> per-atom property -> sum or mean over atoms.

A direct (non-conservative) invariant head: ``p_i = (y_i * out_std[t_i] + out_bias[t_i]) m_i``
and ``P = sum_i p_i`` (extensive) or the mean over kept atoms (``intensive``).
"""

from __future__ import annotations

import torch

from ..config.descriptor_options import bridging_radii
from .energy import AtomicModel
from .fitting import atom_keep_mask
from .graph import Graph
from .property import PropertyFitting, property_output


class PropertyModel(AtomicModel):
    """The property model of a normalised ``model`` section: descriptor and property fitting,
    reduced over the atoms of each frame (see the module doc)."""

    def __init__(self, params: dict) -> None:
        if bridging_radii(params) is not None:
            raise ValueError("ZBL bridging is not available for property models")
        super().__init__(params, PropertyFitting)

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
