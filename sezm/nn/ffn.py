"""Equivariant feed-forward network: ``SO3Linear -> non-linearity -> SO3Linear (zero-init)``."""

from __future__ import annotations

import torch
from torch import nn

from .activation import GatedActivation
from .common import child_seed, compute_dtype_of
from .grid import resolve_s2_full_grid_resolution
from .grid_net import S2GridNet, SO3GridNet
from .linear import SO3Linear
from .options import GridOp


class EquivariantFFN(nn.Module):
    """``y = W_2 act(W_1 x)`` on packed features ``(N, D, F=1, C)``, per-degree ``W_1``, ``W_2``.

    The non-linearity, by precedence:

    * ``ffn_so3_grid``: :class:`SO3GridNet` (self mode, ``K = 2 kmax + 1`` frames), ``W_1``
      emits ``2 K H`` channels, ``W_2`` takes ``K H``;
    * ``s2_activation``: :class:`S2GridNet` (self mode; Lebedev if ``lebedev_quadrature``, else
      the square e3nn grid), ``W_1`` emits ``2H``;
    * otherwise :class:`GatedActivation`, GLU (``W_1`` emits ``[val | gate]``, ``2H``) or plain.

    Grid op: ``branch`` if ``grid_branch > 0``, else ``mlp`` if ``grid_mlp``, else ``glu``.
    ``so3_linear_2`` starts at zero, so a fresh FFN residual is the identity.
    """

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        channels: int,
        hidden_channels: int,
        lmax: int,
        mlp_bias: bool = False,
        activation_function: str = "silu",
        glu_activation: bool = True,
        ffn_so3_grid: bool = False,
        kmax: int = 1,
        s2_activation: bool = False,
        lebedev_quadrature: bool = False,
        grid_mlp: bool = False,
        grid_branch: int = 0,
        seed=None,
    ) -> None:
        super().__init__()
        if kmax < 0 or grid_branch < 0:
            raise ValueError("kmax and grid_branch must be non-negative")
        compute_dtype = compute_dtype_of(dtype)
        use_grid = s2_activation or ffn_so3_grid
        n_frames = 2 * kmax + 1 if ffn_so3_grid else 1
        self.use_grid, self.glu_activation = use_grid, glu_activation
        width = 2 * n_frames * hidden_channels if use_grid or glu_activation else hidden_channels
        self.so3_linear_1 = SO3Linear(
            lmax, channels, width, dtype=dtype, mlp_bias=mlp_bias, seed=child_seed(seed, 0)
        )
        common = dict(
            lmax=lmax,
            channels=hidden_channels,
            dtype=compute_dtype,
            mlp_bias=mlp_bias,
            seed=child_seed(seed, 1),
        )
        if use_grid:
            op_type = GridOp(grid_mlp, grid_branch).op_type
            grid = dict(common, mode="self", op_type=op_type, grid_branches=max(1, grid_branch))
            self.act: nn.Module = (
                SO3GridNet(kmax=kmax, **grid) if ffn_so3_grid else _s2_net(lebedev_quadrature, grid)
            )
        else:
            self.act = GatedActivation(activation_function=activation_function, **common)
        self.so3_linear_2 = SO3Linear(
            lmax,
            n_frames * hidden_channels,
            channels,
            dtype=dtype,
            mlp_bias=mlp_bias,
            seed=child_seed(seed, 2),
            init_std=0.0,
        )

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
