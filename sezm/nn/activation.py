"""Coefficient-space gated activation.

(The SO(2) mixing stack's alternative, ``s2_activation[0]``, is an S2 grid GLU:
``S2GridNet(mode="self", op_type="glu", layout="fndc", coefficient_layout="m_major", mmax=M)``.)
"""

from __future__ import annotations

import torch
from torch import nn

from ..geometry.layout import degree_of_rows, m_major_degrees
from .common import activation, child_seed
from .linear import FocusLinear


class GatedActivation(nn.Module):
    """Scalars through ``act``, each degree ``l >= 1`` scaled by its own sigmoid gate.

    Plain:  ``y_0 = act(x_0)``,        ``y_l = x_l * sigmoid(W g)[l]`` with ``g = x_0``;
    GLU:    ``y_0 = x_0 * act(g_0)``,  ``y_l = x_l * sigmoid(W g)[l]`` with ``g = gate_0``
    (``forward(x, gate)``), ``W = gate_linear`` a per-focus ``(C, L*C)`` map. The gate of a row
    is picked through ``expand_index`` (= degree - 1 of rows 1..D-1, packed or, with ``mmax``,
    m-major). Layouts: ``nfdc (N, F, D, C)``, ``ndfc (N, D, F, C)``, ``fndc (F, N, D, C)``.
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
        layout: str = "nfdc",
        seed=None,
    ) -> None:
        super().__init__()
        if layout not in ("nfdc", "ndfc", "fndc"):
            raise ValueError(f"layout must be 'nfdc', 'ndfc' or 'fndc', got {layout!r}")
        self.lmax, self.channels, self.layout = lmax, channels, layout
        self.scalar_act = activation(activation_function)
        degrees = degree_of_rows(lmax) if mmax is None else m_major_degrees(lmax, mmax)
        self.register_buffer("expand_index", degrees[1:] - 1)
        self.gate_linear: nn.Module = nn.Identity()
        if lmax > 0:
            self.gate_linear = FocusLinear(
                channels,
                lmax * channels,
                n_focus,
                dtype=dtype,
                bias=mlp_bias,
                seed=child_seed(seed, 1),
                init_std=0.01,
            )

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        axis = 1 if self.layout == "ndfc" else 2  # the degree axis
        # (split, not two narrows: its backward is one concatenation, not two zero-filled copies)
        x0, x_rest = x.split([1, x.shape[axis] - 1], dim=axis)
        if gate is None:
            y0, source = self.scalar_act(x0), x0
        else:
            source = gate.narrow(axis, 0, 1)
            y0 = x0 * self.scalar_act(source)
        if self.lmax == 0:
            return y0
        source = source.squeeze(axis)  # (N, F, C), or (F, N, C) for fndc
        if self.layout == "fndc":
            source = source.transpose(0, 1)
        logits = self.gate_linear(source.to(self.gate_linear.weight.dtype))  # (N, F, L*C)
        gates = torch.sigmoid(logits).to(x.dtype).unflatten(-1, (self.lmax, self.channels))
        gates = gates.index_select(2, self.expand_index)  # (N, F, D-1, C)
        if self.layout == "ndfc":
            gates = gates.transpose(1, 2)
        elif self.layout == "fndc":
            gates = gates.transpose(0, 1)
        return torch.cat([y0, x_rest * gates], dim=axis)
