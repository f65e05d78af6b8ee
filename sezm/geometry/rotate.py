"""Rotating packed features into the edge frame (m-major, ``|m| <= M``) and back.

The Wigner-D matrix is block diagonal, and a truncated frame keeps only ``2 min(l, M) + 1`` rows
per degree. Per edge only the flat block values ``(E, sum (2l+1)^2)`` are stored; each forward
derives its operands from them. Two strategies, chosen by size (both give the same numbers up to
rounding):

* ``L <= 1``: each output row is the short sum over its own degree block, as ``(E, 1) * (E, C)``
  products of the block entries accumulated with ``addcmul`` -- a handful of cheap vector ops,
  faster on CPU than a batched matmul of 4x4 matrices -- in one autograd node whose backward
  is the transposed sum and one small matmul (:mod:`sezm.kernels.row_combination`);
* ``L >= 2``: one batched matmul with projected ``(E, D_m, D)`` matrices, gathered in one
  ``index_select`` from the block values (the off-diagonal zeros come from one zero column).

On the CPU one matmul over all degrees is faster than per-degree matmuls or element-wise sums
at ``L >= 2`` (measurements: ``benchmarks/RESULTS.md``, "Rotation layouts").

Rotating gathered node features (:meth:`EdgeRotation.gather_to_local`) keeps the node features
and the edge indices for the backward pass, not the gathered ``(E, D, C)`` rows, and so does
its backward for a force loss's second derivative (:mod:`sezm.kernels.gather_rotate`). The
rotate-back has no such saving: its backward needs the edge-frame messages ``(E, D_m, C)``
themselves; the scatter after it keeps only the index
(:func:`~sezm.kernels.gather_scatter.scatter_rows`).

Under :func:`sezm.kernels.fused_rotation` (``DP_TRITON_INFER`` on CUDA), both directions run
Triton kernels on the flat block values instead (:mod:`sezm.kernels.rotation_triton`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import fused_rotation_for
from ..kernels.gather_rotate import gather_rotate
from ..kernels.gather_scatter import gather_rows
from ..kernels.row_combination import RowCombination
from .layout import SphericalLayout, so3_dim


@dataclass(frozen=True)
class FusedOperands:
    """Operands of the fused (Triton) path: the flat block values ``(E, nnz)`` themselves."""

    blocks: torch.Tensor


class EdgeRotation:
    """Rotation plan for one ``(lmax, mmax)`` over flat Wigner block values ``(E, nnz)``."""

    def __init__(self, lmax: int, mmax: int) -> None:
        self.lmax, self.mmax = lmax, mmax
        self.sparse = lmax <= 1
        layout = SphericalLayout.of(lmax, mmax)
        self.n_values = layout.wigner_offsets[-1]  # flat values of degrees 0..lmax
        self.rows = list(layout.reduced_rows)  # packed row of each local row
        dim, n_local, degree, gains = layout.dim, len(self.rows), layout.degrees, layout.gains

        def entry(p_row: int, p_col: int) -> int:  # flat index of D[p_row, p_col], or the zero pad
            position = layout.wigner_entry(p_row, p_col)
            return self.n_values if position is None else position

        # dense operands: flat positions (into the values + one zero column) of the projected
        # to_local (D_m, D) and to_global (D, D_m) = gain * to_local^T, row-major
        self.local_entries = [entry(p, k) for p in self.rows for k in range(dim)]
        self.global_entries = [entry(q, p) for p in range(dim) for q in self.rows]
        self.global_gains = [gains[p] for p in range(dim) for _ in range(n_local)]
        # sparse: local row r = sum over packed cols k of its degree: D[rows[r], k] * x[k]
        self.local_plan = RowCombination(
            tuple(
                (1.0, tuple((k, entry(p, k)) for k in range(degree[p] ** 2, (degree[p] + 1) ** 2)))
                for p in self.rows
            ),
            n_in=dim,
            n_coeffs=self.n_values,
        )
        # sparse: packed row p = gain(l) * sum over local rows r of degree l: D[rows[r], p] * y[r]
        self.global_plan = RowCombination(
            tuple(
                (
                    gains[p],
                    tuple(
                        (r, entry(q, p)) for r, q in enumerate(self.rows) if degree[q] == degree[p]
                    ),
                )
                for p in range(dim)
            ),
            n_in=n_local,
            n_coeffs=self.n_values,
        )

    def matrices(self, blocks: torch.Tensor) -> tuple:
        """Per-forward operands: the block values of degrees ``<= lmax`` ``(E, nnz)`` (sparse),
        or the projected ``to_local (E, D_m, D)`` and gain-scaled ``to_global (E, D, D_m)``
        matrices; under the fused-rotation switch, the block values alone."""
        if fused_rotation_for(blocks):
            return FusedOperands(blocks)
        if self.sparse:
            return (blocks[:, : self.n_values],)
        n_edge, dim, n_local = blocks.shape[0], so3_dim(self.lmax), len(self.rows)
        padded = torch.nn.functional.pad(blocks[:, : self.n_values], (0, 1))  # (E, nnz + 1)
        device = blocks.device
        local = padded.index_select(1, torch.tensor(self.local_entries, device=device))
        gains = torch.tensor(self.global_gains, dtype=blocks.dtype, device=device)
        back = padded.index_select(1, torch.tensor(self.global_entries, device=device)) * gains
        return local.view(n_edge, n_local, dim), back.view(n_edge, dim, n_local)

    def to_local(self, ops: tuple, x: torch.Tensor) -> torch.Tensor:
        """``x (E, D, C)`` global -> ``(E, D_m, C)`` in the edge frame."""
        x = x[:, : so3_dim(self.lmax)]
        if isinstance(ops, FusedOperands):
            from ..kernels.rotation_triton import to_local

            return to_local(ops.blocks, x, self.lmax, self.mmax)
        if not self.sparse:
            return torch.bmm(ops[0], x)
        return self.local_plan(ops[0], x)

    def gather_to_local(
        self, ops: tuple, x: torch.Tensor, index: torch.Tensor, mix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`to_local` of the rows ``x[index]`` (``x (N, D, C)``, ``index (E,)``), then
        times per-edge matrices ``mix (E, D_m, D_m)`` if given. The batched-matmul path saves
        ``x``, not the gathered ``(E, D, C)`` rows
        (:func:`~sezm.kernels.gather_rotate.gather_rotate`), and multiplies ``mix`` into the
        small rotation matrices instead of the features; the others gather with an index-only
        node (:func:`~sezm.kernels.gather_scatter.gather_rows`)."""
        if isinstance(ops, FusedOperands) or self.sparse:
            local = self.to_local(ops, gather_rows(x, index))
            return local if mix is None else torch.bmm(mix, local)
        matrices = ops[0] if mix is None else torch.bmm(mix, ops[0])  # (E, D_m, D)
        return gather_rotate(x[:, : so3_dim(self.lmax)], index, matrices)

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
        coeffs = ops[0] if weight is None else ops[0] * weight  # (E, nnz)
        return self.global_plan(coeffs, y)


__all__ = ["EdgeRotation", "FusedOperands"]
