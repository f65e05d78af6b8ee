"""RMS normalisations: plain, scalar (per focus), and degree-balanced equivariant.

All run in their parameter dtype (float32 or wider) and return the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..geometry.layout import SphericalLayout, index_tensor


class RMSNorm(nn.Module):
    """``x / rms(x) * scale`` over the last axis ``(..., C)``."""

    def __init__(self, channels: int, *, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.adam_scale = nn.Parameter(torch.ones(channels, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.adam_scale.dtype)
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.adam_scale
        return x.to(in_dtype)


class ScalarRMSNorm(nn.Module):
    """RMS over channels of scalar features ``(B, F, C)`` or ``(B, C)``; scale ``(F, C)``."""

    def __init__(self, channels: int, *, n_focus: int = 1, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.adam_scale = nn.Parameter(torch.ones(n_focus, channels, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.adam_scale.dtype)
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        x = x * (self.adam_scale[0] if x.ndim == 2 else self.adam_scale)
        return x.to(in_dtype)


def _balance_weight(
    layout: SphericalLayout, row_degrees: tuple[int, ...], channels: int, dtype: torch.dtype
) -> torch.Tensor:
    """Row weights ``1 / (n_l (L+1) C)``, ``n_l = 2 min(l, M) + 1`` the orders a degree keeps,
    so that every degree contributes equally to the shared variance."""
    kept = torch.tensor([2 * min(l, layout.mmax) + 1 for l in row_degrees], dtype=torch.float64)
    return (1.0 / (kept * (layout.lmax + 1) * channels)).to(dtype)


def _balanced_rms(x0: torch.Tensor, rest: torch.Tensor, weight: torch.Tensor, dims) -> torch.Tensor:
    """Inverse RMS from a centred scalar slice and the remaining rows, weights per row."""
    var = x0.square().sum(dims) * weight[0]
    if rest.shape[dims[0]] > 0:
        w = weight[1:].view([-1 if d == dims[0] else 1 for d in range(rest.ndim)])
        var = var + (rest.square() * w).sum(dims)
    return var


class EquivariantRMSNorm(nn.Module):
    """Degree-balanced RMS norm of packed features ``(N, D, F, C)``.

    The ``l = 0`` slice is centred over channels; each degree contributes equally to the shared
    variance (row weight ``1 / ((2l+1)(L+1)C)``); then a per-degree scale and an ``l = 0`` bias.
    ``eps = 1`` gives the "unit floor" ``x / sqrt(1 + var)`` that keeps small messages small.
    """

    def __init__(
        self, lmax: int, channels: int, *, n_focus: int = 1, eps: float, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.eps = eps
        self.adam_scale = nn.Parameter(torch.ones(lmax + 1, n_focus, channels, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n_focus, channels, dtype=dtype))
        layout = SphericalLayout.of(lmax)
        self.register_buffer("expand_index", index_tensor(layout.degrees))
        weight = _balance_weight(layout, layout.degrees, channels, dtype)
        self.register_buffer("balance_weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.adam_scale.dtype)
        x0 = x[:, :1] - x[:, :1].mean(-1, keepdim=True)
        rest = x[:, 1:]
        var = _balanced_rms(x0, rest, self.balance_weight, (1, 3))  # (N, F)
        inv = torch.rsqrt(var + self.eps)[:, None, :, None]
        scale = self.adam_scale.index_select(0, self.expand_index)  # (D, F, C)
        out0 = x0 * inv * scale[:1] + self.bias
        out = torch.cat([out0, rest * inv * scale[1:]], dim=1) if rest.shape[1] else out0
        return out.to(in_dtype)


class ReducedEquivariantRMSNorm(nn.Module):
    """The same norm on the m-major reduced layout ``(F, E, D_m, C)`` inside SO(2) convolutions.

    A degree ``l`` keeps ``2 min(l, M) + 1`` orders there; row weights are balanced accordingly.
    """

    def __init__(
        self, lmax: int, mmax: int, channels: int, *, eps: float, dtype: torch.dtype, n_focus: int
    ) -> None:
        super().__init__()
        self.eps = eps
        layout = SphericalLayout.of(lmax, mmax)
        self.register_buffer("degree_index_m", index_tensor(layout.reduced_degrees))
        weight = _balance_weight(layout, layout.reduced_degrees, channels, dtype)
        self.register_buffer("balance_weight", weight)
        self.adam_scale = nn.Parameter(torch.ones(n_focus, lmax + 1, channels, dtype=dtype))
        self.bias0 = nn.Parameter(torch.zeros(n_focus, channels, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.adam_scale.dtype)
        x0 = x[:, :, :1] - x[:, :, :1].mean(-1, keepdim=True)
        rest = x[:, :, 1:]
        var = _balanced_rms(x0, rest, self.balance_weight, (2, 3))  # (F, E)
        inv = torch.rsqrt(var + self.eps)[:, :, None, None]
        scale = self.adam_scale.index_select(1, self.degree_index_m).unsqueeze(1)  # (F,1,Dm,C)
        out0 = x0 * inv * scale[:, :, :1] + self.bias0[:, None, None, :]
        out = torch.cat([out0, rest * inv * scale[:, :, 1:]], dim=2) if rest.shape[2] else out0
        return out.to(in_dtype)
