"""Quadrature grids on S2 and SO(3), and the projectors between coefficients and grid values.

A projector holds two fixed matrices: ``to_grid (G, J*K)`` evaluates coefficients at the ``G``
grid samples, ``from_grid (J*K, G)`` integrates grid values back onto the coefficients. ``J``
indexes the kept ``(l, m)`` rows (packed, packed with ``|m| <= M``, or m-major) and ``K`` the
frame orders of an SO(3) grid (``K = 1`` on S2); the frame index is the fast one.

**S2** (``K = 1``): with ``Y`` the "norm" real harmonics (``|Y_l| = 1``) and weights summing to one,

    to_grid[g, (l,m)]   = Y_lm(p_g) * s_l / sqrt(L+1)
    from_grid[(l,m), g] = Y_lm(p_g) * s_l * w_g * (2l+1) * sqrt(L+1)

so ``from(to(x)) = x`` whenever the rule integrates degree ``2L``, and ``from(to(a) * to(b))`` is
the exact projection of the point-wise product once it integrates degree ``3L``. The gain
``s_l = sqrt((2l+1)/(2M+1))`` for ``l > M`` (else 1) boosts degrees that lost orders to an
``m`` truncation; it enters both matrices. The harmonics are e3nn's, evaluated at the raw grid
points: ``Y_e3nn(p) = Y~(P^T p)`` in the packed basis of :mod:`sezm.geometry.wigner`. Two rules:

* ``"lebedev"``: the smallest Lebedev rule of precision ``>= 3L`` (from scipy).
* ``"e3nn"``: a product grid of ``R_theta`` polar rings ``theta_i = (i + 1/2) pi / R_theta``
  (Driscoll-Healy weights) times ``R_phi`` azimuths ``phi_j = 2 pi j / R_phi``, at the points
  ``(sin t sin f, cos t, sin t cos f)``: the polar axis is the packed basis' z axis.

**SO(3)**: frames ``g = R_z(gamma) R(p)`` with ``R(p)`` the edge frame of a Lebedev point and
``n_gamma`` uniform rolls, Haar weights ``w_p / n_gamma``; frame orders ``k in [0,-1,1,..,-K,K]``:

    to_grid[g, (l,m,k)]   = D^l_{k m}(g)                       (0 where |k| > l)
    from_grid[(l,m,k), g] = (2l+1) * haar_g * D^l_{k m}(g)

with ``D(g)`` the global -> local Wigner matrix, so ``k = 0`` is the S2 harmonic of ``p``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from ..geometry.edge_frame import edge_quaternion, multiply
from ..geometry.layout import SphericalLayout, packed_index
from ..geometry.wigner import WignerD, spherical_harmonics

# Algebraic precisions of the Lebedev rules that scipy (and DeePMD-kit) ship.
LEBEDEV_PRECISIONS = (*range(3, 32, 2), *range(35, 132, 6))


@functools.cache
def _lebedev(precision: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.integrate import lebedev_rule  # here: scipy.integrate takes 0.25 s to import

    points, weights = lebedev_rule(precision)
    return points.T.copy(), weights / (4 * math.pi)


def lebedev_grid(precision: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit points ``(P, 3)`` and weights ``(P,)`` summing to one (float64)."""
    if precision not in LEBEDEV_PRECISIONS:
        raise ValueError(f"no Lebedev rule of precision {precision}; have {LEBEDEV_PRECISIONS}")
    points, weights = _lebedev(int(precision))
    return torch.from_numpy(points), torch.from_numpy(weights)


def lebedev_precision_for(lmax: int) -> int:
    """Smallest shipped precision ``>= 3 lmax`` (enough for a quadratic product of degree lmax)."""
    for precision in LEBEDEV_PRECISIONS:
        if precision >= 3 * lmax:
            return precision
    raise ValueError(f"no Lebedev rule integrates degree {3 * lmax}")


def lebedev_size(precision: int) -> int:
    """Number of points of the Lebedev rule of algebraic ``precision``."""
    return lebedev_grid(precision)[0].shape[0]


def resolve_s2_grid_resolution(lmax: int, mmax: int, *, method: str = "e3nn") -> list[int]:
    """Default S2 grid: ``[precision, n_points]`` (lebedev) or ``[R_phi, R_theta]`` (e3nn).

    e3nn: ``R_phi = 2M + 4`` azimuths and ``R_theta = 3L + 2`` rounded up to even.
    """
    if method == "lebedev":
        precision = lebedev_precision_for(lmax)
        return [precision, lebedev_size(precision)]
    if method != "e3nn":
        raise ValueError(f"grid_method must be 'e3nn' or 'lebedev', got {method!r}")
    n_theta = 3 * lmax + 2
    return [2 * mmax + 4, n_theta + n_theta % 2]


def resolve_s2_full_grid_resolution(lmax: int, *, method: str = "e3nn") -> list[int]:
    """Grid for untruncated inputs (FFNs, message-node products): e3nn uses a square grid."""
    resolution = resolve_s2_grid_resolution(lmax, lmax, method=method)
    return [max(resolution)] * 2 if method == "e3nn" else resolution


def resolve_so3_grid(
    lmax: int, *, kmax: int = 1, lebedev_precision: int | None = None
) -> tuple[int, int, int]:
    """``(lebedev precision, n_points, n_gamma)``; ``n_gamma = 3 kmax + 1`` resolves the roll
    frequencies ``|k1 + k2 - k| <= 3 kmax`` of a quadratic product (1 when ``kmax = 0``)."""
    if kmax < 0:
        raise ValueError("kmax must be non-negative")
    precision = lebedev_precision_for(lmax) if lebedev_precision is None else lebedev_precision
    n_gamma = 1 if kmax == 0 else 3 * kmax + 1
    return precision, lebedev_size(precision), n_gamma


def frame_orders(kmax: int) -> list[int]:
    """SO(3) frame orders ``[0, -1, 1, ..., -kmax, kmax]`` (order 0 first)."""
    return [0, *[s * k for k in range(1, kmax + 1) for s in (-1, 1)]]


def coefficient_rows(layout: SphericalLayout, coefficient_layout: str) -> tuple[int, ...]:
    """Packed rows kept by a projector, in its coefficient order (``J`` rows): the m-major
    rows, or the packed rows with ``|m| <= M``."""
    if coefficient_layout == "m_major":
        return layout.reduced_rows
    if coefficient_layout != "packed":
        raise ValueError(
            f"coefficient_layout must be 'packed' or 'm_major', got {coefficient_layout!r}"
        )
    return layout.truncated_rows


def driscoll_healy_grid(n_phi: int, n_theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e3nn's product grid: points ``(n_theta * n_phi, 3)`` (theta-major), weights summing to 1.

    Polar weights of the ``n_theta = 2b`` rings ``theta_i = (2i+1) pi / (4b)``:
    ``w_i = (2/b) sin(theta_i) sum_{k<b} sin((2k+1) theta_i) / (2k+1)`` (they sum to 2);
    each is shared by the ``n_phi`` azimuths.
    """
    if n_theta % 2 or n_theta < 2 or n_phi < 1:
        raise ValueError(f"need an even polar resolution and n_phi >= 1, got {n_phi}x{n_theta}")
    b = n_theta // 2
    theta = (2 * torch.arange(n_theta, dtype=torch.float64) + 1) * math.pi / (4 * b)  # (T,)
    odd = 2 * torch.arange(b, dtype=torch.float64) + 1  # (b,)
    w_theta = (2 / b) * torch.sin(theta) * (torch.sin(theta[:, None] * odd) / odd).sum(-1)
    phi = torch.arange(n_phi, dtype=torch.float64) * (2 * math.pi / n_phi)
    st = torch.sin(theta)[:, None]
    points = torch.stack(
        [st * torch.sin(phi), torch.cos(theta)[:, None].expand(-1, n_phi), st * torch.cos(phi)],
        dim=-1,
    )
    weights = (w_theta / (2 * n_phi))[:, None].expand(-1, n_phi)
    return points.reshape(-1, 3), weights.reshape(-1)


def e3nn_harmonics(points: torch.Tensor, lmax: int) -> torch.Tensor:
    """e3nn's "norm" real harmonics ``(P, D)`` at ``points``: ``Y~(P^T p)``,
    ``P^T(a, b, c) = (c, -a, -b)``."""
    a, b, c = points.unbind(-1)
    return spherical_harmonics(torch.stack([c, -a, -b], dim=-1), lmax)


class GridProjector(nn.Module):
    """Coefficients ``(N, J, F, K*C)`` <-> grid values ``(N, G, F, C)`` through fixed matrices.

    The channel width ``C`` is read from the input, so widened operands (branches) pass too.
    """

    def __init__(self, to_grid: torch.Tensor, from_grid: torch.Tensor, n_frames: int, dtype):
        super().__init__()
        self.n_frames = n_frames
        self.grid_size, self.coeff_dim = to_grid.shape  # coeff_dim = J * K
        self.register_buffer("to_grid_mat", to_grid.to(dtype), persistent=False)
        self.register_buffer("from_grid_mat", from_grid.to(dtype), persistent=False)

    def to_grid(self, coeff: torch.Tensor) -> torch.Tensor:
        n, j, f, _ = coeff.shape
        mat = self.to_grid_mat.view(self.grid_size, j, self.n_frames)  # (G, J, K)
        return torch.einsum("gjk,njfkc->ngfc", mat, coeff.reshape(n, j, f, self.n_frames, -1))

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        n, _, f, _ = grid.shape
        mat = self.from_grid_mat.view(-1, self.n_frames, self.grid_size)  # (J, K, G)
        return torch.einsum("jkg,ngfc->njfkc", mat, grid).reshape(n, mat.shape[0], f, -1)


class S2GridProjector(GridProjector):
    """S2 projector; ``grid_resolution_list`` is ``[precision, n_points]`` (lebedev) or
    ``[R_phi, R_theta]`` (e3nn), resolved by :func:`resolve_s2_grid_resolution` when ``None``."""

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        lmax: int,
        mmax: int | None = None,
        grid_resolution_list: list[int] | None = None,
        coefficient_layout: str = "packed",
        grid_method: str = "e3nn",
    ) -> None:
        mmax = lmax if mmax is None else mmax
        resolution = grid_resolution_list or resolve_s2_grid_resolution(
            lmax, mmax, method=grid_method
        )
        if grid_method == "lebedev":
            points, weights = lebedev_grid(int(resolution[0]))
            if int(resolution[1]) != len(weights):
                raise ValueError(f"Lebedev rule {resolution[0]} has {len(weights)} points")
        elif grid_method == "e3nn":
            if 2 * (lmax + 1) > int(resolution[1]):
                raise ValueError(f"R_theta = {resolution[1]} cannot resolve degree {lmax}")
            points, weights = driscoll_healy_grid(int(resolution[0]), int(resolution[1]))
        else:
            raise ValueError(f"grid_method must be 'e3nn' or 'lebedev', got {grid_method!r}")
        self.lmax, self.mmax, self.grid_method = lmax, mmax, grid_method
        self.grid_resolution_list = [int(r) for r in resolution]

        layout = SphericalLayout.of(lmax, mmax)
        degree = torch.tensor(layout.degrees, dtype=torch.float64)  # (D,)
        gain = torch.tensor(layout.gains, dtype=torch.float64)
        harmonics = e3nn_harmonics(points, lmax) * gain  # (G, D)
        root = math.sqrt(lmax + 1)
        rows = list(coefficient_rows(layout, coefficient_layout))
        to_grid = harmonics[:, rows] / root  # (G, J)
        from_grid = (harmonics * weights[:, None] * (2 * degree + 1) * root)[:, rows].T  # (J, G)
        super().__init__(to_grid, from_grid, n_frames=1, dtype=dtype)


class SO3GridProjector(GridProjector):
    """SO(3) projector on Lebedev(>= 3L) x ``n_gamma`` rolls, frame orders ``|k| <= kmax``."""

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        lmax: int,
        mmax: int | None = None,
        kmax: int = 1,
        lebedev_precision: int | None = None,
        coefficient_layout: str = "packed",
    ) -> None:
        mmax = lmax if mmax is None else mmax
        precision, _, n_gamma = resolve_so3_grid(
            lmax, kmax=kmax, lebedev_precision=lebedev_precision
        )
        self.lmax, self.mmax, self.kmax = lmax, mmax, kmax
        self.lebedev_precision, self.n_gamma = precision, n_gamma
        self.frame_set = frame_orders(kmax)

        points, weights = lebedev_grid(precision)
        gamma = torch.arange(n_gamma, dtype=torch.float64) * (2 * math.pi / n_gamma)
        zero = torch.zeros_like(gamma)
        roll = torch.stack([torch.cos(gamma / 2), zero, zero, torch.sin(gamma / 2)], -1)
        frame = edge_quaternion(points, eps=1e-14)  # (P, 4)
        q = multiply(roll[None, :, :], frame[:, None, :]).reshape(-1, 4)  # (G, 4), gamma fastest
        wigner = WignerD(lmax, dtype=torch.float64)(q)  # (G, D, D)
        haar = (weights[:, None] / n_gamma).expand(-1, n_gamma).reshape(-1)  # (G,)

        layout = SphericalLayout.of(lmax, mmax)
        rows, degrees = coefficient_rows(layout, coefficient_layout), layout.degrees
        n_frames = len(self.frame_set)
        to_grid = torch.zeros(q.shape[0], len(rows) * n_frames, dtype=torch.float64)
        from_grid = torch.zeros(len(rows) * n_frames, q.shape[0], dtype=torch.float64)
        for j, row in enumerate(rows):
            l = degrees[row]
            for f, k in enumerate(self.frame_set):
                if abs(k) <= l:
                    values = wigner[:, packed_index(l, k), row]  # D^l_{k m}(g)
                    to_grid[:, j * n_frames + f] = values
                    from_grid[j * n_frames + f] = (2 * l + 1) * haar * values
        super().__init__(to_grid, from_grid, n_frames=n_frames, dtype=dtype)
