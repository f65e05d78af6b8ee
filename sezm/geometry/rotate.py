"""Rotating packed features into the edge frame (m-major, ``|m| <= M``) and back.

The Wigner-D matrix is block diagonal, and a truncated frame keeps only ``2 min(l, M) + 1`` rows
per degree. Two strategies, chosen by size (both give the same numbers up to rounding):

* ``L <= 1``: each output row is the short sum over its own degree block, as ``(E, 1) * (E, C)``
  products of the non-zero entries -- a handful of cheap vector ops, faster on CPU than a
  batched matmul of 4x4 matrices;
* ``L >= 2``: one batched matmul with the projected dense ``(E, D_m, D)`` matrices, whose
  per-op cost wins once the blocks grow.

Under :func:`sezm.kernels.fused_rotation` (``DP_TRITON_INFER`` on CUDA), both directions run
Triton kernels on the flat block values instead (:mod:`sezm.kernels.rotation_triton`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import fused_rotation_for
from .layout import m_major_row_list, packed_index, so3_dim


def block_offsets(lmax: int) -> list[int]:
    """Start of each degree's ``(2l+1)^2`` entries in the flat block-diagonal value vector."""
    offsets, start = [], 0
    for l in range(lmax + 1):
        offsets.append(start)
        start += (2 * l + 1) ** 2
    return offsets


@dataclass(frozen=True)
class FusedOperands:
    """Operands of the fused (Triton) path: the flat block values ``(E, nnz)`` themselves."""

    blocks: torch.Tensor


class EdgeRotation:
    """Rotation plan for one ``(lmax, mmax)`` over flat Wigner block values ``(E, nnz)``."""

    def __init__(self, lmax: int, mmax: int) -> None:
        self.lmax, self.mmax = lmax, mmax
        self.sparse = lmax <= 1
        offsets = block_offsets(lmax)
        self.rows = m_major_row_list(lmax, mmax)  # packed row of each local row
        degree = [math.isqrt(p) for p in range(so3_dim(lmax))]

        def entry(p_row: int, p_col: int) -> int:  # flat index of D[p_row, p_col]
            l = degree[p_row]
            n = 2 * l + 1
            return offsets[l] + (p_row - l * l) * n + (p_col - l * l)

        # local row r = sum over packed cols k of its degree: D[rows[r], k] * x[k]
        self.to_local_terms = [
            [(k, entry(p, k)) for k in range(degree[p] ** 2, (degree[p] + 1) ** 2)]
            for p in self.rows
        ]
        # packed row p = gain(l) * sum over local rows r of degree l: D[rows[r], p] * y[r]
        self.to_global_terms = []
        for p in range(so3_dim(lmax)):
            l = degree[p]
            gain = math.sqrt((2 * l + 1) / (2 * mmax + 1)) if l > mmax else 1.0
            terms = [(r, entry(q, p)) for r, q in enumerate(self.rows) if degree[q] == l]
            self.to_global_terms.append((gain, terms))

    def matrices(self, blocks: torch.Tensor) -> tuple:
        """Per-forward operands: ``(E, 1)`` entry columns (sparse), or the dense projected
        ``to_local (E, D_m, D)`` and gain-scaled ``to_global (E, D, D_m)`` matrices; under
        the fused-rotation switch, the block values alone."""
        if fused_rotation_for(blocks):
            return FusedOperands(blocks)
        if self.sparse:
            return tuple(c.unsqueeze(1) for c in blocks.unbind(1))
        dense = dense_from_blocks(blocks[:, : block_offsets(self.lmax + 1)[-1]], self.lmax)
        local = dense.index_select(1, torch.tensor(self.rows, device=blocks.device))
        gain = torch.tensor(
            [g for g, _ in self.to_global_terms], dtype=blocks.dtype, device=blocks.device
        )
        return local, (local.transpose(1, 2) * gain.view(1, -1, 1)).contiguous()

    def to_local(self, ops: tuple, x: torch.Tensor) -> torch.Tensor:
        """``x (E, D, C)`` global -> ``(E, D_m, C)`` in the edge frame."""
        x = x[:, : so3_dim(self.lmax)]
        if isinstance(ops, FusedOperands):
            from ..kernels.rotation_triton import to_local

            return to_local(ops.blocks, x, self.lmax, self.mmax)
        if not self.sparse:
            return torch.bmm(ops[0], x)
        xs = x.unbind(1)
        return torch.stack([_dot(ops, xs, terms) for terms in self.to_local_terms], dim=1)

    def to_global(
        self, ops: tuple, y: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``y (E, D_m, C)`` edge frame -> ``(E, D, C)`` global, truncated degrees rescaled,
        times ``weight (E, 1)`` if given (applied to the matrices, the cheaper side)."""
        if isinstance(ops, FusedOperands):
            from ..kernels.rotation_triton import to_global

            return to_global(ops.blocks, y, self.lmax, self.mmax, weight)
        if not self.sparse:
            matrix = ops[1] if weight is None else ops[1] * weight.view(-1, 1, 1)
            return torch.bmm(matrix, y)
        coeffs = ops if weight is None else tuple(c * weight for c in ops)
        ys = y.unbind(1)
        rows = []
        for gain, terms in self.to_global_terms:
            row = _dot(coeffs, ys, terms)
            rows.append(row * gain if gain != 1.0 else row)
        return torch.stack(rows, dim=1)


def _dot(coeffs: list[torch.Tensor], xs: tuple[torch.Tensor, ...], terms) -> torch.Tensor:
    (k, j), *rest = terms
    out = coeffs[j] * xs[k]
    for k, j in rest:
        out = out + coeffs[j] * xs[k]
    return out


def dense_from_blocks(blocks: torch.Tensor, lmax: int) -> torch.Tensor:
    """Flat block values ``(E, sum (2l+1)^2)`` -> dense block-diagonal ``(E, D, D)``."""
    dim = so3_dim(lmax)
    positions = []
    for l in range(lmax + 1):
        rows = torch.arange(l * l, (l + 1) ** 2)
        positions.append((rows[:, None] * dim + rows[None, :]).reshape(-1))
    flat = blocks.new_zeros(blocks.shape[0], dim * dim)
    flat[:, torch.cat(positions)] = blocks
    return flat.view(-1, dim, dim)


__all__ = ["EdgeRotation", "FusedOperands", "block_offsets", "dense_from_blocks", "packed_index"]
