"""Index maps of the packed real spherical-harmonic layout.

Node features hold all degrees ``l = 0..L`` with ``2l+1`` orders each, packed l-major with
``m = -l..l`` inside a degree: row ``p(l, m) = l*l + l + m``, ``D = (L+1)^2`` rows in all.

Inside an SO(2) convolution, coefficients live in the edge frame and only orders
``|m| <= M`` are kept, in the *m-major* reduced layout::

    [m=0: l=0..L] + for m=1..M: [(l,-m) for l=m..L] + [(l,+m) for l=m..L]

Every module asks this file for these maps instead of recomputing them.
"""

from __future__ import annotations

import math

import torch


def so3_dim(lmax: int) -> int:
    """Number of packed coefficients ``(lmax+1)^2``."""
    return (int(lmax) + 1) ** 2


def packed_index(l: int, m: int) -> int:
    """Row of ``(l, m)`` in the packed layout."""
    return l * l + l + m


def degree_of_rows(lmax: int) -> torch.Tensor:
    """Degree ``l`` of every packed row: ``[0, 1,1,1, 2,2,2,2,2, ...]`` (long, ``(D,)``)."""
    return torch.tensor([l for l in range(lmax + 1) for _ in range(2 * l + 1)], dtype=torch.long)


def m_major_row_list(lmax: int, mmax: int) -> list[int]:
    """Packed rows in m-major reduced order as Python ints; lmax=2, mmax=1 -> [0,2,6,1,5,3,7].

    Index plans built during a forward pass use this, not a tensor: under tracing (``sezm
    freeze``) a tensor made there has no values to read back.
    """
    _check_lm(lmax, mmax)
    rows = [packed_index(l, 0) for l in range(lmax + 1)]
    for m in range(1, mmax + 1):
        rows += [packed_index(l, -m) for l in range(m, lmax + 1)]
        rows += [packed_index(l, m) for l in range(m, lmax + 1)]
    return rows


def m_major_rows(lmax: int, mmax: int) -> torch.Tensor:
    """``m_major_row_list`` as a long tensor ``(D_m,)``."""
    return torch.tensor(m_major_row_list(lmax, mmax), dtype=torch.long)


def m_major_degrees(lmax: int, mmax: int) -> torch.Tensor:
    """Degree of every m-major reduced row (long, ``(D_m,)``); lmax=2, mmax=1 -> [0,1,2,1,2,1,2]."""
    _check_lm(lmax, mmax)
    degrees = list(range(lmax + 1))
    for m in range(1, mmax + 1):
        degrees += list(range(m, lmax + 1)) * 2
    return torch.tensor(degrees, dtype=torch.long)


def l_major_truncated_rows(lmax: int, mmax: int) -> torch.Tensor:
    """Packed rows with ``|m| <= min(mmax, l)``, in packed (l-major) order."""
    _check_lm(lmax, mmax)
    rows = [
        packed_index(l, m) for l in range(lmax + 1) for m in range(-min(mmax, l), min(mmax, l) + 1)
    ]
    return torch.tensor(rows, dtype=torch.long)


def truncation_gain(degrees: torch.Tensor, mmax: int) -> torch.Tensor:
    """Rotate-back gain per row of degree ``l``: ``sqrt((2l+1)/(2M+1))`` for ``l > M``, else 1.

    A degree that lost orders to the ``|m| <= M`` truncation is rescaled so that its amplitude
    matches the full ``2l+1``-dimensional representation after the inverse rotation.
    """
    gain = [math.sqrt((2 * l + 1) / (2 * mmax + 1)) if l > mmax else 1.0 for l in degrees.tolist()]
    return torch.tensor(gain, dtype=torch.float64)


def _check_lm(lmax: int, mmax: int) -> None:
    if not 0 <= mmax <= lmax:
        raise ValueError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
