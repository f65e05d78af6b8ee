"""Cartesian rank-2 tensor products for blocks of degree 1 or 2.

For ``L <= 2`` one channel of a packed feature is a 3x3 matrix ``X = sum_d x_d B_d``: the
trace (l=0), the antisymmetric part (l=1) and the symmetric traceless part (l=2). The basis
``B (D, 3, 3)`` is Frobenius-orthonormal and intertwines the packed Wigner-D with conjugation,
``R B_d R^T = sum_n D(R)_nd B_n``, so a matrix product is equivariant:
``(R X R^T)(R Y R^T) = R (XY) R^T``. ``to_cart`` / ``from_cart`` below are ``x -> sum x_d B_d``
and ``X -> <B_d, X>``.

* :class:`EdgeCartesianTensorProduct` (``edge_cartesian``) replaces rotate / SO(2) stack /
  rotate-back: the source feature is right-multiplied by the edge tensor
  ``T_e = f0/sqrt3 I + f1 A(u) + f2 S(u)`` (``u`` the edge direction, ``f_l`` the per-degree
  radial weights), in the global frame.
* :class:`NodeCartesianTensorProduct` (``node_cartesian``) multiplies the aggregated message with
  the node's own feature, ``Y N`` or ``Y N + N Y`` ("parity").

Both run ``n_layers`` residual layers ``h <- h + gate_k(product(linear_k(h)))`` (no gate on the
last layer); the edge product with ``n_layers = 0`` is the single product ``product(x)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from ..geometry.layout import so3_dim
from ..geometry.wigner import spherical_harmonics
from .activation import GatedActivation
from .common import child_seed, compute_dtype_of
from .linear import SO3Linear


def _levi_civita(dtype: torch.dtype) -> torch.Tensor:
    eps = torch.zeros(3, 3, 3, dtype=dtype)
    for i, j, k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        eps[i, j, k], eps[i, k, j] = 1.0, -1.0
    return eps


def skew(v: torch.Tensor) -> torch.Tensor:
    """``(..., 3) -> (..., 3, 3)`` with ``skew(v) w = v x w``."""
    return torch.einsum("ijk,...j->...ik", _levi_civita(v.dtype).to(v.device), v)


def cartesian_basis(lmax: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal 3x3 images ``B (D, 3, 3)`` of the packed rows, ``D = (lmax+1)^2``, lmax 1 or 2.

    Read off the packed harmonics ``Y~`` of :func:`spherical_harmonics`, so the basis follows the
    Wigner-D convention by construction: ``B_0 = I/sqrt3``; ``B_1m = skew(v_m)/sqrt2`` with
    ``Y~_1m(r) = v_m . r``; ``B_2m = Q_m/|Q_m|`` with ``Y~_2m(u) = u^T Q_m u`` on unit vectors
    (``Q_m`` symmetric traceless, found by polarisation).
    """
    if lmax not in (1, 2):
        raise ValueError(f"Cartesian tensor products need lmax 1 or 2, got {lmax}")
    return _basis_f64(lmax).to(dtype, copy=True)


@functools.cache
def _basis_f64(lmax: int) -> torch.Tensor:
    axes = torch.eye(3, dtype=torch.float64)
    pairs = (axes[:, None] + axes[None]).reshape(9, 3)  # e_i + e_j, evaluated as directions
    y = spherical_harmonics(pairs, lmax).view(3, 3, -1)  # (3, 3, D): Y~((e_i+e_j)/|.|)
    diag = torch.diagonal(y, dim1=0, dim2=1)  # (D, 3): Y~(e_i)
    mats = [torch.eye(3, dtype=torch.float64) / math.sqrt(3.0)]
    mats += list(skew(diag[1:4]) / math.sqrt(2.0))
    if lmax == 2:
        quad = y.permute(2, 0, 1)[4:] - (diag[4:, :, None] + diag[4:, None, :]) / 2
        quad = quad + torch.diag_embed(diag[4:])  # (5, 3, 3): Q_m
        mats += list(quad / quad.square().sum((1, 2), keepdim=True).sqrt())
    basis = torch.stack(mats)
    return basis.masked_fill(basis.abs() < 1e-12, 0.0)  # exact structural zeros


def edge_tensors(r_hat: torch.Tensor) -> torch.Tensor:
    """Unit-norm edge tensors ``(E, 2, 3, 3)`` of directions ``u (E, 3)``:
    ``A = skew(u)/sqrt2`` (l=1) and ``S = (u u^T - I/3)/sqrt(2/3)`` (l=2).
    """
    eye = torch.eye(3, dtype=r_hat.dtype, device=r_hat.device)
    sym = r_hat[:, :, None] * r_hat[:, None, :] - eye / 3.0
    return torch.stack([skew(r_hat) / math.sqrt(2.0), sym / math.sqrt(2.0 / 3.0)], dim=1)


class _CartesianStack(nn.Module):
    """Residual layers ``h <- h + gate_k(product(linear_k(h)))`` on ``(B, D, F, C)``."""

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        n_layers: int,
        lmax: int,
        focus_dim: int,
        n_focus: int = 1,
        activation_function: str = "silu",
        mlp_bias: bool = False,
        seed=None,
    ) -> None:
        super().__init__()
        if lmax not in (1, 2) or n_layers < 0:
            raise ValueError(f"need lmax in (1, 2) and n_layers >= 0, got {lmax}, {n_layers}")
        self.lmax, self.focus_dim, self.n_focus, self.n_layers = lmax, focus_dim, n_focus, n_layers
        self.dim = so3_dim(lmax)
        self.linears = nn.ModuleList(
            SO3Linear(
                lmax,
                focus_dim,
                focus_dim,
                n_focus=n_focus,
                dtype=dtype,
                mlp_bias=mlp_bias,
                seed=child_seed(child_seed(seed, 0), i),
            )
            for i in range(n_layers)
        )
        self.activations = nn.ModuleList(
            GatedActivation(
                lmax=lmax,
                channels=focus_dim,
                n_focus=n_focus,
                dtype=compute_dtype_of(dtype),
                activation_function=activation_function,
                mlp_bias=mlp_bias,
                seed=child_seed(child_seed(seed, 1), i),
            )
            if i < n_layers - 1
            else nn.Identity()
            for i in range(n_layers)
        )
        self.register_buffer("basis", cartesian_basis(lmax, dtype), persistent=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.dim, self.n_focus, self.focus_dim)

    def _stack(self, h: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor]):
        """``h``: ``(B, D, F, C)``; ``product`` maps ``(B, D, F, C)`` to the same shape."""
        for linear, gate in zip(self.linears, self.activations, strict=True):
            h = h + gate(product(linear(h)))
        return h


class EdgeCartesianTensorProduct(_CartesianStack):
    """Per-edge product ``from_cart(to_cart(y) T_e)`` with ``T_e = f0/sqrt3 I + f1 A + f2 S``.

    As ``T_e`` is shared by all channels, the product is applied as packed operators
    ``K_G[p, d] = <B_p, B_d G>`` (``(E, D, D)`` per edge tensor ``G``):
    ``y -> f0/sqrt3 y + f1 K_A y + f2 K_S y``, per channel.
    """

    def __init__(self, *, eps: float = 1e-7, n_layers: int = 0, **stack) -> None:
        """``stack``: the :class:`_CartesianStack` settings."""
        super().__init__(n_layers=n_layers, **stack)
        self.eps = eps
        proj = torch.einsum("pij,dik->pdkj", self.basis, self.basis)  # K_G = proj : G
        self.register_buffer("right_mult_proj", proj, persistent=False)

    def operators(self, edge_vec: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(E, 3) -> (E, L*D, D)``: ``[K_A; K_S]`` (``K_S`` only for ``L = 2``)."""
        norm = torch.sqrt(edge_vec.square().sum(-1, keepdim=True) + self.eps**2)
        tensors = edge_tensors((edge_vec / norm).to(dtype))[:, : self.lmax]  # (E, L, 3, 3)
        ops = torch.einsum("pdkj,egkj->egpd", self.right_mult_proj.to(tensors.dtype), tensors)
        return ops.reshape(edge_vec.shape[0], self.lmax * self.dim, self.dim)

    def forward(self, x: torch.Tensor, edge_vec: torch.Tensor, rad_feat: torch.Tensor):
        """``x (E, D, C_wide)`` source features, ``edge_vec (E, 3)``, ``rad_feat (E, L+1, C_wide)``
        radial weights ``f_l`` -> messages ``(E, D, C_wide)``. ``C_wide = F * focus_dim``
        (focus-major); ``(E, D, F, focus_dim)`` inputs work too and keep their shape.
        """
        shape, n_edge = x.shape, x.shape[0]
        ops = self.operators(edge_vec, x.dtype)  # (E, L*D, D)
        rad = rad_feat.reshape(n_edge, self.lmax + 1, 1, -1)  # (E, L+1, 1, C_wide)
        iso, directional = rad[:, :1] / math.sqrt(3.0), rad[:, 1:]

        def product(y: torch.Tensor) -> torch.Tensor:  # (E, D, F, C) -> same
            flat = y.reshape(n_edge, self.dim, -1)  # (E, D, C_wide)
            ky = torch.bmm(ops, flat).view(n_edge, self.lmax, self.dim, -1)  # (E, L, D, C_wide)
            out = iso[:, 0] * flat + (directional * ky).sum(1)
            return out.view(y.shape)

        h = self._split(x)
        out = product(h) if self.n_layers == 0 else self._stack(h, product)
        return out.reshape(shape)


class NodeCartesianTensorProduct(_CartesianStack):
    """Per-node product of the aggregated message with the node feature ``N = to_cart(node)``:
    ``y -> from_cart(Y N)``, or ``from_cart(Y N + N Y)`` when ``symmetric`` ("parity": each
    irreducible part then keeps a definite parity).
    """

    def __init__(self, *, symmetric: bool = False, n_layers: int = 1, **stack) -> None:
        """``stack``: the :class:`_CartesianStack` settings."""
        super().__init__(n_layers=n_layers, **stack)
        self.symmetric = symmetric

    def forward(self, message: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        """``message``, ``node``: ``(N, D, C_wide)`` (or ``(N, D, F, C)``) -> same shape."""
        basis = self.basis.to(message.dtype)
        n = message.shape[0]
        node_cart = torch.einsum("ndc,dij->ncij", node.reshape(n, self.dim, -1), basis)

        def product(y: torch.Tensor) -> torch.Tensor:  # (N, D, F, C) -> same
            y_cart = torch.einsum("ndc,dij->ncij", y.reshape(n, self.dim, -1), basis)
            prod = y_cart @ node_cart
            if self.symmetric:
                prod = prod + node_cart @ y_cart
            return torch.einsum("ncij,dij->ndc", prod, basis).view(y.shape)

        return self._stack(self._split(message), product).reshape(message.shape)
