"""LoRA adapters on the equivariant linear maps.

Every :class:`SO3Linear` and :class:`SO2Linear` of a model gets a rank-``r`` update of each
of its weight blocks, ``W <- W + s ΔW`` with ``s = alpha / r`` (``alpha`` defaults to ``r``):

    SO3Linear, per degree l:    ΔW_l = (B_l A_l)^T,  A_by_l (L+1, r, C_in) ~ N(0, 1/r),
                                                     B_by_l (L+1, F C_out, r) = 0
    SO2Linear, per |m| block:   ΔW   = (B A)^T,      A_m0 / A_m.{i} (r, n_in) ~ N(0, 1/r),
                                                     B_m0 / B_m.{i} (n_out, r) = 0

so equivariance is kept and the adapted model starts equal to the pretrained one. Names,
shapes and the persistent ``lora_scaling`` buffer are those of DeePMD-kit 3.2. The adapted
forward folds ``s ΔW`` into the weights and runs the base map, so a merged model gives the
same numbers. Which parameters train beside the adapters, and folding adapters into plain
weights, belong to fine-tuning (:mod:`sezm.train.lora`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..nn.common import child_seed, normal_
from ..nn.linear import SO3Linear
from ..nn.so2 import SO2Linear


@contextmanager
def _weights_replaced(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Let ``module`` (and its ParameterList children, ``"list.i"``) see ``tensors`` in place
    of the named parameters while the block runs; gradients flow through ``tensors``."""
    saved = []
    for name, value in tensors.items():
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        saved.append((holder, leaf, holder._parameters[leaf]))
        holder._parameters[leaf] = value
    try:
        yield
    finally:
        for holder, leaf, param in saved:
            holder._parameters[leaf] = param


def _factor(rank: int, n_in: int, n_out: int, like: torch.Tensor, seed, lead: tuple = ()):
    """``A (*lead, rank, n_in) ~ N(0, 1/rank)`` and ``B (*lead, n_out, rank) = 0``, with the
    dtype and device of ``like``."""
    a = like.new_empty(*lead, rank, n_in)
    normal_(a, 1.0 / math.sqrt(rank), seed)
    return nn.Parameter(a), nn.Parameter(like.new_zeros(*lead, n_out, rank))


def lora_update(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``ΔW = (B A)^T`` over the last two axes: ``(..., n_in, n_out)``."""
    return torch.einsum("...ri,...or->...io", a, b)


class _LoRA:
    """Shared adapter bookkeeping: rank, scaling and the ``lora_scaling`` buffer."""

    def _init_lora(self, rank: int, alpha: float | None, like: torch.Tensor) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.scaling = (float(rank) if alpha is None else float(alpha)) / self.rank
        self.register_buffer("lora_scaling", like.new_tensor(self.scaling))

    def extra_repr(self) -> str:
        own = f"rank={self.rank}, scaling={self.scaling}"
        return ", ".join(filter(None, [super().extra_repr(), own]))


class LoRASO3(_LoRA, SO3Linear):
    """:class:`SO3Linear` ``W_l + s (B_l A_l)^T`` per degree; base weights copied from ``base``."""

    def __init__(self, base: SO3Linear, rank: int, alpha: float | None = None, seed=None):
        w = base.weight
        SO3Linear.__init__(
            self,
            base.lmax,
            base.in_channels,
            base.out_channels,
            n_focus=base.n_focus,
            dtype=w.dtype,
            mlp_bias=base.bias is not None,
            init_std=0.0,
        )
        self.to(w.device).load_state_dict(base.state_dict())
        self._init_lora(rank, alpha, w)
        lead = (base.lmax + 1,)
        self.A_by_l, self.B_by_l = _factor(self.rank, base.in_channels, w.shape[-1], w, seed, lead)

    def delta(self) -> dict[str, torch.Tensor]:
        """``{"weight": s ΔW}``, ``ΔW (L+1, C_in, F C_out)``."""
        return {"weight": lora_update(self.A_by_l, self.B_by_l) * self.scaling}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = {k: getattr(self, k) + d for k, d in self.delta().items()}
        with _weights_replaced(self, merged):
            return super().forward(x)


class LoRASO2(_LoRA, SO2Linear):
    """:class:`SO2Linear` with ``s (B A)^T`` added to ``weight_m0`` and every ``weight_m.{i}``."""

    def __init__(self, base: SO2Linear, rank: int, alpha: float | None = None, seed=None):
        w0 = base.weight_m0
        SO2Linear.__init__(
            self,
            lmax=base.lmax,
            mmax=base.mmax,
            in_channels=base.in_channels,
            out_channels=base.out_channels,
            n_focus=base.n_focus,
            dtype=w0.dtype,
            mlp_bias=base.bias0 is not None,
            seed=0,  # overwritten below; keeps the global RNG untouched
        )
        self.to(w0.device).load_state_dict(base.state_dict())
        self._init_lora(rank, alpha, w0)
        self.A_m0, self.B_m0 = _factor(self.rank, *w0.shape, w0, child_seed(seed, 0))
        self.A_m, self.B_m = nn.ParameterList(), nn.ParameterList()
        for i, w in enumerate(self.weight_m):
            a, b = _factor(self.rank, *w.shape, w0, child_seed(seed, i + 1))
            self.A_m.append(a)
            self.B_m.append(b)

    def delta(self) -> dict[str, torch.Tensor]:
        """``s (B A)^T`` for ``weight_m0`` and each ``weight_m.{i}``."""
        s = self.scaling
        out = {"weight_m0": lora_update(self.A_m0, self.B_m0) * s}
        for i, (a, b) in enumerate(zip(self.A_m, self.B_m)):
            out[f"weight_m.{i}"] = lora_update(a, b) * s
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = dict(self.named_parameters())
        merged = {k: base[k] + d for k, d in self.delta().items()}
        with _weights_replaced(self, merged):
            return super().forward(x)
