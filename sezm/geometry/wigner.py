"""Real Wigner-D matrices of unit quaternions, and the real spherical harmonics they define.

Basis convention (the one DeePMD-kit's DPA4 checkpoints are trained in): packed real
spherical harmonics ``Y~(r) = Y_e3nn(P r)`` with e3nn's real harmonics in "norm" normalisation
and ``P(x, y, z) = (-y, -z, x)``, so that ``Y~(R r) = D(R) Y~(r)``. For ``l = 1``,
``Y~(r) = (-y, -z, x)``.

Construction: with Cayley-Klein parameters ``a = w - i z``, ``b = y - i x`` of ``q = (w,x,y,z)``,
the complex spin-``l`` matrix is the action of ``[[a, b], [-conj b, conj a]]`` on the degree-2l
binary forms ``u^(l+m) v^(l-m) / sqrt((l+m)! (l-m)!)``; a fixed unitary change of basis makes it
real. Every entry is thus a homogeneous polynomial of degree ``2l`` in ``(w, x, y, z)``. The
polynomials are expanded once (exactly, in Python) into a monomial table, so evaluation is a
product of power tables followed by one small matmul per degree: smooth everywhere, no charts,
no logarithms, differentiable to any order.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from .edge_frame import edge_quaternion
from .layout import packed_index, so3_dim

Monomial = tuple[int, int, int, int]  # exponents of (w, x, y, z)
Poly = dict[Monomial, complex]


def _mul(p: Poly, q: Poly) -> Poly:
    out: Poly = defaultdict(complex)
    for ep, cp in p.items():
        for eq, cq in q.items():
            out[(ep[0] + eq[0], ep[1] + eq[1], ep[2] + eq[2], ep[3] + eq[3])] += cp * cq
    return out


def _powers(p: Poly, n: int) -> list[Poly]:
    table: list[Poly] = [{(0, 0, 0, 0): 1.0 + 0j}]
    for _ in range(n):
        table.append(_mul(table[-1], p))
    return table


def _complex_to_real(l: int) -> np.ndarray:
    """Unitary ``U`` with ``D_real = U D_complex U^H`` (rows: real orders m=-l..l)."""
    u = np.zeros((2 * l + 1, 2 * l + 1), dtype=complex)
    h = 1 / math.sqrt(2)
    for m in range(-l, l + 1):
        if m == 0:
            u[l, l] = 1
        elif m > 0:
            u[m + l, m + l] = h
            u[m + l, -m + l] = (-1) ** m * h
        else:
            u[m + l, -m + l] = -1j * h
            u[m + l, m + l] = (-1) ** m * 1j * h
    return u


@functools.cache
def wigner_monomial_table(l: int) -> tuple[np.ndarray, np.ndarray]:
    """Exponents ``(T, 4)`` and coefficients ``(T, (2l+1)^2)`` of the real degree-``l`` block.

    ``D^l[r, s](q) = sum_t coeff[t, r*(2l+1)+s] * w^e0 x^e1 y^e2 z^e3`` with ``e = exponents[t]``.
    """
    a = {(1, 0, 0, 0): 1 + 0j, (0, 0, 0, 1): -1j}  # w - i z
    b = {(0, 0, 1, 0): 1 + 0j, (0, 1, 0, 0): -1j}  # y - i x
    c = {(0, 0, 1, 0): -1 + 0j, (0, 1, 0, 0): -1j}  # -conj(b)
    d = {(1, 0, 0, 0): 1 + 0j, (0, 0, 0, 1): 1j}  # conj(a)
    pa, pb, pc, pd = (_powers(p, 2 * l) for p in (a, b, c, d))
    n = 2 * l + 1
    fact = math.factorial
    complex_block: list[list[Poly]] = [[{} for _ in range(n)] for _ in range(n)]
    for m in range(-l, l + 1):
        p_deg, q_deg = l + m, l - m
        for mp in range(-l, l + 1):
            norm = math.sqrt(fact(l + mp) * fact(l - mp) / (fact(l + m) * fact(l - m)))
            entry: Poly = defaultdict(complex)
            for i in range(p_deg + 1):
                j = l + mp - i
                if not 0 <= j <= q_deg:
                    continue
                weight = norm * math.comb(p_deg, i) * math.comb(q_deg, j)
                term = _mul(_mul(pa[i], pb[p_deg - i]), _mul(pc[j], pd[q_deg - j]))
                for e, coef in term.items():
                    entry[e] += weight * coef
            complex_block[mp + l][m + l] = entry
    u = _complex_to_real(l)
    real_entries: list[dict[Monomial, float]] = []
    for r in range(n):
        for s in range(n):
            acc: dict[Monomial, complex] = defaultdict(complex)
            for i in np.flatnonzero(u[r]):
                for j in np.flatnonzero(u[s]):
                    scale = u[r, i] * np.conj(u[s, j])
                    for e, coef in complex_block[i][j].items():
                        acc[e] += scale * coef
            real_entries.append({e: v.real for e, v in acc.items() if abs(v) > 1e-12})
    monomials = sorted({e for entry in real_entries for e in entry})
    column = {e: t for t, e in enumerate(monomials)}
    coeff = np.zeros((len(monomials), n * n))
    for k, entry in enumerate(real_entries):
        for e, v in entry.items():
            coeff[column[e], k] = v
    return np.array(monomials, dtype=np.int64).reshape(-1, 4), coeff


class WignerD(nn.Module):
    """Block-diagonal real Wigner-D matrices ``(E, D, D)``, ``D = (lmax+1)^2``, of quaternions.

    ``D(q) @ x`` expresses global-frame coefficients ``x`` in the frame rotated by ``q``;
    ``D(q).T`` rotates back.
    """

    def __init__(self, lmax: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lmax = int(lmax)
        self.dim = so3_dim(self.lmax)
        positions = []
        for l in range(1, self.lmax + 1):
            exps, coeff = wigner_monomial_table(l)
            self.register_buffer(f"exps_{l}", torch.from_numpy(exps), persistent=False)
            self.register_buffer(f"coeff_{l}", torch.from_numpy(coeff).to(dtype), persistent=False)
            rows = torch.arange(l * l, (l + 1) ** 2)
            positions.append((rows[:, None] * self.dim + rows[None, :]).reshape(-1))
        flat = torch.cat([torch.tensor([0]), *positions]) if positions else torch.tensor([0])
        self.register_buffer("block_positions", flat, persistent=False)

    def _monomials(self, q: torch.Tensor, l: int) -> torch.Tensor:
        """``(E, T_l)`` values of the degree-2l monomials of the table for degree ``l``."""
        powers = [torch.ones_like(q)]
        for _ in range(2 * l):
            powers.append(powers[-1] * q)
        table = torch.stack(powers, dim=-1)  # (E, 4, 2l+1): component c to power k
        exps = getattr(self, f"exps_{l}")  # (T, 4)
        return (
            table[:, 0, exps[:, 0]]
            * table[:, 1, exps[:, 1]]
            * table[:, 2, exps[:, 2]]
            * table[:, 3, exps[:, 3]]
        )

    def block(self, q: torch.Tensor, l: int) -> torch.Tensor:
        """Degree-``l`` block ``(E, 2l+1, 2l+1)``."""
        n = 2 * l + 1
        if l == 0:
            return torch.ones(q.shape[0], 1, 1, dtype=q.dtype, device=q.device)
        coeff = getattr(self, f"coeff_{l}").to(q.dtype)
        return (self._monomials(q, l) @ coeff).view(-1, n, n)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """``q``: ``(E, 4)`` unit quaternions -> ``(E, D, D)`` block-diagonal Wigner-D."""
        n_edge = q.shape[0]
        values = [torch.ones(n_edge, 1, dtype=q.dtype, device=q.device)]
        for l in range(1, self.lmax + 1):
            coeff = getattr(self, f"coeff_{l}").to(q.dtype)
            values.append(self._monomials(q, l) @ coeff)
        flat = q.new_zeros(n_edge, self.dim * self.dim)
        flat = flat.index_copy(1, self.block_positions, torch.cat(values, dim=1))
        return flat.view(n_edge, self.dim, self.dim)

    def zonal(self, q: torch.Tensor, lmin: int = 1) -> torch.Tensor:
        """Rows ``(l, m=0)`` of the blocks ``l = lmin..lmax``, concatenated: ``(E, D - lmin^2)``.

        Equal to the local ``m=0`` column of ``D.T``: how a zonal (axis-symmetric) local
        coefficient appears in the global frame.
        """
        parts = []
        for l in range(max(lmin, 1), self.lmax + 1):
            n = 2 * l + 1
            coeff = getattr(self, f"coeff_{l}").to(q.dtype).view(-1, n, n)[:, l, :]
            parts.append(self._monomials(q, l) @ coeff)
        if not parts:
            return q.new_zeros(q.shape[0], 0)
        return torch.cat(parts, dim=1)


def spherical_harmonics(points: torch.Tensor, lmax: int) -> torch.Tensor:
    """Packed real spherical harmonics ``Y~_lm`` of directions ``(P, 3)`` -> ``(P, D)``.

    "norm" normalisation: ``|Y~_l(u)| = 1`` for unit ``u``. Computed as
    ``(-1)^l * D^l(q)[m=0 row]`` with ``q`` any frame sending ``u`` to ``+z``.
    """
    dtype = points.dtype
    q = edge_quaternion(points.to(torch.float64), eps=1e-12)
    wigner = WignerD(lmax, dtype=torch.float64)
    out = torch.ones(points.shape[0], so3_dim(lmax), dtype=torch.float64)
    zonal = wigner.zonal(q, lmin=1)
    for l in range(1, lmax + 1):
        rows = slice(packed_index(l, -l), packed_index(l, l) + 1)
        out[:, rows] = (-1) ** l * zonal[:, rows.start - 1 : rows.stop - 1]
    return out.to(dtype)
