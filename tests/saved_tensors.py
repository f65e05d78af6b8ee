"""What autograd keeps for the backward pass: the support of the memory tests."""

from __future__ import annotations

import torch


def saved_elements(fn, *args) -> int:
    """Elements of the floating tensors autograd keeps while ``fn(*args)`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() if t.is_floating_point() else 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total
