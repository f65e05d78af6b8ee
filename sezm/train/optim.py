"""Optimizers from a normalized ``optimizer`` section, the per-step learning rate and gradient
clipping.

The trainer builds the optimizer once, then every step: ``set_lr(opt, schedule.value(step))``,
backward, ``clip_grad_norm`` (if ``gradient_max_norm > 0``), ``opt.step()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .muon import AdaMuon, HybridMuon

SUPPORTED = ("Adam", "AdamW", "AdaMuon", "HybridMuon")


def build_optimizer(
    section: dict[str, Any], model: nn.Module, lr: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizer of a normalized ``optimizer`` section over all parameters of ``model``.

    * ``Adam``/``AdamW``: ``torch.optim`` in one group over every parameter, betas
      ``(adam_beta1, adam_beta2)``, ``eps = 1e-8``, ``weight_decay`` as an L2 gradient term
      (Adam) or decoupled (AdamW) on all parameters; fused kernels when the model is on CUDA.
    * ``HybridMuon``: :class:`~sezm.train.muon.HybridMuon`, routed by parameter name
      (``flash_muon`` is accepted and has no effect).
    * ``AdaMuon``: :class:`~sezm.train.muon.AdaMuon`.

    ``lr`` is only the initial rate: the trainer sets it every step with :func:`set_lr`.
    ``LKF`` (the Kalman-filter optimizer) raises :class:`NotImplementedError`.
    """
    kind = section["type"]
    if kind == "LKF":
        raise NotImplementedError(
            "optimizer type 'LKF' (layer-wise Kalman filter) is not supported; "
            f"use one of {', '.join(SUPPORTED)}"
        )
    if kind not in SUPPORTED:
        raise ValueError(f"unknown optimizer type {kind!r}; use one of {', '.join(SUPPORTED)}")
    betas = (float(section["adam_beta1"]), float(section["adam_beta2"]))
    common = dict(lr=lr, weight_decay=float(section["weight_decay"]))
    if kind in ("Adam", "AdamW"):
        params = list(model.parameters())
        fused = bool(params) and all(p.is_cuda for p in params)
        cls = torch.optim.Adam if kind == "Adam" else torch.optim.AdamW
        return cls(params, betas=betas, fused=fused, **common)
    muon = dict(
        adam_betas=betas,
        momentum=float(section["momentum"]),
        lr_adjust=float(section["lr_adjust"]),
        lr_adjust_coeff=float(section["lr_adjust_coeff"]),
        **common,
    )
    if kind == "AdaMuon":
        return AdaMuon(model.parameters(), **muon)
    return HybridMuon(
        model.named_parameters(),
        muon_mode=section["muon_mode"],
        enable_gram=bool(section["enable_gram"]),
        magma_muon=bool(section["magma_muon"]),
        **muon,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Use learning rate ``lr`` in every parameter group from the next step on."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients by ``min(1, max_norm / (|g| + 1e-6))``; return ``|g|``, the global L2
    norm before clipping (float64, no host synchronisation).

    ``|g| = s * |g / s|`` with ``s = max |g_i|`` and the outer sum in float64, so a large but
    finite gradient never overflows to an infinite norm. A non-finite gradient gives a
    non-finite norm for the caller to act on.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params]
    scale = torch.stack(torch._foreach_norm(grads, float("inf"))).max()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    parts = torch._foreach_norm(torch._foreach_div(grads, scale), 2.0)
    norm = scale.double() * torch.linalg.vector_norm(torch.stack(parts).double())
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
