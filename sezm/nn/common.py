"""Small shared pieces: activations, dtypes, seeded initialisation, the dense layer.

Parameter names follow the checkpoint format of DeePMD-kit's DPA4 (``matrix``/``bias`` for
dense layers, ``weight`` for equivariant linears), so state dicts map one-to-one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "default": torch.float64,
}


def dtype_of(precision: str) -> torch.dtype:
    """Torch dtype of a DeePMD ``precision`` string."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(
            f"unknown precision {precision!r}; use one of {sorted(PRECISIONS)}"
        ) from None


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Geometry, norms and embeddings never run below float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class SiLUT(nn.Module):
    """SiLU up to ``threshold``, then a tanh continuation with matching value and slope."""

    def __init__(self, threshold: float = 3.0) -> None:
        super().__init__()
        sig = 1.0 / (1.0 + math.exp(-threshold))
        self.threshold = threshold
        self.slope = sig + threshold * sig * (1.0 - sig)
        self.const = threshold * sig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tail = torch.tanh(self.slope * (x - self.threshold)) + self.const
        return torch.where(x >= self.threshold, tail, F.silu(x))


_SIMPLE_ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "linear": nn.Identity,
    "none": nn.Identity,
}


def activation(name: str | None) -> nn.Module:
    """Activation module by DeePMD name (``gelu`` is the tanh approximation, as upstream)."""
    key = (name or "linear").lower()
    if key in ("gelu", "gelu_tf"):
        return nn.GELU(approximate="tanh")
    if key.startswith(("silut", "custom_silu")):
        return SiLUT(float(key.split(":")[1]) if ":" in key else 3.0)
    if key in _SIMPLE_ACTIVATIONS:
        return _SIMPLE_ACTIVATIONS[key]()
    raise ValueError(f"unknown activation function {name!r}")


def make_generator(seed: int | list[int] | None) -> torch.Generator | None:
    """CPU generator seeded from an int or a list of ints (``None`` -> global RNG)."""
    if seed is None:
        return None
    if isinstance(seed, (list, tuple)):
        value = 0
        for s in seed:
            value = (value * 1_000_003 + int(s)) % (2**63 - 1)
        seed = value
    return torch.Generator().manual_seed(int(seed))


def child_seed(seed: int | list[int] | None, index: int) -> list[int] | None:
    """Independent deterministic seed for a sub-module."""
    if seed is None:
        return None
    base = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
    return [*base, int(index)]


def trunc_normal_fan_(weight: torch.Tensor, seed, scale: float = 1.0) -> None:
    """Truncated normal (±3σ) with ``σ = scale / sqrt(fan_in + fan_out)`` on a 2-D view."""
    fan_in, fan_out = weight.shape[-2], weight.shape[-1]
    std = scale / math.sqrt(fan_in + fan_out)
    with torch.no_grad():
        values = torch.empty(weight.shape, dtype=torch.float64)
        nn.init.trunc_normal_(
            values, std=std, a=-3 * std, b=3 * std, generator=make_generator(seed)
        )
        weight.copy_(values)


def normal_(weight: torch.Tensor, std: float, seed) -> None:
    with torch.no_grad():
        values = torch.randn(weight.shape, dtype=torch.float64, generator=make_generator(seed))
        weight.copy_(values * std)


def uniform_(weight: torch.Tensor, bound: float, seed) -> None:
    with torch.no_grad():
        values = torch.rand(weight.shape, dtype=torch.float64, generator=make_generator(seed))
        weight.copy_((2 * values - 1) * bound)


class Dense(nn.Module):
    """``act(x @ matrix + bias)``, with ``matrix`` stored ``(in, out)``.

    Runs in its own dtype and returns the input dtype.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        bias: bool = True,
        activation_function: str | None = None,
        dtype: torch.dtype = torch.float32,
        seed=None,
        init: str = "normal",
    ) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.zeros(n_in, n_out, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=dtype)) if bias else None
        self.act = activation(activation_function)
        if init == "normal":
            normal_(self.matrix, 1.0 / math.sqrt(n_in + n_out), seed)
            if self.bias is not None:
                normal_(self.bias, 1.0, child_seed(seed, 1))
        elif init != "zeros":
            raise ValueError(f"unknown init {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        y = F.linear(x.to(self.matrix.dtype), self.matrix.t(), self.bias)
        return self.act(y).to(in_dtype)
