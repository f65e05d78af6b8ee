"""Initial node features: type embedding, frame charge/spin condition, environment seed, GIE.

Everything here runs in the compute dtype (>= float32).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..engine.stream import stream_edges
from ..geometry.layout import SphericalLayout, index_tensor, so3_dim
from ..kernels.gather_scatter import table_rows
from .common import Dense, child_seed, normal_
from .edge_cache import EdgeCache
from .options import GeometryOptions, LayerBasics


class TypeEmbedding(nn.Module):
    """Lookup table ``(ntypes [+1 zero padding row], dim)``."""

    def __init__(self, ntypes: int, dim: int, *, dtype: torch.dtype, seed=None, padding=True):
        super().__init__()
        self.adam_type_embedding = nn.Parameter(
            torch.zeros(ntypes + int(padding), dim, dtype=dtype)
        )
        normal_(
            self.adam_type_embedding[:ntypes], 1.0 / math.sqrt(ntypes + dim), child_seed(seed, 0)
        )

    def forward(self, atype: torch.Tensor) -> torch.Tensor:
        return table_rows(self.adam_type_embedding, atype)


class ChargeSpinEmbedding(nn.Module):
    """Frame condition ``[charge, spin] -> (nf, C)``: tables indexed by ``int(charge)+100`` and
    ``int(spin)``, mixed by one dense layer with activation."""

    def __init__(self, dim: int, *, activation_function: str, dtype: torch.dtype, seed=None):
        super().__init__()
        table = functools.partial(TypeEmbedding, dim=dim, dtype=dtype, padding=False)
        self.charge_embedding = table(200, seed=child_seed(seed, 0))
        self.spin_embedding = table(100, seed=child_seed(seed, 1))
        act, mix_seed = activation_function, child_seed(seed, 2)
        self.mix_layer = Dense(2 * dim, dim, activation_function=act, dtype=dtype, seed=mix_seed)

    def forward(self, charge_spin: torch.Tensor) -> torch.Tensor:
        charge = self.charge_embedding(charge_spin[:, 0].long() + 100)
        spin = self.spin_embedding(charge_spin[:, 1].long())
        return self.mix_layer(torch.cat([charge, spin], dim=-1))


def seed_widths(channels: int) -> tuple[int, int, int, int]:
    """Internal widths of the environment seed, all derived from ``channels``:
    ``(embed, axis, type, hidden)``."""
    embed = min(channels, 128)
    type_dim = min(32, max(8, channels // 4))
    axis = min(4 if embed < 64 else 8, max(1, embed - 1))
    g_in = max(32, embed - 2 * type_dim) + 2 * type_dim
    return embed, axis, type_dim, min(256, max(2 * embed, g_in))


class EnvironmentSeed(nn.Module):
    """FiLM logits ``(N, 2C)`` from a DeePMD-style environment matrix.

    Per edge: ``s = env / r``, ``r~ = [s, s * r_hat]`` (4,) and a filter
    ``g = G([rbf_proj(rbf), T[type_src], T[type_dst]])`` (embed,). Per node:
    ``M = inv_sqrt_deg * sum_e gate_e r~_e (x) g_e`` (4, embed), the rotation-invariant
    ``D = M^T M[:, :axis]`` (embed, axis), then ``output_proj(flatten D)`` (zero-initialised).

    Native spin (``use_spin``, one flag per type): three more coordinate rows
    ``env * s_src * magnetic(type_src)`` give a spin block ``M_s`` (3, embed) and
    ``D = M^T M[:, :axis] + spin_scale * M_s^T M_s[:, :axis]`` (``spin_scale`` starts at 0).
    """

    def __init__(
        self, basics: LayerBasics, geometry: GeometryOptions, seed, use_spin: Sequence[bool] | None
    ) -> None:
        super().__init__()
        channels, dtype, act = basics.channels, basics.compute_dtype, basics.activation_function
        embed_dim, axis_dim, type_dim, hidden_dim = seed_widths(channels)
        self.axis_dim, self.embed_dim, self.eps = axis_dim, embed_dim, basics.eps
        rbf_out = max(32, embed_dim - 2 * type_dim)
        s_rbf, s_g = child_seed(seed, 0), child_seed(seed, 2)
        dense = functools.partial(Dense, bias=basics.mlp_bias, dtype=dtype)
        hidden = functools.partial(dense, activation_function=act)
        self.rbf_proj_layer1 = hidden(geometry.n_radial, rbf_out, seed=child_seed(s_rbf, 0))
        self.rbf_proj_layer2 = dense(rbf_out, rbf_out, seed=child_seed(s_rbf, 1))
        self.env_type_embed = TypeEmbedding(
            geometry.ntypes, type_dim, dtype=dtype, seed=child_seed(seed, 1)
        )
        self.g_layer1 = hidden(rbf_out + 2 * type_dim, hidden_dim, seed=child_seed(s_g, 0))
        self.g_layer2 = dense(hidden_dim, embed_dim, seed=child_seed(s_g, 1))
        self.output_proj = Dense(
            embed_dim * axis_dim, 2 * channels, bias=False, dtype=dtype, init="zeros"
        )
        if use_spin is None:
            self.spin_mask = self.spin_scale = None
        else:
            self.register_buffer("spin_mask", spin_type_mask(use_spin, dtype), persistent=False)
            self.spin_scale = nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(
        self, edges: EdgeCache, atype: torch.Tensor, spin: torch.Tensor | None = None
    ) -> torch.Tensor:
        """FiLM logits ``(N, 2C)``; ``spin (N, 3)`` is read by native-spin seeds only."""
        if edges.chunks is None:
            env_mat = self.environment_matrix((atype, spin), (atype,), edges)
        else:
            env_mat = stream_edges(self.environment_matrix, (atype, spin), (atype,), edges)
        geo = env_mat[:, :4]
        invariant = geo.transpose(1, 2) @ geo[:, :, : self.axis_dim]  # (N, embed, axis)
        if self.spin_mask is not None:
            mag = env_mat[:, 4:]
            invariant = invariant + self.spin_scale * (
                mag.transpose(1, 2) @ mag[:, :, : self.axis_dim]
            )
        return self.output_proj(invariant.flatten(1))

    def environment_matrix(self, sources: tuple, centres: tuple, edges: EdgeCache) -> torch.Tensor:
        """Normalised environment matrix ``(n, rows, embed)`` of the destinations of ``edges``
        (rows 4, or 7 with spin); ``sources = (atype (N,), spin (N, 3) | None)``,
        ``centres = (atype (n,),)``."""
        atype, spin = sources
        (centre_types,) = centres
        inv_r = torch.rsqrt(edges.vec.square().sum(-1, keepdim=True) + self.eps**2)  # (E, 1)
        s = edges.env * inv_r
        r_tilde = torch.cat([s, s * edges.vec * inv_r], dim=-1)  # (E, 4)
        types = self.env_type_embed(torch.stack([atype[edges.src], centre_types[edges.dst]], -1))
        rbf = self.rbf_proj_layer2(self.rbf_proj_layer1(edges.rbf))
        g = self.g_layer2(self.g_layer1(torch.cat([rbf, types.flatten(1)], dim=-1)))  # (E, embed)
        if self.spin_mask is not None:
            r_tilde = torch.cat([r_tilde, self._spin_rows(edges, atype, spin, r_tilde)], dim=-1)
        rows = r_tilde.shape[-1]  # 4, or 7 with spin
        outer = (r_tilde.unsqueeze(-1) * g.unsqueeze(-2)).flatten(1)  # (E, rows*embed)
        if edges.src_gate is not None:
            outer = outer * edges.src_gate
        return edges.sum_at_dst(outer).view(-1, rows, self.embed_dim) * edges.inv_sqrt_deg

    def _spin_rows(self, edges: EdgeCache, atype, spin, like: torch.Tensor) -> torch.Tensor:
        """``env * s_src * magnetic(type_src)`` ``(E, 3)``; zeros without a spin input."""
        if spin is None:
            return like.new_zeros(like.shape[0], 3)
        gate = edges.env * self.spin_mask[atype[edges.src]].unsqueeze(-1)  # (E, 1)
        return gate * spin.to(like.dtype).index_select(0, edges.src)


class GeometricInitialEmbedding(nn.Module):
    """Seed of the ``l >= 1`` node rows from neighbour directions.

    ``x_i[(l,m)] = inv_sqrt_deg_i * sum_{e: dst=i} gate_e * Dt_e[(l,m), (l,0)] * rho_e[l]``,
    i.e. the zonal harmonic of each edge direction weighted by its per-degree radial feature.
    """

    def __init__(self, lmax: int) -> None:
        super().__init__()
        rows = torch.arange(1, so3_dim(lmax))
        degrees = index_tensor(SphericalLayout.of(lmax).degrees[1:])
        self.register_buffer("non_scalar_row_index", rows)
        self.register_buffer("zonal_m0_col_index_for_row", degrees * (degrees + 1))
        self.register_buffer("radial_slot_index_for_row", degrees - 1)

    def forward(
        self,
        edges: EdgeCache,
        zonal: torch.Tensor,
        radial: torch.Tensor,
        spin_message: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``zonal (E, D-1)``, ``radial (E, lmax, C)`` for l=1..lmax -> ``(N, D-1, C)``.

        ``spin_message (E, 3, C)`` (native spin) joins the ``l = 1`` rows of each edge message.
        """
        message = zonal.unsqueeze(-1) * radial.index_select(1, self.radial_slot_index_for_row)
        if spin_message is not None:
            message = torch.cat([message[:, :3] + spin_message, message[:, 3:]], dim=1)
        if edges.src_gate is not None:
            message = message * edges.src_gate.unsqueeze(-1)
        return edges.sum_at_dst(message) * edges.inv_sqrt_deg


def spin_type_mask(use_spin: Sequence[bool], dtype: torch.dtype) -> torch.Tensor:
    """``(ntypes + 1,)`` 1.0 for magnetic types; the extra last entry (0) serves type ``-1``."""
    return torch.tensor([float(bool(f)) for f in use_spin] + [0.0], dtype=dtype)


#: ``(3, 3)`` Cartesian spin -> packed ``l = 1`` rows: ``sqrt(2) P`` with ``P(x,y,z)=(-y,-z,x)``,
#: so that ``M (R s) = D^1(R) M s`` in the backbone's rotation convention.
CART_TO_L1 = math.sqrt(2.0) * torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])


class SpinEmbedding(nn.Module):
    """Per-atom spin ``s`` as node input (native spin), exactly zero on non-magnetic types.

    ``l = 0``: ``t_i += mag_layer2(mag_layer1(|s_i|^2))`` (smooth at ``s = 0``);
    ``l = 1`` on-site: ``x_i[l=1] += (M s_i) W_vec[t_i]``;
    ``l = 1`` from neighbours (through the GIE): ``env_e (M s_src) W_nbr[t_src]`` per edge.
    ``mag_layer2``, ``W_vec`` and ``W_nbr`` start at zero.
    """

    def __init__(
        self,
        ntypes: int,
        channels: int,
        use_spin: Sequence[bool],
        *,
        activation_function: str,
        dtype: torch.dtype,
        seed=None,
    ) -> None:
        super().__init__()
        if len(use_spin) != ntypes:
            raise ValueError(f"use_spin has {len(use_spin)} flags for {ntypes} types")
        self.register_buffer("spin_mask", spin_type_mask(use_spin, dtype), persistent=False)
        self.register_buffer("cart_to_l1", CART_TO_L1.to(dtype), persistent=False)
        act, mag_seed = activation_function, child_seed(child_seed(seed, 0), 0)
        self.mag_layer1 = Dense(
            1, channels, bias=False, activation_function=act, dtype=dtype, seed=mag_seed
        )
        self.mag_layer2 = Dense(channels, channels, bias=False, dtype=dtype, init="zeros")
        self.adam_spin_vec_weight = nn.Parameter(torch.zeros(ntypes, channels, dtype=dtype))
        self.adam_spin_nbr_weight = nn.Parameter(torch.zeros(ntypes, channels, dtype=dtype))

    def forward(self, spin: torch.Tensor, atype: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``spin (N, 3)``, ``atype (N,)`` -> ``l = 0`` ``(N, C)`` and ``l = 1`` ``(N, 3, C)``."""
        spin = spin.to(self.cart_to_l1.dtype)
        mask = self.spin_mask[atype].unsqueeze(-1)  # (N, 1)
        scalar = self.mag_layer2(self.mag_layer1(spin.square().sum(-1, keepdim=True))) * mask
        weight = table_rows(self.adam_spin_vec_weight, atype) * mask  # (N, C)
        return scalar, (spin @ self.cart_to_l1.T).unsqueeze(-1) * weight.unsqueeze(1)

    def edge_l1(self, spin: torch.Tensor, atype: torch.Tensor, edges: EdgeCache) -> torch.Tensor:
        """Neighbour message ``(E, 3, C)`` for the ``l = 1`` rows of the GIE."""
        src_type = atype[edges.src]
        l1 = spin.to(self.cart_to_l1.dtype).index_select(0, edges.src) @ self.cart_to_l1.T  # (E, 3)
        gate = edges.env * self.spin_mask[src_type].unsqueeze(-1)  # (E, 1)
        weight = table_rows(self.adam_spin_nbr_weight, src_type)  # (E, C)
        return (gate * l1).unsqueeze(-1) * weight.unsqueeze(1)
