"""Initial node features: type embedding, frame charge/spin condition, environment seed, GIE.

Everything here runs in the compute dtype (>= float32).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..geometry.layout import degree_of_rows, so3_dim
from .common import Dense, child_seed, normal_
from .edge_cache import EdgeCache


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
        return self.adam_type_embedding[atype]


class ChargeSpinEmbedding(nn.Module):
    """Frame condition ``[charge, spin] -> (nf, C)``: tables indexed by ``int(charge)+100`` and
    ``int(spin)``, mixed by one dense layer with activation."""

    def __init__(self, dim: int, *, activation_function: str, dtype: torch.dtype, seed=None):
        super().__init__()
        self.charge_embedding = TypeEmbedding(
            200, dim, dtype=dtype, seed=child_seed(seed, 0), padding=False
        )
        self.spin_embedding = TypeEmbedding(
            100, dim, dtype=dtype, seed=child_seed(seed, 1), padding=False
        )
        self.mix_layer = Dense(
            2 * dim,
            dim,
            activation_function=activation_function,
            dtype=dtype,
            seed=child_seed(seed, 2),
        )

    def forward(self, charge_spin: torch.Tensor) -> torch.Tensor:
        charge = self.charge_embedding(charge_spin[:, 0].long() + 100)
        spin = self.spin_embedding(charge_spin[:, 1].long())
        return self.mix_layer(torch.cat([charge, spin], dim=-1))


class EnvironmentSeed(nn.Module):
    """FiLM logits ``(N, 2C)`` from a DeePMD-style environment matrix.

    Per edge: ``s = env / r``, ``r~ = [s, s * r_hat]`` (4,) and a filter
    ``g = G([rbf_proj(rbf), T[type_src], T[type_dst]])`` (embed,). Per node:
    ``M = inv_sqrt_deg * sum_e gate_e r~_e (x) g_e`` (4, embed), the rotation-invariant
    ``D = M^T M[:, :axis]`` (embed, axis), then ``output_proj(flatten D)`` (zero-initialised).
    """

    def __init__(
        self,
        *,
        ntypes: int,
        n_radial: int,
        channels: int,
        embed_dim: int,
        axis_dim: int,
        type_dim: int,
        hidden_dim: int,
        mlp_bias: bool,
        activation_function: str,
        eps: float,
        dtype: torch.dtype,
        seed=None,
    ) -> None:
        super().__init__()
        self.axis_dim, self.embed_dim, self.eps = axis_dim, embed_dim, eps
        rbf_out = max(32, embed_dim - 2 * type_dim)
        act = activation_function
        s_rbf, s_g = child_seed(seed, 0), child_seed(seed, 2)
        self.rbf_proj_layer1 = Dense(
            n_radial,
            rbf_out,
            bias=mlp_bias,
            activation_function=act,
            dtype=dtype,
            seed=child_seed(s_rbf, 0),
        )
        self.rbf_proj_layer2 = Dense(
            rbf_out, rbf_out, bias=mlp_bias, dtype=dtype, seed=child_seed(s_rbf, 1)
        )
        self.env_type_embed = TypeEmbedding(ntypes, type_dim, dtype=dtype, seed=child_seed(seed, 1))
        self.g_layer1 = Dense(
            rbf_out + 2 * type_dim,
            hidden_dim,
            bias=mlp_bias,
            activation_function=act,
            dtype=dtype,
            seed=child_seed(s_g, 0),
        )
        self.g_layer2 = Dense(
            hidden_dim, embed_dim, bias=mlp_bias, dtype=dtype, seed=child_seed(s_g, 1)
        )
        self.output_proj = Dense(
            embed_dim * axis_dim, 2 * channels, bias=False, dtype=dtype, init="zeros"
        )

    def forward(self, edges: EdgeCache, atype: torch.Tensor) -> torch.Tensor:
        inv_r = torch.rsqrt(edges.vec.square().sum(-1, keepdim=True) + self.eps**2)  # (E, 1)
        s = edges.env * inv_r
        r_tilde = torch.cat([s, s * edges.vec * inv_r], dim=-1)  # (E, 4)
        types = self.env_type_embed(torch.stack([atype[edges.src], atype[edges.dst]], -1))
        rbf = self.rbf_proj_layer2(self.rbf_proj_layer1(edges.rbf))
        g = self.g_layer2(self.g_layer1(torch.cat([rbf, types.flatten(1)], dim=-1)))  # (E, embed)
        outer = (r_tilde.unsqueeze(-1) * g.unsqueeze(-2)).flatten(1)  # (E, 4*embed)
        if edges.src_gate is not None:
            outer = outer * edges.src_gate
        env_mat = edges.sum_at_dst(outer).view(-1, 4, self.embed_dim) * edges.inv_sqrt_deg
        invariant = env_mat.transpose(1, 2) @ env_mat[:, :, : self.axis_dim]  # (N, embed, axis)
        return self.output_proj(invariant.flatten(1))


class GeometricInitialEmbedding(nn.Module):
    """Seed of the ``l >= 1`` node rows from neighbour directions.

    ``x_i[(l,m)] = inv_sqrt_deg_i * sum_{e: dst=i} gate_e * Dt_e[(l,m), (l,0)] * rho_e[l]``,
    i.e. the zonal harmonic of each edge direction weighted by its per-degree radial feature.
    """

    def __init__(self, lmax: int) -> None:
        super().__init__()
        rows = torch.arange(1, so3_dim(lmax))
        degrees = degree_of_rows(lmax)[1:]
        self.register_buffer("non_scalar_row_index", rows)
        self.register_buffer("zonal_m0_col_index_for_row", degrees * (degrees + 1))
        self.register_buffer("radial_slot_index_for_row", degrees - 1)

    def forward(self, edges: EdgeCache, zonal: torch.Tensor, radial: torch.Tensor) -> torch.Tensor:
        """``zonal (E, D-1)``, ``radial (E, lmax, C)`` for l=1..lmax -> ``(N, D-1, C)``."""
        message = zonal.unsqueeze(-1) * radial.index_select(1, self.radial_slot_index_for_row)
        if edges.src_gate is not None:
            message = message * edges.src_gate.unsqueeze(-1)
        return edges.sum_at_dst(message) * edges.inv_sqrt_deg
