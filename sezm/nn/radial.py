"""Radial functions of the edge length: cutoff envelope, radial basis, radial MLP, bridging.

All are smooth (C^3 or better) so forces and their derivatives stay continuous in MD.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from .common import Dense, activation, child_seed
from .norm import RMSNorm


def c3_envelope(r: torch.Tensor, rcut: float, p: int) -> torch.Tensor:
    """C^3 polynomial cutoff ``u^4 * sum_{k<p} C(k+3, 3) x^k`` with ``x = r/rcut``, ``u = 1 - x``.

    Equal to 1 at r = 0; value and first three derivatives vanish at ``rcut``; 0 beyond.
    Larger ``p`` keeps it near 1 for longer.
    """
    u = ((rcut - r) / rcut).clamp(0.0, 1.0)
    x = 1.0 - u
    series = torch.full_like(x, float(math.comb(p + 2, 3)))
    for k in range(p - 2, -1, -1):
        series = math.comb(k + 3, 3) + x * series
    return u.pow(4) * series


class RadialBasis(nn.Module):
    """Radial basis times the C^3 envelope: ``(E, 1) -> (E, n_radial)``.

    bessel: ``sin(w_n r) / r`` written as ``w_n sinc(w_n r / pi)``, ``w_n`` init ``n pi / rcut``;
    gaussian: ``exp(-(r - mu_n)^2 / (2 sigma^2))``, ``mu_n`` init on ``linspace(0, rcut)``,
    ``sigma = rcut / (n-1)``. Frequencies / centres are trainable (``adam_freqs``).
    """

    def __init__(
        self, rcut: float, basis_type: str, n_radial: int, exponent: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.rcut, self.exponent, self.basis_type = rcut, exponent, basis_type
        # computed in the parameter's dtype, as the reference does, so float32 values agree
        if basis_type == "bessel":
            init = torch.arange(1, n_radial + 1, dtype=dtype) * (math.pi / rcut)
        elif basis_type == "gaussian":
            init = torch.linspace(0.0, rcut, n_radial, dtype=dtype)
        else:
            raise ValueError(f"basis_type must be 'bessel' or 'gaussian', got {basis_type!r}")
        self.adam_freqs = nn.Parameter(init.view(1, n_radial))
        width = rcut / max(n_radial - 1, 1)
        self.gaussian_coeff = -0.5 / (width * width)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        if self.basis_type == "bessel":
            raw = self.adam_freqs * torch.sinc(r * self.adam_freqs / math.pi)
        else:
            raw = torch.exp((r - self.adam_freqs).square() * self.gaussian_coeff)
        return raw * c3_envelope(r, self.rcut, self.exponent)


class RadialMLP(nn.Module):
    """Bias-free MLP on the radial basis; hidden layers ``[RMSNorm] -> activation``.

    Layers live in ``net`` at the indices a ``Sequential`` of (dense, [norm], act, ...) gives,
    which is the checkpoint layout.
    """

    def __init__(
        self,
        sizes: list[int],
        *,
        activation_function: str,
        radial_norm: bool,
        dtype: torch.dtype,
        seed=None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(Dense(n_in, n_out, bias=False, dtype=dtype, seed=child_seed(seed, i)))
            if i < len(sizes) - 2:
                if radial_norm:
                    layers.append(RMSNorm(n_out, eps=1e-7, dtype=dtype))
                layers.append(activation(activation_function))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _transition(r: torch.Tensor, r_inner: float, r_outer: float) -> torch.Tensor:
    return ((r - r_inner) / (r_outer - r_inner)).clamp(0.0, 1.0)


class InnerClamp(nn.Module):
    """Distance seen by the descriptor under ZBL bridging: frozen below ``r_inner``.

    ``r~ = r_in + (r_out - r_in) h(t)`` for ``r < r_out`` with ``h = 20t^4 - 45t^5 + 36t^6 - 10t^7``
    (``h(0)=0, h(1)=1, h'(1)=1``, C^3 at both ends), ``r~ = r`` beyond ``r_out``.
    """

    def __init__(self, r_inner: float, r_outer: float) -> None:
        super().__init__()
        if not 0 < r_inner < r_outer:
            raise ValueError(
                f"need 0 < bridging_r_inner < bridging_r_outer, got {r_inner}, {r_outer}"
            )
        self.r_inner, self.r_outer = r_inner, r_outer

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        t = _transition(r, self.r_inner, self.r_outer)
        h = t.pow(4) * (20.0 + t * (-45.0 + t * (36.0 - 10.0 * t)))
        inside = self.r_inner + (self.r_outer - self.r_inner) * h
        return torch.where(r >= self.r_outer, r, inside)


class BridgingSwitch(nn.Module):
    """C^3 switch ``s(t) = 35t^4 - 84t^5 + 70t^6 - 20t^7``: 0 below ``r_inner``, 1 above ``r_outer``."""

    def __init__(self, r_inner: float, r_outer: float) -> None:
        super().__init__()
        self.r_inner, self.r_outer = r_inner, r_outer

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        t = _transition(r, self.r_inner, self.r_outer)
        return t.pow(4) * (35.0 + t * (-84.0 + t * (70.0 - 20.0 * t)))
