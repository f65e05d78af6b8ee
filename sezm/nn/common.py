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


# Seeds. A module's ``seed`` is ``None`` (draw from the global RNG), an int, or a list of ints
# built by :func:`child_seed`; a list is folded into one 64-bit integer by the integer hash of
# NumPy's ``SeedSequence`` (the variant DeePMD-kit uses), so that a model section and its seeds
# give DeePMD-kit's initial weights draw for draw.
_U64 = (1 << 64) - 1
_HASH_MULT = 0x43B0D7E5  # SeedSequence's INIT_A: xor-ed in and multiplied by
_MIX_LEFT, _MIX_RIGHT = 0xCA01F9DD, 0x4973F715  # SeedSequence's MIX_MULT_L / MIX_MULT_R
_MIX_SHIFT = 16


def _avalanche(x: int) -> int:
    x &= _U64
    return x ^ (x >> _MIX_SHIFT)


def fold_seed(entropy: list[int]) -> int:
    """One 64-bit seed from a list of ints: each word hashed as ``(w xor K) * K``, then combined
    left to right as ``L * acc - R * word`` (mod 2**64), every step followed by an xor-shift."""
    words = [_avalanche((int(w) ^ _HASH_MULT) * _HASH_MULT) for w in entropy]
    acc = words[0]
    for word in words[1:]:
        acc = _avalanche(_MIX_LEFT * acc - _MIX_RIGHT * word)
    return acc


def make_generator(seed: int | list[int] | None) -> torch.Generator | None:
    """CPU generator of a module seed (``None`` -> the global RNG)."""
    if seed is None:
        return None
    value = fold_seed(list(seed)) if isinstance(seed, (list, tuple)) else int(seed)
    return torch.Generator().manual_seed(value)


def child_seed(seed: int | list[int] | None, index: int) -> list[int] | None:
    """Seed of the ``index``-th sub-module: the index put in front of the parent's words."""
    if seed is None:
        return None
    parent = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
    return [int(index), *parent]


# Initialisers. Each draws straight into the weight, in the weight's dtype, from a generator of
# its own seed (or the one passed in): the draws, and so the weights, depend on the dtype.


def _draw(seed_or_gen) -> torch.Generator | None:
    if isinstance(seed_or_gen, torch.Generator):
        return seed_or_gen
    return make_generator(seed_or_gen)


def trunc_normal_fan_(weight: torch.Tensor, seed, scale: float = 1.0) -> None:
    """Truncated normal (±3σ) with ``σ = scale / sqrt(fan_in + fan_out)`` on a 2-D view.

    Drawn by inverting the normal CDF on ``u ~ U(2Φ(-3) - 1, 2Φ(3) - 1)``: ``σ √2 erfinv(u)``,
    clamped to ±3σ. One uniform per entry, whatever the torch version (torch >= 2.13's own
    ``trunc_normal_`` rejection-samples, which would change every initial weight).
    """
    std = scale / math.sqrt(weight.shape[-2] + weight.shape[-1])
    lo, hi = (2.0 * (1.0 + math.erf(z / math.sqrt(2.0))) / 2.0 - 1.0 for z in (-3.0, 3.0))
    with torch.no_grad():
        weight.uniform_(lo, hi, generator=_draw(seed))
        weight.erfinv_().mul_(std * math.sqrt(2.0)).clamp_(min=-3 * std, max=3 * std)


def normal_(weight: torch.Tensor, std: float, seed, mean: float = 0.0) -> None:
    """``N(mean, std^2)``; ``seed`` may be a generator to continue drawing from."""
    with torch.no_grad():
        weight.normal_(mean, std, generator=_draw(seed))


def uniform_(weight: torch.Tensor, bound: float, seed) -> None:
    """``U(-bound, bound)``."""
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=_draw(seed))


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
            self.init_normal(make_generator(seed))
        elif init != "zeros":
            raise ValueError(f"unknown init {init!r}")

    def init_normal(self, gen: torch.Generator | None) -> None:
        """From one generator: the matrix ``N(0, 1/(n_in + n_out))``, then the bias ``N(0, 1)``."""
        n_in, n_out = self.matrix.shape
        normal_(self.matrix, 1.0 / math.sqrt(n_in + n_out), gen)
        if self.bias is not None:
            normal_(self.bias, 1.0, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        y = F.linear(x.to(self.matrix.dtype), self.matrix.t(), self.bias)
        return self.act(y).to(in_dtype)
