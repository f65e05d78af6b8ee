"""Per-edge sparse row combinations in one autograd node: the rotations of degrees ``l <= 1``.

``y[r] = f_r sum_{(k, j) in T_r} c[j] x[k]`` for every edge, with per-edge coefficients
``c (E, J)`` (the flat Wigner block values), rows ``x (E, K, C)`` and a fixed list of terms
``T_r`` and row factors ``f_r``. Forward, a few ``addcmul`` per output row (cheaper on the CPU
than a batched matmul of 4 x 4 matrices). Plain autograd would record every product and keep
one reduction per term for ``dL/dc``; here the backward pass is two operations::

    dL/dx[k] = sum_{(r, j): (k, j) in T_r} f_r c[j] g[r]       (the transposed combination)
    dL/dc    = (g x^T).flatten() @ S,  S[(r, k), j] = f_r for (k, j) in T_r

(one small batched matmul and one GEMM). Both are written with differentiable operations, so a
force loss (``create_graph=True``) differentiates through them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .edge_matmul import tracing


@dataclass(frozen=True)
class RowCombination:
    """A fixed sparse map ``x (E, K, C) -> y (E, R, C)`` with per-edge coefficients ``c (E, J)``.

    ``rows[r] = (f_r, ((k, j), ...))``: output row ``r`` is ``f_r`` times the sum of
    ``c[:, j] * x[:, k]`` over its terms (at least one per row, and per input row).
    """

    rows: tuple[tuple[float, tuple[tuple[int, int], ...]], ...]
    n_in: int  # K
    n_coeffs: int  # J

    @cached_property
    def transposed(self) -> RowCombination:
        """The map ``g (E, R, C) -> (E, K, C)`` with the same coefficients: ``dL/dx``."""
        terms: list[list[tuple[float, int, int]]] = [[] for _ in range(self.n_in)]
        for r, (factor, row_terms) in enumerate(self.rows):
            for k, j in row_terms:
                terms[k].append((factor, r, j))
        rows = []
        for k_terms in terms:  # the factors differ only between degrees, never within a row
            factors = {f for f, _, _ in k_terms}
            if len(factors) != 1:
                raise ValueError("every input row needs terms, all of one row factor")
            rows.append((factors.pop(), tuple((r, j) for _, r, j in k_terms)))
        return RowCombination(tuple(rows), len(self.rows), self.n_coeffs)

    @cached_property
    def _selection_values(self) -> list[float]:
        s = [0.0] * (len(self.rows) * self.n_in * self.n_coeffs)
        for r, (factor, row_terms) in enumerate(self.rows):
            for k, j in row_terms:
                s[(r * self.n_in + k) * self.n_coeffs + j] = factor
        return s

    def selection(self, like: torch.Tensor) -> torch.Tensor:
        """``S ((R * K), J)``: where each entry of ``g x^T`` goes in ``dL/dc`` (made at every
        call, like the rotation's index lists: a constant when the model is traced)."""
        s = torch.tensor(self._selection_values, dtype=like.dtype, device=like.device)
        return s.view(len(self.rows) * self.n_in, self.n_coeffs)

    def __call__(self, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``coeffs (E, J)``, ``x (E, K, C)`` -> ``(E, R, C)``: through one autograd node when
        run eagerly; as plain operations when traced (``torch.compile``, ``sezm freeze``),
        where Inductor fuses the products and their derivatives into its loops (the node's
        row writes and small matmuls would halve the package's speed: 12.0 vs 17.5 MD steps/s,
        tiny, one thread)."""
        if x.shape[1] != self.n_in or coeffs.shape[1] != self.n_coeffs:
            raise ValueError(
                f"row combination of {self.n_in} rows and {self.n_coeffs} coefficients got "
                f"rows {tuple(x.shape)} and coefficients {tuple(coeffs.shape)}"
            )
        if tracing():
            return self.composed(coeffs, x)
        return _Combine.apply(coeffs, x, self)

    def plain(self, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The combination without the node, in its backward: :meth:`written` for a first
        derivative, :meth:`composed` under ``create_graph=True``."""
        if torch.is_grad_enabled():
            return self.composed(coeffs, x)
        return self.written(coeffs, x)

    def written(self, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each output row written in place into one ``(E, R, C)`` tensor (no autograd)."""
        cols = coeffs.unsqueeze(-1).unbind(1)  # (E, 1) each
        xs = x.unbind(1)
        out = x.new_empty(x.shape[0], len(self.rows), x.shape[2])
        for r, (factor, terms) in enumerate(self.rows):
            row = out[:, r]
            (k, j), *rest = terms
            torch.mul(cols[j], xs[k], out=row)
            for k, j in rest:
                row.addcmul_(cols[j], xs[k])
            if factor != 1.0:
                row.mul_(factor)
        return out

    def composed(self, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The combination as differentiable products and a stack of the rows."""
        cols = coeffs.unsqueeze(-1).unbind(1)  # (E, 1) each
        xs = x.unbind(1)
        rows = []
        for factor, terms in self.rows:
            (k, j), *rest = terms
            row = cols[j] * xs[k]  # (E, C)
            for k, j in rest:
                row = torch.addcmul(row, cols[j], xs[k])
            rows.append(row * factor if factor != 1.0 else row)
        return torch.stack(rows, dim=1)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coeffs: torch.Tensor, x: torch.Tensor, plan: RowCombination):
        ctx.save_for_backward(coeffs, x)
        ctx.plan = plan
        return plan.written(coeffs, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        coeffs, x = ctx.saved_tensors
        plan: RowCombination = ctx.plan
        grad_coeffs = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = plan.transposed.plain(coeffs, grad)  # (E, K, C)
        if ctx.needs_input_grad[0]:
            outer = torch.bmm(grad, x.transpose(1, 2))  # (E, R, K)
            grad_coeffs = outer.flatten(1) @ plan.selection(outer)  # (E, J)
        return grad_coeffs, grad_x, None


__all__ = ["RowCombination"]
