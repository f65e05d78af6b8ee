"""Properties of sezm's real Wigner-D matrices and spherical harmonics, per degree up to L = 6.

``D`` is a representation of SO(3): ``D(I) = I``, ``D(R1 R2) = D(R1) D(R2)``, orthogonal,
the same for ``q`` and ``-q``, and the runtime Clebsch-Gordan recursion equals the exact
polynomial construction. The harmonics ``Y~`` are what ``D`` rotates (``Y~(R r) = D(R) Y~(r)``),
and they are spherical harmonics in their own right: closed forms for ``l <= 2`` in the
documented basis (e3nn's at ``P r``, ``P(x, y, z) = (-y, -z, x)``), orthogonal over the sphere
with ``|Y~_l| = 1``, and ``|r|^l Y~(r/|r|)`` harmonic. Edge frames send the edge direction to
``+z``, where only the ``m = 0`` harmonics are non-zero. Everything in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from equivariance import rotation_matrix
from scipy.integrate import lebedev_rule

from sezm.geometry.edge_frame import edge_quaternion, multiply
from sezm.geometry.wigner import WignerD, spherical_harmonics, wigner_monomial_table

F64 = torch.float64
LMAX = 6
DEGREES = list(range(LMAX + 1))
TOL = 1e-12


def quaternions(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, dtype=F64, generator=gen)
    return q / q.norm(dim=1, keepdim=True)


def directions(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, 3, dtype=F64, generator=gen)
    return r / r.norm(dim=1, keepdim=True)


WIGNER = WignerD(LMAX, dtype=F64)


def block(q: torch.Tensor, l: int) -> torch.Tensor:
    """The degree-``l`` block ``(S, 2l+1, 2l+1)`` of ``D`` at ``q (S, 4)``."""
    rows = slice(l * l, (l + 1) ** 2)
    return WIGNER(q)[:, rows, rows]


@pytest.mark.parametrize("l", DEGREES)
def test_identity(l):
    identity = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(block(identity, l)[0], torch.eye(2 * l + 1, dtype=F64))


@pytest.mark.parametrize("l", DEGREES)
def test_group_law(l):
    """``D(q1 q2) = D(q1) D(q2)``, with ``R(q1 q2) = R(q1) R(q2)`` for the matrices too."""
    q1, q2 = quaternions(8, 1), quaternions(8, 2)
    q12 = multiply(q1, q2)
    torch.testing.assert_close(
        rotation_matrix(q12), rotation_matrix(q1) @ rotation_matrix(q2), rtol=0, atol=TOL
    )
    torch.testing.assert_close(block(q12, l), block(q1, l) @ block(q2, l), rtol=0, atol=TOL)


@pytest.mark.parametrize("l", DEGREES)
def test_orthogonal_and_double_cover(l):
    q = quaternions(16, 3)
    d = block(q, l)
    eye = torch.eye(2 * l + 1, dtype=F64).expand_as(d)
    torch.testing.assert_close(d @ d.transpose(1, 2), eye, rtol=0, atol=TOL)
    torch.testing.assert_close(torch.linalg.det(d), torch.ones(16, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(block(-q, l), d, rtol=0, atol=TOL)


@pytest.mark.parametrize("l", DEGREES[1:])
def test_recursion_matches_exact_polynomials(l):
    """The runtime ``D^l = C^T (D^1 (x) D^{l-1}) C`` equals the exact Cayley-Klein polynomials."""
    q = quaternions(16, 4)
    exponents, coeff = wigner_monomial_table(l)
    monomials = np.prod(q.numpy()[:, None, :] ** exponents[None], axis=-1)  # (S, T)
    exact = torch.from_numpy(monomials @ coeff).view(16, 2 * l + 1, 2 * l + 1)
    torch.testing.assert_close(block(q, l), exact, rtol=0, atol=TOL)


@pytest.mark.parametrize("l", DEGREES)
def test_harmonics_rotate_with_wigner(l):
    """``Y~_l(R r) = D^l(R) Y~_l(r)`` for random rotations and directions."""
    q, r = quaternions(12, 5), directions(12, 6)
    rows = slice(l * l, (l + 1) ** 2)
    rotated = (rotation_matrix(q) @ r.unsqueeze(-1)).squeeze(-1)  # (S, 3)
    y_rotated = spherical_harmonics(rotated, LMAX)[:, rows]
    want = (block(q, l) @ spherical_harmonics(r, LMAX)[:, rows].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(y_rotated, want, rtol=0, atol=TOL)


def test_harmonics_closed_forms():
    """``l = 1``: ``(-y, -z, x)``; ``l = 2``: e3nn's harmonics ("norm") at ``P r``."""
    r = directions(20, 7)
    y = spherical_harmonics(r, 2)
    x_, y_, z_ = r.unbind(1)
    torch.testing.assert_close(y[:, 0], torch.ones(20, dtype=F64))
    torch.testing.assert_close(y[:, 1:4], torch.stack([-y_, -z_, x_], 1), rtol=0, atol=TOL)
    px, py, pz = -y_, -z_, x_  # P r
    s3 = math.sqrt(3.0)
    quadratic = [
        s3 * px * pz,
        s3 * px * py,
        py**2 - (px**2 + pz**2) / 2,
        s3 * py * pz,
        s3 / 2 * (pz**2 - px**2),
    ]
    torch.testing.assert_close(y[:, 4:9], torch.stack(quadratic, 1), rtol=0, atol=TOL)


def test_harmonics_orthogonal_on_the_sphere():
    """``(1/4pi) int Y~_lm Y~_l'm' = delta / (2l+1)`` (Lebedev rule exact to degree 2L)."""
    points, weights = lebedev_rule(2 * LMAX + 1)
    y = spherical_harmonics(torch.from_numpy(points.T.copy()), LMAX)  # (P, D)
    gram = y.T @ (y * torch.from_numpy(weights)[:, None]) / (4 * math.pi)
    want = torch.diag(
        torch.tensor([1.0 / (2 * l + 1) for l in DEGREES for _ in range(2 * l + 1)], dtype=F64)
    )
    torch.testing.assert_close(gram, want, rtol=0, atol=TOL)


def test_harmonics_are_harmonic_polynomials():
    """``|r|^l Y~_l(r/|r|)`` has zero Laplacian (second derivatives by autograd)."""
    r = (1.3 * directions(5, 8)).requires_grad_(True)
    norm = r.norm(dim=1, keepdim=True)
    degree = torch.tensor([l for l in DEGREES for _ in range(2 * l + 1)], dtype=F64)
    solid = norm**degree * spherical_harmonics(r / norm, LMAX)  # (S, D)
    for k in range(solid.shape[1]):
        (grad,) = torch.autograd.grad(solid[:, k].sum(), r, create_graph=True)
        laplacian = sum(
            torch.autograd.grad(grad[:, i].sum(), r, retain_graph=True)[0][:, i] for i in range(3)
        )
        assert float(laplacian.abs().max()) < 1e-9, f"row {k}: |laplacian| {laplacian}"


@pytest.mark.parametrize("lmax", [2, LMAX])
def test_edge_frame_sends_the_edge_to_z(lmax):
    """``R(q_e) u_e = +z``, so ``D(q_e) Y~(u_e) = Y~(z)``: zero except the ``m = 0`` rows.

    Directions include both poles and near-pole edges, where the two quaternion charts blend.
    """
    poles = torch.tensor(
        [[0, 0, 1], [0, 0, -1], [1e-4, 0, 1], [0, 1e-4, -1], [1, 0, 0], [0.3, -0.2, 0.9]],
        dtype=F64,
    )
    vec = torch.cat([2.5 * directions(10, 9), poles])
    u = vec / vec.norm(dim=1, keepdim=True)
    q = edge_quaternion(vec, eps=1e-12)
    z = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    torch.testing.assert_close(
        (rotation_matrix(q) @ u.unsqueeze(-1)).squeeze(-1), z.expand_as(u), rtol=0, atol=TOL
    )
    local = (WignerD(lmax, dtype=F64)(q) @ spherical_harmonics(u, lmax).unsqueeze(-1)).squeeze(-1)
    zonal = spherical_harmonics(z[None], lmax)[0]
    torch.testing.assert_close(local, zonal.expand_as(local), rtol=0, atol=TOL)
    m_zero = [l * l + l for l in range(lmax + 1)]
    off_axis = torch.ones(zonal.shape[0], dtype=torch.bool)
    off_axis[m_zero] = False
    assert float(zonal[off_axis].abs().max()) < TOL
    assert float(zonal[m_zero].abs().min()) == pytest.approx(1.0)
