"""RMS normalisations: plain, scalar (per focus), and degree-balanced equivariant.

All run in their parameter dtype (float32 or wider) and return the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..geometry.layout import degree_of_rows


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
        degrees = degree_of_rows(lmax)
        self.register_buffer("expand_index", degrees)
        weight = 1.0 / ((2 * degrees + 1).to(torch.float64) * (lmax + 1) * channels)
        self.register_buffer("balance_weight", weight.to(dtype))

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
        self,
        lmax: int,
        mmax: int,
        channels: int,
        row_degrees: torch.Tensor,
        *,
        eps: float,
        dtype: torch.dtype,
        n_focus: int = 1,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("degree_index_m", row_degrees.to(torch.long))
        kept = 2 * torch.clamp(self.degree_index_m, max=mmax) + 1
        weight = 1.0 / (kept.to(torch.float64) * (lmax + 1) * channels)
        self.register_buffer("balance_weight", weight.to(dtype))
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
