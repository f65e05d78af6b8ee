"""LoRA adapters on the equivariant linear maps, and the LoRA fine-tune policy.

Every :class:`SO3Linear` and :class:`SO2Linear` of a model gets a rank-``r`` update of each
of its weight blocks, ``W <- W + s ΔW`` with ``s = alpha / r`` (``alpha`` defaults to ``r``):

    SO3Linear, per degree l:    ΔW_l = (B_l A_l)^T,  A_by_l (L+1, r, C_in) ~ N(0, 1/r),
                                                     B_by_l (L+1, F C_out, r) = 0
    SO2Linear, per |m| block:   ΔW   = (B A)^T,      A_m0 / A_m.{i} (r, n_in) ~ N(0, 1/r),
                                                     B_m0 / B_m.{i} (n_out, r) = 0

so equivariance is kept and the adapted model starts equal to the pretrained one. Names,
shapes and the persistent ``lora_scaling`` buffer are those of DeePMD-kit 3.2. The adapted
forward folds ``s ΔW`` into the weights and runs the base map, so a merged model
(:func:`merged_state_dict`, :func:`fold_lora`) gives the same numbers.

:func:`apply_lora` also sets which parameters train (DeePMD-kit's policy): the adapters, the
fitting net, the radial / environment embeddings, FiLM and depth-attention modules, the
per-block attention, competition and radial-hidden modules, every leaf named in
:data:`TRAINABLE_LEAVES` or containing ``bias``; never ``adam_type_embedding``, ``adam_freqs``
or a :class:`GatedActivation`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .activation import GatedActivation
from .common import child_seed, normal_
from .linear import SO3Linear
from .so2 import SO2Linear

TRAINABLE_MODULES = (
    "fitting_net",
    "dens_fitting_net",
    "descriptor.radial_embedding",
    "descriptor.env_seed_embedding",
    "descriptor.film_scale_norm",
    "descriptor.film_shift_norm",
    "descriptor.final_full_attn_res",
    "descriptor.final_block_attn_res",
)
# per interaction block: depth attention of the block, and small parts of its convolution
TRAINABLE_BLOCK_MODULES = tuple(
    f"{kind}_attn_res_{part}" for kind in ("full", "block") for part in ("so2", "ffns")
) + tuple(
    f"so2_conv.{name}"
    for name in (
        "attn_q_proj", "attn_k_proj", "attn_qk_norm", "attn_output_gate_norm",
        "focus_compete_norm", "radial_hidden_proj", "so2_layer_attn_res",
    )
)  # fmt: skip
# small parameters trained directly under LoRA: norm scales, layer scales, FiLM strengths,
# attention and focus-competition weights
TRAINABLE_LEAVES = frozenset(
    [f"adam_{n}" for n in ("scale", "so2_layer_scales", "ffn_layer_scales")]
    + [f"film_{n}_strength_log" for n in ("scale", "shift")]
    + [f"adamw_attn_{n}" for n in ("logit_w", "z_bias_raw", "gate_w")]
    + ["adamw_focus_compete_w", "adamw_pseudo_query", "focus_compete_bias"]
)
FROZEN_LEAVES = frozenset({"adam_type_embedding", "adam_freqs"})


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


ADAPTERS = (LoRASO3, LoRASO2)


def has_lora(module: nn.Module) -> bool:
    """Whether any sub-module of ``module`` is a LoRA adapter."""
    return any(isinstance(m, ADAPTERS) for m in module.modules())


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, seed=None) -> nn.Module:
    """Wrap every (plain) SO3Linear / SO2Linear of ``model`` in place and apply the trainable /
    frozen policy of the module docstring. Returns ``model``."""
    targets = [(n, m) for n, m in model.named_modules() if type(m) in (SO3Linear, SO2Linear)]
    for i, (name, module) in enumerate(targets):
        parent, _, attr = name.rpartition(".")
        cls = LoRASO3 if isinstance(module, SO3Linear) else LoRASO2
        adapter = cls(module, rank, alpha, seed=child_seed(seed, i))
        model.get_submodule(parent)._modules[attr] = adapter
    model.requires_grad_(False)
    _set_trainable(model)
    return model


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _leaf(name: str) -> str:
    """Last non-numeric part of a parameter name (``foo.scales.0`` -> ``scales``)."""
    parts = name.split(".")
    while len(parts) > 1 and parts[-1].isdigit():
        parts.pop()
    return parts[-1]


def _set_trainable(model: nn.Module) -> None:
    on = [_submodule(model, p) for p in TRAINABLE_MODULES]
    blocks = _submodule(model, "descriptor.blocks") or []
    on += [_submodule(b, p) for b in blocks for p in TRAINABLE_BLOCK_MODULES]
    for module in filter(None, on):
        module.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, ADAPTERS):
            for name, p in module.named_parameters(recurse=True):
                if name.startswith(("A_", "B_")):
                    p.requires_grad_(True)
    for name, p in model.named_parameters():
        leaf = _leaf(name)
        if leaf in TRAINABLE_LEAVES or "bias" in leaf:
            p.requires_grad_(True)
    for name, p in model.named_parameters():
        if _leaf(name) in FROZEN_LEAVES:
            p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, GatedActivation):
            module.requires_grad_(False)


def fold_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a flat state dict with every adapter folded into its base weight and the
    adapter keys (``A_*``, ``B_*``, ``lora_scaling``) removed; ``lora_scaling`` missing
    means ``s = 1``. Keys without adapters pass through unchanged."""
    out = dict(state)
    for key in [k for k in state if _ADAPTER_KEY.fullmatch(k)]:
        prefix, factor = _ADAPTER_KEY.fullmatch(key).groups()
        scale = state.get(prefix + "lora_scaling")
        a, b = out.pop(key), out.pop(prefix + "B" + factor[1:])
        weight = prefix + ("weight" if factor == "A_by_l" else "weight" + factor[1:])
        out[weight] = out[weight] + lora_update(a, b) * (1.0 if scale is None else float(scale))
        out.pop(prefix + "lora_scaling", None)
    return out


#: An adapter's ``A`` factor: ``(module prefix, "A_by_l" | "A_m0" | "A_m.{i}")``.
_ADAPTER_KEY = re.compile(r"(.*?)(A_by_l|A_m0|A_m\.\d+)")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a LoRA model as the plain model it equals (adapters folded), detached."""
    return {k: v.detach().clone() for k, v in fold_lora(model.state_dict()).items()}


def strip_lora(model_params: dict) -> dict:
    """``model_params`` without ``lora`` (also inside each ``model_dict`` branch)."""
    out = dict(model_params)
    out.pop("lora", None)
    if isinstance(out.get("model_dict"), dict):
        out["model_dict"] = {k: strip_lora(v) for k, v in out["model_dict"].items()}
    return out
