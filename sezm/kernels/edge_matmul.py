"""Products of small per-edge matrices, their operands, and whether the model is being traced.

Eagerly, ``(E, I, J) @ (E, J, C)`` is one ``torch.bmm``. Traced for a package (``sezm freeze``)
or by ``torch.compile``, the same product is written as ``J`` broadcast products summed in
order: Inductor fuses them, their derivatives and the gathers around them into its own loops,
where each ``bmm`` would be an external call writing a full ``(E, I, C)`` tensor. A gather +
rotate of DPA4-Mini's shapes (192 atoms, 17,084 edges, ``(7, 9) @ (9, 32)``), forward and both
gradients, compiled: 25.0 ms with ``bmm``, 11.8 ms unrolled (one thread). The matrices are
picked from flat per-edge values (:func:`select_columns`); traced, by a GEMM, whose output
Inductor keeps in memory, where it would inline a gather into every product loop and recompute
it there. Mini's package (192 atoms, one thread): 0.60 -> 0.53 s per evaluation.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode


def tracing() -> bool:
    """Whether the operations run now are recorded for a compiler (``torch.compile``, or
    ``make_fx`` as ``sezm freeze`` traces the model) rather than executed."""
    return torch.compiler.is_compiling() or get_proxy_mode() is not None


class _ContiguousGradient(torch.autograd.Function):
    """The identity, whose gradient leaves contiguous.

    In a second derivative (a force loss), the gradient that reaches ``b`` through the product's
    own gradient ``dL/da = g @ b^T`` comes out as the transpose of a ``(E, C, J)`` product;
    every element-wise step of the mixing stack's backward pass then reads it with a stride of
    ``J`` (DPA4-Mini's training step: 8 % of its time). One copy here keeps them contiguous.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def edge_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (E, I, J) @ b (E, J, C) -> (E, I, C)``: ``torch.bmm`` (the gradient reaching ``b``
    contiguous), or unrolled over ``J`` when traced (the sum in the order of ``J``; the same
    values up to float rounding)."""
    if not tracing():
        return torch.bmm(a, _ContiguousGradient.apply(b) if b.requires_grad else b)
    out = a[:, :, :1] * b[:, None, 0]
    for j in range(1, a.shape[2]):
        out = out + a[:, :, j : j + 1] * b[:, None, j]
    return out


def select_columns(
    values: torch.Tensor, columns: list[int], factors: list[float] | None = None
) -> torch.Tensor:
    """``values (E, n) -> (E, len(columns))``: column ``columns[i]`` of ``values`` (zero where it
    is ``n``), times ``factors[i]`` if given. An index gather, or traced the product with the
    fixed ``(n, len(columns))`` map (the same values)."""
    n = values.shape[1]
    if tracing():
        factors = factors or [1.0] * len(columns)
        selection = [[f * (c == v) for c, f in zip(columns, factors)] for v in range(n)]
        return values @ values.new_tensor(selection)
    padded = torch.nn.functional.pad(values, (0, 1))  # (E, n + 1): the last column is zero
    picked = padded.index_select(1, torch.tensor(columns, device=values.device))
    return picked if factors is None else picked * values.new_tensor(factors)


__all__ = ["edge_matmul", "select_columns", "tracing"]
