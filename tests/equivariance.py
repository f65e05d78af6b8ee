"""A generic equivariance check for any callable that declares how its tensors transform.

In the spirit of e3nn's ``assert_equivariant``: the caller names the representation of every
input and output tensor, the check draws random rotations ``R`` (and, where parity applies, the
inversion composed with them), and asserts ``f(g x) = g f(x)`` in float64:

* :func:`packed` ``(lmax, axis)``: packed real coefficients ``(..., (L+1)^2, ...)`` on ``axis``,
  ``x -> D(R) x`` with sezm's Wigner-D; the inversion multiplies degree ``l`` by ``(-1)^l``;
* :data:`VECTOR`: Cartesian vectors on the last axis (positions, forces, edge vectors),
  ``r -> R r``, inversion ``r -> -r``;
* :data:`TENSOR2`: rank-2 Cartesian tensors ``(..., 3, 3)`` or flattened ``(..., 9)`` (virials),
  ``W -> R W R^T``, unchanged by the inversion;
* :data:`SCALAR`: invariant (energies, descriptors, radial features).

``D(R)`` comes from :class:`sezm.geometry.wigner.WignerD` at the quaternion of ``R``, so the
check also ties every module to the package's own basis convention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sezm.geometry.wigner import WignerD

F64 = torch.float64
TOL = 1e-10


def rotation_matrix(q: torch.Tensor) -> torch.Tensor:
    """Active rotation matrix ``(..., 3, 3)`` of unit quaternions ``(..., 4)``."""
    w, x, y, z = q.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


@dataclass(frozen=True)
class Rep:
    """How one tensor transforms: ``kind`` in ``scalar | vector | tensor2 | packed``."""

    kind: str
    lmax: int = 0
    axis: int = 1


SCALAR = Rep("scalar")
VECTOR = Rep("vector")
TENSOR2 = Rep("tensor2")


def packed(lmax: int, axis: int = 1) -> Rep:
    """Packed coefficients of degrees ``0..lmax`` on ``axis`` (``(L+1)^2`` rows)."""
    return Rep("packed", lmax, axis)


@dataclass(frozen=True)
class Transform:
    """A proper rotation ``R (3, 3)`` with its quaternion ``q (4,)``, times the inversion if
    ``inverted``."""

    q: torch.Tensor
    inverted: bool

    @property
    def matrix(self) -> torch.Tensor:
        return rotation_matrix(self.q)

    def wigner(self, lmax: int) -> torch.Tensor:
        """``D(R)`` ``((L+1)^2, (L+1)^2)``, times ``(-1)^l`` per row under the inversion."""
        d = WignerD(lmax, dtype=F64)(self.q[None])[0]
        if self.inverted:
            d = d * parity_signs(lmax)[:, None]
        return d

    def apply(self, rep: Rep, x: torch.Tensor) -> torch.Tensor:
        """``g x`` for a tensor of representation ``rep``."""
        if rep.kind == "scalar":
            return x
        rot = self.matrix.to(x.dtype)
        if rep.kind == "vector":
            y = x @ rot.T
            return -y if self.inverted else y
        if rep.kind == "tensor2":
            w = x.reshape(*x.shape[:-1], 3, 3) if x.shape[-1] == 9 else x
            return (rot @ w @ rot.T).reshape(x.shape)
        if rep.kind == "packed":
            d = self.wigner(rep.lmax).to(x.dtype)
            moved = x.movedim(rep.axis, -1)
            if moved.shape[-1] != d.shape[0]:
                raise ValueError(
                    f"axis {rep.axis} has {moved.shape[-1]} rows, degree {rep.lmax} needs "
                    f"{d.shape[0]}"
                )
            return (moved @ d.T).movedim(-1, rep.axis)
        raise ValueError(f"unknown representation {rep.kind!r}")


def parity_signs(lmax: int) -> torch.Tensor:
    """``(-1)^l`` of every packed row ``((L+1)^2,)``: how the inversion acts on degree ``l``."""
    return torch.tensor([(-1.0) ** l for l in range(lmax + 1) for _ in range(2 * l + 1)], dtype=F64)


def random_transforms(n: int, *, inversion: bool, seed: int = 0) -> list[Transform]:
    """``n`` random proper rotations, each also composed with the inversion if ``inversion``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, dtype=F64, generator=gen)
    q = q / q.norm(dim=1, keepdim=True)
    flips = (False, True) if inversion else (False,)
    return [Transform(qi, flip) for qi in q for flip in flips]


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    """Outputs as a tuple of detached tensors (models may take gradients inside)."""
    return tuple(t.detach() for t in (out if isinstance(out, (tuple, list)) else (out,)))


def equivariance_errors(
    func: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    reps_in: Sequence[Rep],
    reps_out: Sequence[Rep],
    *,
    rotations: int = 3,
    inversion: bool = False,
    seed: int = 0,
) -> list[list[float]]:
    """``max|f(g x)_k - (g f(x))_k| / max(1, max|g f(x)_k|)`` per transform ``g`` and output ``k``."""
    if len(inputs) != len(reps_in):
        raise ValueError(f"{len(inputs)} inputs but {len(reps_in)} input representations")
    with torch.no_grad():
        ref = _as_tuple(func(*inputs))
    if len(ref) != len(reps_out):
        raise ValueError(f"{len(ref)} outputs but {len(reps_out)} output representations")
    errors = []
    for g in random_transforms(rotations, inversion=inversion, seed=seed):
        with torch.no_grad():
            moved = _as_tuple(func(*(g.apply(r, x) for r, x in zip(reps_in, inputs, strict=True))))
        row = []
        for rep, got, base in zip(reps_out, moved, ref, strict=True):
            want = g.apply(rep, base)
            scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
            row.append(float((got - want).abs().max()) / scale if want.numel() else 0.0)
        errors.append(row)
    return errors


def assert_equivariant(
    func: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    reps_in: Sequence[Rep],
    reps_out: Sequence[Rep],
    *,
    rotations: int = 3,
    inversion: bool = False,
    tol: float = TOL,
    seed: int = 0,
) -> float:
    """Assert ``f(g x) = g f(x)`` for ``rotations`` random rotations (each also with the
    inversion when ``inversion``); returns the largest relative error.

    ``func(*inputs)`` returns one tensor or a tuple, one representation each in ``reps_out``.
    Raises ``AssertionError`` naming the output, the transform and the error above ``tol``.
    """
    errors = equivariance_errors(
        func, inputs, reps_in, reps_out, rotations=rotations, inversion=inversion, seed=seed
    )
    for i, row in enumerate(errors):
        for k, err in enumerate(row):
            if not err <= tol:
                what = "rotation with inversion" if inversion and i % 2 else "rotation"
                raise AssertionError(
                    f"output {k} ({reps_out[k].kind}) is not equivariant under {what} {i}: "
                    f"relative error {err:.3e} > {tol:.1e}"
                )
    return max((e for row in errors for e in row), default=0.0)
