"""Coefficient-space gated activation.

(The SO(2) mixing stack's alternative, ``s2_activation[0]``, is an S2 grid GLU:
``S2GridNet(mode="self", op_type="glu", coefficient_layout="m_major", mmax=M)``.)
"""

from __future__ import annotations

import torch
from torch import nn

from ..geometry.layout import SphericalLayout, index_tensor
from .common import activation, child_seed
from .linear import FocusLinear

#: Initial std of gate weights: every gate starts near ``sigmoid(0) = 1/2``.
GATE_INIT_STD = 0.01


class GatedActivation(nn.Module):
    """Scalars through ``act``, each degree ``l >= 1`` scaled by its own sigmoid gate.

    Plain:  ``y_0 = act(x_0)``,        ``y_l = x_l * sigmoid(W g)[l]`` with ``g = x_0``;
    GLU:    ``y_0 = x_0 * act(g_0)``,  ``y_l = x_l * sigmoid(W g)[l]`` with ``g = gate_0``
    (``forward(x, gate)``), ``W = gate_linear`` a per-focus ``(C, L*C)`` map. The gate of a row
    is picked through ``expand_index`` (= degree - 1 of rows 1..D-1, packed or, with ``mmax``,
    m-major). Features are ``(N, D, F, C)``.
    """

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        lmax: int,
        mmax: int | None = None,
        channels: int,
        n_focus: int = 1,
        activation_function: str = "silu",
        mlp_bias: bool = False,
        seed=None,
    ) -> None:
        super().__init__()
        self.lmax, self.channels = lmax, channels
        self.scalar_act = activation(activation_function)
        layout = SphericalLayout.of(lmax, mmax)
        degrees = layout.degrees if mmax is None else layout.reduced_degrees
        self.register_buffer("expand_index", index_tensor(degrees[1:]) - 1)
        self.gate_linear: nn.Module = nn.Identity()
        if lmax > 0:
            self.gate_linear = FocusLinear(
                channels,
                lmax * channels,
                n_focus,
                dtype=dtype,
                bias=mlp_bias,
                seed=child_seed(seed, 1),
                init_std=GATE_INIT_STD,
            )

    def _gates(self, source: torch.Tensor) -> torch.Tensor:
        """Per-degree gates ``(N, L, F, C)`` (degrees 1..L) from the scalars
        ``source (N, F, C)``."""
        logits = self.gate_linear(source.to(self.gate_linear.weight.dtype))  # (N, F, L*C)
        gates = torch.sigmoid(logits).unflatten(-1, (self.lmax, self.channels))
        return gates.transpose(1, 2)

    def blocks(self, parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Plain gating of m-major ``|m|`` blocks ``(N, rows_b, F, C)`` kept apart: the ``m = 0``
        block holds the scalar and degrees 1..L in order (its gates are a view), a ``|m|``
        block degrees ``m..L`` twice (``-m``, ``+m``)."""
        x0, x_rest = parts[0].split([1, parts[0].shape[1] - 1], dim=1)
        y0 = self.scalar_act(x0)
        if self.lmax == 0:
            return (y0,)
        gates = self._gates(x0.squeeze(1)).to(x0.dtype)  # (N, L, F, C)
        n, fc = gates.shape[0], gates.shape[2] * gates.shape[3]
        out = [torch.cat([y0, x_rest * gates], dim=1)]
        for part in parts[1:]:  # degrees m..L for -m, then for +m: one gate row per degree
            n_l = part.shape[1] // 2
            gate = gates[:, self.lmax - n_l :].reshape(n, 1, n_l, fc)  # (N, 1, n_l, F*C)
            out.append((part.reshape(n, 2, n_l, fc) * gate).view(part.shape))
        return tuple(out)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """``x (N, D, F, C)`` (and the GLU ``gate``, same shape) -> ``(N, D, F, C)``."""
        # (split, not two narrows: its backward is one concatenation, not two zero-filled copies)
        x0, x_rest = x.split([1, x.shape[1] - 1], dim=1)
        source = x0 if gate is None else gate.narrow(1, 0, 1)
        y0 = self.scalar_act(x0) if gate is None else x0 * self.scalar_act(source)
        if self.lmax == 0:
            return y0
        gates = self._gates(source.squeeze(1)).to(x.dtype)
        gates = gates.index_select(1, self.expand_index)  # (N, D-1, F, C)
        return torch.cat([y0, x_rest * gates], dim=1)
