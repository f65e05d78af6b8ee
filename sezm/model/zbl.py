"""Ziegler–Biersack–Littmark screened nuclear repulsion, summed over the model's edges.

Used by ``bridging_method: "ZBL"``: the model adds ``E_i^ZBL`` to the learned atomic energy
after ``out_bias`` and before the atom mask, evaluated on the *unclamped* edge vectors (the
force leaf), so its force and virial come out of the same edge backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ase.data import atomic_numbers as _ATOMIC_NUMBERS
from torch import nn

__all__ = ["ZBL", "atomic_number", "zbl_pair_energy"]

KE_EV_ANGSTROM = 14.3996  # e^2 / (4π ε0) in eV·Å
BOHR_ANGSTROM = 0.5291772109
ZBL_A = (0.18175, 0.50986, 0.28022, 0.028171)
ZBL_B = (3.1998, 0.94229, 0.4029, 0.20162)
R_FLOOR = 1e-10


def atomic_number(symbol: str) -> int:
    """Z of an element symbol (H … Og); anything else raises ``ValueError``."""
    z = _ATOMIC_NUMBERS.get(symbol, 0)
    if z < 1:
        raise ValueError(f"unknown element symbol {symbol!r} in type_map: ZBL needs real elements")
    return z


def zbl_pair_energy(r: torch.Tensor, zi: torch.Tensor, zj: torch.Tensor) -> torch.Tensor:
    """ZBL pair energy (eV) at distance ``r`` (Å), elementwise.

    ``a = 0.88534 a_0 / (Z_i^0.23 + Z_j^0.23)``, ``x = r / a``,
    ``φ(x) = Σ_k A_k exp(-B_k x)``, ``V = k_e Z_i Z_j φ(x) / r``.
    """
    a = 0.88534 * BOHR_ANGSTROM / (zi.pow(0.23) + zj.pow(0.23))
    x = r / a
    phi = sum(ak * torch.exp(-bk * x) for ak, bk in zip(ZBL_A, ZBL_B, strict=True))
    return KE_EV_ANGSTROM * zi * zj / r * phi


class ZBL(nn.Module):
    """Per-atom ZBL energy from a directed edge list.

    ``E_i = ½ Σ_{e: dst_e = i} V(max(|v_e|, 1e-10); Z_src, Z_dst) · valid_e`` in float64; each
    pair appears as two directed edges, so the pair energy is counted once in total.
    Buffer ``atomic_numbers (ntypes,)`` float64 (checkpoint key ``inter_potential.atomic_numbers``).
    """

    def __init__(self, type_map: Sequence[str]) -> None:
        super().__init__()
        z = [atomic_number(s) for s in type_map]
        self.register_buffer("atomic_numbers", torch.tensor(z, dtype=torch.float64))

    def forward(
        self,
        edge_vec: torch.Tensor,
        edge_index: torch.Tensor,
        atype: torch.Tensor,
        edge_mask: torch.Tensor,
    ) -> torch.Tensor:
        """edge_vec ``(E, 3)`` (unclamped), edge_index ``(2, E)`` = (src, dst) flat node ids,
        atype ``(N,)`` or ``(nf, nloc)``, edge_mask ``(E,)`` bool -> energy shaped like atype.

        ``edge_mask`` must already hold every exclusion (padding edges, phantom atoms, pair and
        atom exclusions); edges touching a type outside ``[0, ntypes)`` are dropped here too.
        The result has ``edge_vec``'s dtype.
        """
        types = atype.reshape(-1)
        ntypes = self.atomic_numbers.shape[0]
        known = (types >= 0) & (types < ntypes)  # (N,)
        z = self.atomic_numbers[types.clamp(0, ntypes - 1)]  # (N,)
        src, dst = edge_index[0].long(), edge_index[1].long()
        valid = edge_mask & known[src] & known[dst]  # (E,)
        r = edge_vec.to(torch.float64).norm(dim=-1).clamp(min=R_FLOOR)  # (E,)
        pair = zbl_pair_energy(r, z[src], z[dst]) * valid.to(torch.float64)  # (E,)
        energy = torch.zeros(types.shape[0], dtype=torch.float64, device=edge_vec.device)
        energy = energy.index_add(0, dst, 0.5 * pair)
        return energy.to(edge_vec.dtype).view(atype.shape)
