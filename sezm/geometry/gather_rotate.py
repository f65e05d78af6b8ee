"""Gather node features onto edges and rotate them into the edge frames, in one autograd node.

``y_e = R_e x[src_e]`` with ``x (N, D, C)``, ``src (E,)`` and projected rotation matrices
``R (E, D_m, D)``. Plain autograd keeps the gathered ``x[src] (E, D, C)`` for the gradient
with respect to ``R`` (the force pass needs it); this node keeps the node features and the
indices instead and gathers again in the backward pass, so what it saves is ``E / N`` times
smaller (about 90 neighbours per atom for water at 6 Å). Gradients::

    dL/dx = scatter_add_src(R^T dL/dy),    dL/dR = dL/dy x[src]^T.

The backward pass is written with differentiable operations, so a force loss (which
differentiates the forces again, ``create_graph=True``) passes through it; there the
re-gathered features are kept by the graph of the backward pass, as plain autograd keeps them.
"""

from __future__ import annotations

import torch


class _GatherRotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, src, matrices)
        return torch.bmm(matrices, x.index_select(0, src))  # (E, D_m, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        x, src, matrices = ctx.saved_tensors
        grad_x = grad_matrices = None
        if ctx.needs_input_grad[0]:
            per_edge = torch.bmm(matrices.transpose(1, 2), grad)  # (E, D, C)
            grad_x = torch.zeros_like(x).index_add(0, src, per_edge)
        if ctx.needs_input_grad[2]:
            grad_matrices = torch.bmm(grad, x.index_select(0, src).transpose(1, 2))  # (E, D_m, D)
        return grad_x, None, grad_matrices


def gather_rotate(x: torch.Tensor, src: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``matrices (E, D_m, D) @ x[src]`` for ``x (N, D, C)``, ``src (E,)`` -> ``(E, D_m, C)``,
    saving ``x`` rather than the gathered ``(E, D, C)`` features for the backward pass."""
    if x.shape[1] != matrices.shape[2]:
        raise ValueError(
            f"gather_rotate: features have {x.shape[1]} rows, the matrices {matrices.shape[2]} columns"
        )
    return _GatherRotate.apply(x, src, matrices)


__all__ = ["gather_rotate"]
