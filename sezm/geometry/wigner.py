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
from .layout import SphericalLayout, packed_index, so3_dim

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
    n = 2 * l + 1
    real_entries = _real_block(_complex_block(l), _complex_to_real(l))
    monomials = sorted({e for entry in real_entries for e in entry})
    column = {e: t for t, e in enumerate(monomials)}
    coeff = np.zeros((len(monomials), n * n))
    for k, entry in enumerate(real_entries):
        for e, v in entry.items():
            coeff[column[e], k] = v
    return np.array(monomials, dtype=np.int64).reshape(-1, 4), coeff


def _complex_block(l: int) -> list[list[Poly]]:
    """The complex Wigner-D block of degree ``l`` as quaternion polynomials,
    ``[m' + l][m + l]``, from the Cayley-Klein parameters ``a = w - iz``, ``b = y - ix``."""
    a = {(1, 0, 0, 0): 1 + 0j, (0, 0, 0, 1): -1j}  # w - i z
    b = {(0, 0, 1, 0): 1 + 0j, (0, 1, 0, 0): -1j}  # y - i x
    c = {(0, 0, 1, 0): -1 + 0j, (0, 1, 0, 0): -1j}  # -conj(b)
    d = {(1, 0, 0, 0): 1 + 0j, (0, 0, 0, 1): 1j}  # conj(a)
    pa, pb, pc, pd = (_powers(p, 2 * l) for p in (a, b, c, d))
    n = 2 * l + 1
    fact = math.factorial
    block: list[list[Poly]] = [[{} for _ in range(n)] for _ in range(n)]
    for m in range(-l, l + 1):
        p_deg, q_deg = l + m, l - m
        for mp in range(-l, l + 1):
            norm = math.sqrt(fact(l + mp) * fact(l - mp) / (fact(l + m) * fact(l - m)))
            entry: Poly = defaultdict(complex)
            for i in range(max(0, m + mp), min(p_deg, l + mp) + 1):  # j = l + mp - i in [0, q]
                j = l + mp - i
                weight = norm * math.comb(p_deg, i) * math.comb(q_deg, j)
                term = _mul(_mul(pa[i], pb[p_deg - i]), _mul(pc[j], pd[q_deg - j]))
                for e, coef in term.items():
                    entry[e] += weight * coef
            block[mp + l][m + l] = entry
    return block


def _real_block(block: list[list[Poly]], u: np.ndarray) -> list[dict[Monomial, float]]:
    """Entries ``U D U^H`` of the real block (row-major), each a polynomial ``{monomial: coeff}``."""
    n = len(block)
    entries: list[dict[Monomial, float]] = []
    for r in range(n):
        for s in range(n):
            acc: dict[Monomial, complex] = defaultdict(complex)
            for i in np.flatnonzero(u[r]):
                for j in np.flatnonzero(u[s]):
                    scale = u[r, i] * np.conj(u[s, j])
                    for e, coef in block[i][j].items():
                        acc[e] += scale * coef
            entries.append({e: v.real for e, v in acc.items() if abs(v) > 1e-12})
    return entries


def _exact_blocks(q: np.ndarray, l: int) -> np.ndarray:
    """``D^l`` of quaternions ``(S, 4)`` from the exact polynomial table: ``(S, 2l+1, 2l+1)``."""
    exps, coeff = wigner_monomial_table(l)
    n = 2 * l + 1
    return (np.prod(q[:, None, :] ** exps[None], axis=-1) @ coeff).reshape(len(q), n, n)


@functools.cache
def coupling_maps(lmax: int) -> tuple[np.ndarray, ...]:
    """``P_1`` with ``vec D^1 = vec(q q^T) P_1``, then for ``l >= 2`` the isometry
    ``C_l (3(2l-1), 2l+1)`` with ``D^l = C_l^T (D^1 (x) D^{l-1}) C_l``.

    ``D^l`` occurs exactly once in the product representation ``D^1 (x) D^{l-1}``; ``C_l`` spans
    it (Clebsch-Gordan coefficients in this real basis). It is the null vector of the intertwiner
    equations ``K(g) C = C D^l(g)`` for a few random rotations, normalised to ``C^T C = I``.
    """
    rng = np.random.default_rng(2024)

    def random_q(n: int) -> np.ndarray:
        q = rng.normal(size=(n, 4))
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    q = random_q(64)
    quad = (q[:, :, None] * q[:, None, :]).reshape(len(q), 16)
    p1, *_ = np.linalg.lstsq(quad, _exact_blocks(q, 1).reshape(len(q), 9), rcond=None)
    maps = [p1]
    for l in range(2, lmax + 1):
        n_in, n_out = 3 * (2 * l - 1), 2 * l + 1
        normal = np.zeros((n_in * n_out, n_in * n_out))
        for g in random_q(2):  # two generic rotations generate SO(3)
            kron = np.kron(_exact_blocks(g[None], 1)[0], _exact_blocks(g[None], l - 1)[0])
            target = _exact_blocks(g[None], l)[0]
            # vec(K C - C D) = (I (x) K - D^T (x) I) vec(C), column-major vec
            eq = np.kron(np.eye(n_out), kron) - np.kron(target.T, np.eye(n_in))
            normal += eq.T @ eq
        value, vector = np.linalg.eigh(normal)
        if value[1] < 1e-6 or abs(value[0]) > 1e-9:
            raise RuntimeError(f"no unique l={l} coupling in D^1 x D^{l - 1}")
        coupling = vector[:, 0].reshape(n_out, n_in).T
        maps.append(coupling / np.sqrt((coupling**2).sum() / n_out))
    return tuple(maps)


class WignerD(nn.Module):
    """Block-diagonal real Wigner-D matrices ``(E, D, D)``, ``D = (lmax+1)^2``, of quaternions.

    ``D(q) @ x`` expresses global-frame coefficients ``x`` in the frame rotated by ``q``;
    ``D(q).T`` rotates back. ``blocks(q)`` gives only the non-zero entries.

    ``D^1`` is linear in the quadratic monomials ``q q^T``; each higher block is linear in the
    entries of ``D^1 (x) D^{l-1}``: ``vec D^l = (vec D^1 (x) vec D^{l-1}) M_l`` with
    ``M_l[(i,k,j,l), (a,b)] = C_l[(i,j), a] C_l[(k,l), b]`` -- one outer product and one
    matmul per degree.
    """

    def __init__(self, lmax: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lmax = int(lmax)
        self.dim = so3_dim(self.lmax)
        maps = coupling_maps(self.lmax)
        self.register_buffer("map_1", torch.from_numpy(maps[0]).to(dtype), persistent=False)
        for l, cmap in enumerate(maps[1:], start=2):
            n_prev, n = 2 * l - 1, 2 * l + 1
            c = cmap.reshape(3, n_prev, n)
            full = np.einsum("ija,klb->ikjlab", c, c).reshape(9 * n_prev * n_prev, n * n)
            self.register_buffer(f"map_{l}", torch.from_numpy(full).to(dtype), persistent=False)

    def blocks(self, q: torch.Tensor) -> torch.Tensor:
        """Non-zero entries ``(E, sum_l (2l+1)^2)``: each degree block row-major, l ascending."""
        n_edge = q.shape[0]
        values = [torch.ones(n_edge, 1, dtype=q.dtype, device=q.device)]
        if self.lmax >= 1:
            d1 = (q.unsqueeze(2) * q.unsqueeze(1)).reshape(n_edge, 16) @ self.map_1.to(q.dtype)
            values.append(d1)  # (E, 9)
            prev = d1
            for l in range(2, self.lmax + 1):
                outer = (d1.unsqueeze(2) * prev.unsqueeze(1)).reshape(n_edge, -1)  # (E, 9 n'^2)
                prev = outer @ getattr(self, f"map_{l}").to(q.dtype)  # (E, (2l+1)^2)
                values.append(prev)
        return torch.cat(values, dim=1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """``q``: ``(E, 4)`` unit quaternions -> ``(E, D, D)`` block-diagonal Wigner-D."""
        return _dense_from_blocks(self.blocks(q), self.lmax)

    def zonal(self, q: torch.Tensor, lmin: int = 1) -> torch.Tensor:
        """Rows ``(l, m=0)`` of the blocks ``l = lmin..lmax``, concatenated: ``(E, D - lmin^2)``.

        Equal to the local ``m=0`` column of ``D.T``: how a zonal (axis-symmetric) local
        coefficient appears in the global frame.
        """
        blocks = self.blocks(q)
        parts, start = [], 1
        for l in range(1, self.lmax + 1):
            n = 2 * l + 1
            if l >= lmin:
                parts.append(blocks[:, start + l * n : start + (l + 1) * n])
            start += n * n
        if not parts:
            return q.new_zeros(q.shape[0], 0)
        return torch.cat(parts, dim=1)


def _dense_from_blocks(blocks: torch.Tensor, lmax: int) -> torch.Tensor:
    """Flat block values ``(E, sum (2l+1)^2)`` -> dense block-diagonal ``(E, D, D)``."""
    dim = so3_dim(lmax)
    dense = blocks.new_zeros(blocks.shape[0], dim, dim)
    for l, start in enumerate(SphericalLayout.of(lmax).wigner_offsets[:-1]):
        n = 2 * l + 1
        rows = slice(l * l, l * l + n)
        dense[:, rows, rows] = blocks[:, start : start + n * n].view(-1, n, n)
    return dense


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
