"""Gather node features onto edges and rotate them into the edge frames, in one autograd node.

``y_e = R_e x[src_e]`` with ``x (N, D, C)``, ``src (E,)`` and projected rotation matrices
``R (E, D_m, D)``. Plain autograd keeps the gathered ``x[src] (E, D, C)`` for the gradient
with respect to ``R`` (the force pass needs it); this node keeps the node features and the
indices instead and gathers again in the backward pass, so what it saves is ``E / N`` times
smaller (about 90 neighbours per atom for water at 6 Å). Gradients, with ``g = dL/dy``::

    dL/dx = scatter_add_src(R^T g),    dL/dR = g x[src]^T.

The backward pass is itself one autograd node (:class:`_GatherRotateGrad`), so a force loss,
which differentiates the forces again (``create_graph=True``), passes through it; that node
keeps ``g``, ``x``, ``R`` and the indices, not the re-gathered rows nor the per-edge
``R^T g``. Its own derivatives, for incoming ``a = dL'/d(dL/dx) (N, D, C)`` and
``b = dL'/d(dL/dR) (E, D_m, D)``::

    d/dg = R a[src] + b x[src],    d/dx = scatter_add_src(b^T g),    d/dR = g a[src]^T.

Under autocast the forward product runs in the lower precision and so does every product of
the backward passes (in the incoming gradient's dtype); sums over edges and each gradient are
in the dtype of what it differentiates, as plain autograd of the cast operands would give.
"""

from __future__ import annotations

import torch

from .edge_matmul import edge_matmul, tracing
from .gather_scatter import gather_rows, scatter_rows, take_rows


class _GatherRotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, src, matrices)
        return torch.bmm(matrices, take_rows(x, src))  # (E, D_m, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        x, src, matrices = ctx.saved_tensors
        grad_x, grad_matrices = _GatherRotateGrad.apply(grad, x, src, matrices)
        return grad_x, None, grad_matrices


class _GatherRotateGrad(torch.autograd.Function):
    """``(g, x, src, R) -> (dL/dx, dL/dR)`` of :class:`_GatherRotate`."""

    @staticmethod
    def forward(ctx, grad, x, src, matrices) -> tuple:
        ctx.save_for_backward(grad, x, src, matrices)
        dtype = grad.dtype  # the forward product's: bfloat16 under autocast
        per_edge = torch.bmm(matrices.transpose(1, 2).to(dtype), grad)  # (E, D, C)
        grad_x = scatter_rows(per_edge.to(x.dtype), src, x.shape[0])  # (N, D, C)
        x_src = take_rows(x.to(dtype), src).transpose(1, 2)  # (E, C, D)
        grad_matrices = torch.bmm(grad, x_src)  # (E, D_m, D)
        return grad_x, grad_matrices.to(matrices.dtype)

    @staticmethod
    def backward(ctx, grad_grad_x, grad_grad_matrices) -> tuple:
        grad, x, src, matrices = ctx.saved_tensors
        dtype = grad.dtype
        d_grad = d_x = d_matrices = None
        if grad_grad_x is not None:
            a_src = gather_rows(grad_grad_x.to(dtype), src)  # (E, D, C)
            d_grad = torch.bmm(matrices.to(dtype), a_src)
            d_matrices = torch.bmm(grad, a_src.transpose(1, 2)).to(matrices.dtype)
        if grad_grad_matrices is not None:
            b = grad_grad_matrices.to(dtype)  # (E, D_m, D)
            from_b = torch.bmm(b, gather_rows(x.to(dtype), src))  # (E, D_m, C)
            d_grad = from_b if d_grad is None else d_grad + from_b
            per_edge = torch.bmm(b.transpose(1, 2), grad)  # (E, D, C)
            d_x = scatter_rows(per_edge.to(x.dtype), src, x.shape[0])
        return d_grad, d_x, None, d_matrices


def gather_rotate(x: torch.Tensor, src: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``matrices (E, D_m, D) @ x[src]`` for ``x (N, D, C)``, ``src (E,)`` -> ``(E, D_m, C)``,
    saving ``x`` rather than the gathered ``(E, D, C)`` features for the backward pass; traced,
    the plain gather and product, which Inductor fuses (:mod:`~sezm.kernels.edge_matmul`)."""
    if x.shape[1] != matrices.shape[2]:
        raise ValueError(
            f"gather_rotate: features have {x.shape[1]} rows, the matrices {matrices.shape[2]} columns"
        )
    if tracing():
        return edge_matmul(matrices, gather_rows(x, src))
    return _GatherRotate.apply(x, src, matrices)


__all__ = ["gather_rotate"]
