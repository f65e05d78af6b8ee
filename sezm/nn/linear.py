"""Equivariant and channel-only linear maps.

Weights are stored ``(in, out)`` (rows = fan-in), the layout HybridMuon's rectangular scaling
assumes. Focus streams are folded into the output axis: ``(in, F * out)``, focus-major.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..geometry.layout import SphericalLayout, index_tensor
from .common import child_seed, normal_, trunc_normal_fan_, uniform_

#: Seed slot of degree ``l``'s weight: ``DEGREE_SEED + l`` (DeePMD-kit's numbering).
DEGREE_SEED = 1000


def _init_weight(weight: torch.Tensor, n_in: int, seed, init_std: float | None) -> None:
    if init_std is None:
        uniform_(weight, 1.0 / math.sqrt(n_in), seed)
    elif init_std == 0.0:
        nn.init.zeros_(weight)
    else:
        normal_(weight, init_std, seed)


class ChannelLinear(nn.Module):
    """``x @ weight (+ bias)`` on the last axis: ``(..., in) -> (..., out)``."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        dtype: torch.dtype,
        bias: bool = True,
        seed=None,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_in, c_out, dtype=dtype))
        _init_weight(self.weight, c_in, seed, init_std)
        self.bias = nn.Parameter(torch.zeros(c_out, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one GEMM over all leading axes (matmul of a non-contiguous N-D view with a matrix
        # falls back to a batched matmul with the weight repeated per batch)
        y = (x.reshape(-1, x.shape[-1]) @ self.weight).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class FocusLinear(nn.Module):
    """Per-focus linear map: ``(B, F, in) -> (B, F, out)`` with weight ``(in, F * out)``.

    An input with a singleton focus axis is broadcast to all ``F`` streams.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n_focus: int,
        *,
        dtype: torch.dtype,
        bias: bool = True,
        seed=None,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.n_focus = c_in, c_out, n_focus
        self.weight = nn.Parameter(torch.empty(c_in, n_focus * c_out, dtype=dtype))
        _init_weight(self.weight, c_in, seed, init_std)
        self.bias = nn.Parameter(torch.zeros(n_focus * c_out, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.view(self.in_channels, self.n_focus, self.out_channels)
        if self.n_focus == 1 or x.shape[-2] == 1:
            lead = x.shape[:-2]
            y = (x.reshape(-1, self.in_channels) @ self.weight).view(
                *lead, self.n_focus, self.out_channels
            )
        else:
            y = torch.einsum("bfi,ifo->bfo", x, weight)
        if self.bias is not None:
            y = y + self.bias.view(self.n_focus, self.out_channels)
        return y


class SO3Linear(nn.Module):
    """Degree-wise channel mixing ``(N, D, F_in, C_in) -> (N, D, F, C_out)``.

    One ``(C_in, F * C_out)`` matrix per degree, shared by the ``2l+1`` orders of that degree,
    so the map commutes with rotations. With ``mlp_bias`` a bias is added to ``l = 0`` only.
    ``F_in`` is 1 (broadcast to all focus streams) or ``F``.
    """

    def __init__(
        self,
        lmax: int,
        c_in: int,
        c_out: int,
        *,
        dtype: torch.dtype,
        n_focus: int = 1,
        mlp_bias: bool = False,
        seed=None,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.lmax, self.in_channels, self.out_channels, self.n_focus = lmax, c_in, c_out, n_focus
        self.weight = nn.Parameter(torch.empty(lmax + 1, c_in, n_focus * c_out, dtype=dtype))
        if init_std is None:
            for l in range(lmax + 1):
                trunc_normal_fan_(self.weight[l], child_seed(seed, DEGREE_SEED + l))
        else:
            _init_weight(self.weight, c_in, seed, init_std)
        self.bias = nn.Parameter(torch.zeros(n_focus * c_out, dtype=dtype)) if mlp_bias else None
        self.register_buffer("expand_index", index_tensor(SphericalLayout.of(lmax).degrees))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        outs = []
        for l in range(self.lmax + 1):
            x_l = x[:, l * l : (l + 1) ** 2]  # (N, 2l+1, F_in, C_in)
            w_l = self.weight[l]  # (C_in, F * C_out)
            if x_l.shape[2] == 1:
                y = (x_l.reshape(-1, self.in_channels) @ w_l).view(
                    n, 2 * l + 1, self.n_focus, self.out_channels
                )
            else:
                y = torch.einsum(
                    "ndfi,ifo->ndfo", x_l, w_l.view(self.in_channels, self.n_focus, -1)
                )
            outs.append(y)
        if self.bias is not None:
            outs[0] = outs[0] + self.bias.view(1, 1, self.n_focus, self.out_channels)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
