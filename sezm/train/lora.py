"""The LoRA fine-tune: wrapping a model's linear maps in adapters, which parameters train, and
folding the adapters back into plain weights.

:func:`apply_lora` wraps every plain :class:`SO3Linear` / :class:`SO2Linear` in its adapter
(:mod:`sezm.train.lora_adapters`) and sets which parameters train (DeePMD-kit's policy): the adapters, the
fitting net, the radial / environment embeddings, FiLM and depth-attention modules, the
per-block attention, competition and radial-hidden modules, every leaf named in
:data:`TRAINABLE_LEAVES` or containing ``bias``; never ``adam_type_embedding``, ``adam_freqs``
or a :class:`GatedActivation`. :func:`fold_lora` and :func:`merged_state_dict` give the plain
model a LoRA model equals.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..nn.activation import GatedActivation
from ..nn.common import child_seed
from ..nn.linear import SO3Linear
from ..nn.so2 import SO2Linear
from .lora_adapters import LoRASO2, LoRASO3, lora_update

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
