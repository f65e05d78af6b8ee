"""Equivariant feed-forward network: ``SO3Linear -> non-linearity -> SO3Linear (zero-init)``."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .activation import GatedActivation
from .common import child_seed
from .grid import resolve_s2_full_grid_resolution
from .grid_net import S2GridNet, SO3GridNet
from .linear import SO3Linear
from .options import FFNOptions, LayerBasics


class EquivariantFFN(nn.Module):
    """``y = W_2 act(W_1 x)`` on packed features ``(N, D, F=1, C)``, per-degree ``W_1``, ``W_2``,
    hidden width ``H = ffn.width(C)``.

    The non-linearity, by precedence:

    * ``so3_grid``: :class:`SO3GridNet` (self mode, ``K = 2 kmax + 1`` frames), ``W_1``
      emits ``2 K H`` channels, ``W_2`` takes ``K H``;
    * ``s2_activation``: :class:`S2GridNet` (self mode; Lebedev with ``lebedev``, else the
      square e3nn grid), ``W_1`` emits ``2H``;
    * otherwise :class:`GatedActivation`, GLU (``W_1`` emits ``[val | gate]``, ``2H``) or plain.

    ``so3_linear_2`` starts at zero, so a fresh FFN residual is the identity.
    """

    def __init__(self, basics: LayerBasics, ffn: FFNOptions, lmax: int, kmax: int, seed) -> None:
        super().__init__()
        c, hidden, bias = basics.channels, ffn.width(basics.channels), basics.mlp_bias
        use_grid = ffn.s2_activation or ffn.so3_grid
        n_frames = 2 * kmax + 1 if ffn.so3_grid else 1
        self.use_grid, self.glu_activation = use_grid, ffn.glu
        width = 2 * n_frames * hidden if use_grid or ffn.glu else hidden
        linear = functools.partial(SO3Linear, lmax, dtype=basics.dtype, mlp_bias=bias)
        self.so3_linear_1 = linear(c, width, seed=child_seed(seed, 0))
        common = dict(
            lmax=lmax,
            channels=hidden,
            dtype=basics.compute_dtype,
            mlp_bias=bias,
            seed=child_seed(seed, 1),
        )
        if use_grid:
            branches = max(1, ffn.grid.branches)
            grid = dict(common, mode="self", op_type=ffn.grid.op_type, grid_branches=branches)
            self.act: nn.Module = (
                SO3GridNet(kmax=kmax, **grid) if ffn.so3_grid else _s2_net(ffn.lebedev, grid)
            )
        else:
            self.act = GatedActivation(activation_function=ffn.activation_function, **common)
        self.so3_linear_2 = linear(n_frames * hidden, c, seed=child_seed(seed, 2), init_std=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D, F, C) -> (N, D, F, C)``."""
        hidden = self.so3_linear_1(x)
        if self.glu_activation and not self.use_grid:  # gated: [value | gate] halves
            hidden = self.act(*hidden.chunk(2, dim=-1))
        else:
            hidden = self.act(hidden)
        return self.so3_linear_2(hidden)


def _s2_net(lebedev: bool, grid: dict) -> S2GridNet:
    """Self-mode S2 grid net on the full (untruncated) grid of the FFN's degree."""
    method = "lebedev" if lebedev else "e3nn"
    resolution = resolve_s2_full_grid_resolution(grid["lmax"], method=method)
    return S2GridNet(grid_resolution_list=resolution, grid_method=method, **grid)
