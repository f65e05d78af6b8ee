"""One interaction block: an SO(2)-convolution unit and ``ffn_blocks`` equivariant FFN units.

    x <- x + post_norm(SO2Conv(pre_norm(x[:, :D_mp])))      (zero-padded to the node degree)
    x <- x + [scale *] post_norm_k(FFN_k(pre_norm_k(x)))    for k < ffn_blocks

The residual shortcuts can be replaced by depth attention over earlier unit outputs
(``full_attn_res`` / ``block_attn_res``, see ``attn_res``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.stream import stream_nodes
from ..geometry.layout import so3_dim
from .attn_res import block_attn_res_units, depth_attn_res, full_attn_res_units
from .common import child_seed
from .edge_cache import EdgeCache
from .ffn import EquivariantFFN
from .norm import EquivariantRMSNorm
from .options import DescriptorOptions, LayerBasics, ResidualOptions
from .so2_conv import SO2Convolution
from .so2_mixing import LAYER_SCALE_INIT

#: RMS-norm floor around the residual branches; the post-SO(2) norm without ``edge_norm`` uses
#: a unit floor, ``x / sqrt(1 + var)``, which keeps small messages small.
NORM_EPS, UNIT_FLOOR = 1e-5, 1.0


def _norm_or_identity(
    enabled: bool, lmax: int, basics: LayerBasics, eps: float = NORM_EPS
) -> nn.Module:
    if not enabled:
        return nn.Identity()
    return EquivariantRMSNorm(lmax, basics.channels, eps=eps, dtype=basics.compute_dtype)


class InteractionBlock(nn.Module):
    """One interaction block: SO(2) message passing then the FFN, each inside its residual unit."""

    def __init__(self, opts: DescriptorOptions, index: int, seed) -> None:
        super().__init__()
        basics, residual, ffn = opts.basics, opts.residual, opts.ffn
        degrees = opts.degrees.block(index)
        lmax, node_lmax = degrees.lmax, degrees.node_lmax
        self.mp_dim, self.node_dim = so3_dim(lmax), so3_dim(node_lmax)
        self.pre_so2_norm = _norm_or_identity(residual.so2_pre_norm, lmax, basics)
        self.post_so2_norm = _norm_or_identity(
            residual.so2_post_norm, lmax, basics, NORM_EPS if basics.edge_norm else UNIT_FLOOR
        )
        self.so2_conv = SO2Convolution(basics, opts.message, degrees, child_seed(seed, 0))
        self.pre_ffn_norms = nn.ModuleList(
            _norm_or_identity(residual.ffn_pre_norm, node_lmax, basics) for _ in range(ffn.blocks)
        )
        self.post_ffn_norms = nn.ModuleList(
            _norm_or_identity(residual.ffn_post_norm, node_lmax, basics) for _ in range(ffn.blocks)
        )
        self.ffns = nn.ModuleList(
            EquivariantFFN(basics, ffn, node_lmax, degrees.kmax, child_seed(child_seed(seed, 1), k))
            for k in range(ffn.blocks)
        )
        self.depth_mode = residual.depth_mode
        if self.depth_mode is not None:
            self._build_depth_attention(basics, residual, ffn.blocks, seed)
        self.adam_ffn_layer_scales = None
        if basics.layer_scale:
            self.adam_ffn_layer_scales = nn.ParameterList(
                nn.Parameter(torch.full((basics.channels,), LAYER_SCALE_INIT, dtype=basics.dtype))
                for _ in range(ffn.blocks)
            )

    def _build_depth_attention(
        self, basics: LayerBasics, residual: ResidualOptions, n_ffn: int, seed
    ) -> None:
        mode = residual.depth_attn_res
        s = child_seed(seed, 2 if self.depth_mode == "full" else 3)
        kw = dict(eps=basics.eps, bias=basics.mlp_bias, dtype=basics.compute_dtype)
        setattr(
            self,
            f"{self.depth_mode}_attn_res_so2",
            depth_attn_res(mode, basics.channels, seed=child_seed(s, 0), **kw),
        )
        setattr(
            self,
            f"{self.depth_mode}_attn_res_ffns",
            nn.ModuleList(
                depth_attn_res(mode, basics.channels, seed=child_seed(s, k + 1), **kw)
                for k in range(n_ffn)
            ),
        )

    def so2_unit(self, x: torch.Tensor, edges: EdgeCache, radial: torch.Tensor) -> torch.Tensor:
        """Update from message passing, ``(N, D_node, 1, C)``; rows above the MP degree are 0."""
        n, c = x.shape[0], x.shape[-1]
        x_mp = self.pre_so2_norm(x[:, : self.mp_dim])
        y = self.so2_conv(x_mp.reshape(n, self.mp_dim, c), edges, radial)
        y = self.post_so2_norm(y.unsqueeze(2))
        if self.node_dim == self.mp_dim:
            return y
        return torch.cat([y, y.new_zeros(n, self.node_dim - self.mp_dim, 1, c)], dim=1)

    def ffn_unit(self, x: torch.Tensor, k: int, chunks=None) -> torch.Tensor:
        """Update of FFN ``k`` (atom by atom), over the atoms of each chunk when streamed."""
        return stream_nodes(lambda v: self._ffn(v, k), x, chunks=chunks)

    def _ffn(self, x: torch.Tensor, k: int) -> torch.Tensor:
        y = self.post_ffn_norms[k](self.ffns[k](self.pre_ffn_norms[k](x)))
        if self.adam_ffn_layer_scales is not None:
            y = y * self.adam_ffn_layer_scales[k]
        return y

    def forward(self, x: torch.Tensor, edges: EdgeCache, radial: torch.Tensor) -> torch.Tensor:
        """Plain residual path: ``(N, D_node, 1, C) -> (N, D_node, 1, C)``."""
        x = x + self.so2_unit(x, edges, radial)
        for k in range(len(self.ffns)):
            x = x + self.ffn_unit(x, k, edges.atom_chunks)
        return x

    def forward_with_history(
        self, x: torch.Tensor, history: list[torch.Tensor], edges: EdgeCache, radial: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Depth-attention path: returns the block output and the sources it adds to the history
        (every unit output for ``full_attn_res``, the block summary for ``block_attn_res``)."""
        units = [lambda v: self.so2_unit(v, edges, radial)]
        units += [
            lambda v, k=k: self.ffn_unit(v, k, edges.atom_chunks) for k in range(len(self.ffns))
        ]
        attns = [
            getattr(self, f"{self.depth_mode}_attn_res_so2"),
            *getattr(self, f"{self.depth_mode}_attn_res_ffns"),
        ]
        if self.depth_mode == "full":
            return full_attn_res_units(x, history, units, attns)
        out, summary = block_attn_res_units(x, history, units, attns)
        return out, [summary]
