"""Invariant property head (``fitting_net.type: "property"``) and its output statistics.

Per atom: ``y_i = MLP(x_i) + bias_atom_e[t_i]`` (float64), with ``x_i`` assembled as in
:class:`~sezm.model.fitting.FittingBase`. The model then applies (:func:`property_output`)

    p_i = (y_i · out_std[t_i] + out_bias[t_i]) · m_i      (row 0 of both for all atoms
                                                          when not ``distinguish_types``)
    P   = Σ_i p_i            (extensive)   or   Σ_i p_i / Σ_i m_i   (intensive)

The hidden layers are DeePMD's residual MLP: ``h = act(x W + b)``, ``h ← h · idt`` when
``resnet_dt`` and the width is kept or doubled, then ``h ← h + x`` (same width) or
``h ← h + [x | x]`` (doubled width). DeePMD-kit registers the network list twice
(``filter_layers.networks`` and ``filter_layers._networks``, the same modules), so its state
dicts carry every weight under both names; the same aliasing is reproduced here, which keeps
strict loading exact in both directions while the parameters exist once.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from ..nn.common import Dense, child_seed, make_generator, normal_
from .fitting import FittingBase, FittingOptions

__all__ = ["PropertyFitting", "PropertyFittingOptions", "ResidualDense", "property_output"]


@dataclass(frozen=True, kw_only=True)
class PropertyFittingOptions(FittingOptions):
    """The ``property`` head; ``intensive`` and ``distinguish_types`` are read by
    :func:`property_output`."""

    property_name: str
    task_dim: int
    intensive: bool
    distinguish_types: bool
    resnet_dt: bool


class ResidualDense(Dense):
    """``y = act(x W + b) [· idt] + {x | [x, x] | 0}`` (residual by width, ``idt`` if resnet_dt)."""

    def __init__(
        self, n_in: int, n_out: int, act: str, dtype: torch.dtype, resnet_dt: bool, seed=None
    ) -> None:
        super().__init__(n_in, n_out, activation_function=act, dtype=dtype, init="zeros")
        self.residual = n_out in (n_in, 2 * n_in)
        self.idt = None
        if resnet_dt and self.residual:
            self.idt = nn.Parameter(torch.zeros(n_out, dtype=dtype))
        gen = make_generator(seed)  # matrix, bias, then idt ~ N(0.1, 0.001^2)
        self.init_normal(gen)
        if self.idt is not None:
            normal_(self.idt, 0.001, gen, mean=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.idt is not None:
            y = y * self.idt
        if self.residual:
            y = y + (x if y.shape[-1] == x.shape[-1] else torch.cat([x, x], dim=-1))
        return y


class _MLP(nn.Module):
    """Residual hidden layers then a linear output layer, all under ``layers.{i}``."""

    def __init__(self, n_in, n_out, neuron, act, dtype, resnet_dt, seed) -> None:
        super().__init__()
        widths = [n_in, *neuron]
        layers = [
            ResidualDense(a, b, act, dtype, resnet_dt, child_seed(seed, i))
            for i, (a, b) in enumerate(pairwise(widths))
        ]
        layers.append(Dense(widths[-1], n_out, dtype=dtype, seed=child_seed(seed, len(neuron))))
        self.layers = nn.ModuleList(layers)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[-1](self.hidden(x))


class PropertyFitting(FittingBase):
    """Property head: ``(nf, nloc, dim_descrpt) -> y_i (nf, nloc, task_dim)`` float64.

    ``neuron`` entries ``0`` take the DPA4 auto width (as the DPA4 model builder does for
    property heads). ``intensive`` and ``distinguish_types`` are read by :func:`property_output`.
    """

    def __init__(self, ntypes: int, dim_descrpt: int, opts: PropertyFittingOptions) -> None:
        super().__init__(
            ntypes, dim_descrpt, opts.task_dim, opts, case_in_input=True, aparam_in_input=True
        )
        self.property_name, self.task_dim = opts.property_name, opts.task_dim
        self.intensive, self.distinguish_types = opts.intensive, opts.distinguish_types
        self.remove_vacuum = False
        net = _MLP(
            self.dim_in, opts.task_dim, self.neuron, opts.activation_function, opts.dtype,
            opts.resnet_dt, child_seed(opts.seed, 0),  # the first (and, types mixed, only) network
        )  # fmt: skip
        self.set_networks(net, opts.trainable, alias=True)


def property_output(
    atom_raw: torch.Tensor,
    atype: torch.Tensor,
    atom_mask: torch.Tensor,
    out_bias: torch.Tensor,
    out_std: torch.Tensor,
    *,
    intensive: bool,
    distinguish_types: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output statistics, mask and reduction of the property model (formulas in module docs).

    atom_raw ``(nf, nloc, task_dim)``; lookup-safe atype ``(nf, nloc)``; atom_mask ``(nf, nloc)``
    (real and not excluded); out_bias/out_std ``(1, ntypes, task_dim)``.
    Returns ``(property (nf, task_dim), atom_property (nf, nloc, task_dim))`` in float64.
    """
    bias, std = out_bias[0], out_std[0]  # (ntypes, task_dim)
    rows = atype if distinguish_types else torch.zeros_like(atype)  # type rows, or row 0
    atom = atom_raw * std[rows] + bias[rows]
    atom = atom * atom_mask[..., None].to(atom.dtype)
    total = atom.sum(dim=1)
    if intensive:
        total = total / atom_mask.sum(dim=-1, keepdim=True)
    return total, atom
