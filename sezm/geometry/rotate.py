"""Rotating packed features into the edge frame (m-major, ``|m| <= M``) and back.

The Wigner-D matrix is block diagonal; a truncated frame keeps ``2 min(l, M) + 1`` rows per
degree. Per edge only the flat block values ``(E, sum (2l+1)^2)`` are stored; each forward
derives its operands from them, by one of two strategies (equal up to rounding):

* ``L <= 1``: each output row is the short sum over its degree block of ``(E, 1) * (E, C)``
  products, in one autograd node (:mod:`sezm.kernels.row_combination`): cheaper on the CPU
  than a batched matmul of 4x4 matrices;
* ``L >= 2``: one batched matmul with projected ``(E, D_m, D)`` matrices gathered from the block
  values (zeros from one pad column): faster than per-degree matmuls or element-wise sums
  (``benchmarks/RESULTS.md``, "Rotation layouts"); traced (a package, ``torch.compile``),
  unrolled products that Inductor fuses (:mod:`sezm.kernels.edge_matmul`).

Rotating gathered node features (:meth:`EdgeRotation.gather_to_local`) keeps the node features
and edge indices for the backward pass, not the gathered rows (:mod:`sezm.kernels.gather_rotate`);
the scatter after the rotate-back keeps only the index (:mod:`sezm.kernels.gather_scatter`).
Under :func:`sezm.kernels.fused_rotation` (``DP_TRITON_INFER`` on CUDA) both directions run
Triton kernels on the flat block values (:mod:`sezm.kernels.rotation_triton`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import edge_matmul, fused_rotation_for, select_columns
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

        def entry(p_row: int, p_col: int) -> int:  # flat index of D[p_row, p_col]; n_values: a zero
            position = layout.wigner_entry(p_row, p_col)
            return self.n_values if position is None else position

        # dense operands: columns of the values (n_values: a zero) of the projected
        # to_local (D_m, D) and to_global (D, D_m) = gain * to_local^T, row-major
        self.local_entries = [entry(p, k) for p in self.rows for k in range(dim)]
        self.global_entries = [entry(q, p) for p in range(dim) for q in self.rows]
        self.global_gains = [gains[p] for p in range(dim) for _ in range(n_local)]
        # sparse: local row r = sum over packed cols k of its degree: D[rows[r], k] * x[k];
        # packed row p = gain(l) * sum over local rows r of degree l: D[rows[r], p] * y[r]
        same = [[k for k in range(dim) if degree[k] == degree[p]] for p in range(dim)]
        local = tuple((1.0, tuple((k, entry(p, k)) for k in same[p])) for p in self.rows)
        back = tuple(
            (gains[p], tuple((r, entry(q, p)) for r, q in enumerate(self.rows) if q in same[p]))
            for p in range(dim)
        )
        self.local_plan = RowCombination(local, n_in=dim, n_coeffs=self.n_values)
        self.global_plan = RowCombination(back, n_in=n_local, n_coeffs=self.n_values)

    def matrices(self, blocks: torch.Tensor) -> tuple:
        """Per-forward operands: the block values of degrees ``<= lmax`` ``(E, nnz)`` (sparse),
        or the projected ``to_local (E, D_m, D)`` and gain-scaled ``to_global (E, D, D_m)``
        matrices; under the fused-rotation switch, the block values alone."""
        if fused_rotation_for(blocks):
            return FusedOperands(blocks)
        values = blocks[:, : self.n_values]  # (E, nnz)
        if self.sparse:
            return (values,)
        n_edge, dim, n_local = blocks.shape[0], so3_dim(self.lmax), len(self.rows)
        local = select_columns(values, self.local_entries)
        back = select_columns(values, self.global_entries, self.global_gains)
        return local.view(n_edge, n_local, dim), back.view(n_edge, dim, n_local)

    def to_local(self, ops: tuple, x: torch.Tensor) -> torch.Tensor:
        """``x (E, D, C)`` global -> ``(E, D_m, C)`` in the edge frame."""
        x = x[:, : so3_dim(self.lmax)]
        if isinstance(ops, FusedOperands):
            from ..kernels.rotation_triton import to_local

            return to_local(ops.blocks, x, self.lmax, self.mmax)
        if not self.sparse:
            return edge_matmul(ops[0], x)
        return self.local_plan(ops[0], x)

    def gather_to_local(
        self, ops: tuple, x: torch.Tensor, index: torch.Tensor, mix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`to_local` of rows ``x[index]`` (``x (N, D, C)``, ``index (E,)``), times
        ``mix (E, D_m, D_m)`` if given. The matmul path saves ``x``, not the gathered rows
        (:func:`~sezm.kernels.gather_rotate.gather_rotate`), ``mix`` folded into its matrices;
        the others gather with an index-only node (:mod:`sezm.kernels.gather_scatter`)."""
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
            return edge_matmul(matrix, y)
        coeffs = ops[0] if weight is None else ops[0] * weight  # (E, nnz)
        return self.global_plan(coeffs, y)


__all__ = ["EdgeRotation", "FusedOperands"]
