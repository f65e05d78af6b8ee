"""The (l, m) layouts of spherical-harmonic coefficients, owned by one object per ``(lmax, mmax)``.

Node features hold all degrees ``l = 0..L`` with ``2l+1`` orders each, packed l-major with
``m = -l..l`` inside a degree: row ``p(l, m) = l*l + l + m``, ``D = (L+1)^2`` rows in all.

Inside an SO(2) convolution, coefficients live in the edge frame and only orders
``|m| <= M`` are kept, in the *m-major* reduced layout::

    [m=0: l=0..L] + for m=1..M: [(l,-m) for l=m..L] + [(l,+m) for l=m..L]

:class:`SphericalLayout` holds every index map of both layouts (rows, degrees, ``|m|`` blocks,
truncation gains, Wigner block offsets) as tuples of Python ints, so index plans made during a
forward pass need no tensor values (under tracing, ``sezm freeze``, a tensor made there has none
to read back); modules turn them into buffers with :func:`index_tensor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch


def so3_dim(lmax: int) -> int:
    """Number of packed coefficients ``(lmax+1)^2``."""
    return (int(lmax) + 1) ** 2


def packed_index(l: int, m: int) -> int:
    """Row of ``(l, m)`` in the packed layout."""
    return l * l + l + m


@dataclass(frozen=True)
class MBlock:
    """Rows of one ``|m| >= 1`` block in the m-major layout: ``size`` rows ``(l, -m)`` from
    ``neg_start``, then ``size`` rows ``(l, +m)`` from ``pos_start``, for ``l = m..L``."""

    order: int
    neg_start: int
    pos_start: int
    size: int


@dataclass(frozen=True)
class SphericalLayout:
    """Index maps of degree ``lmax`` with orders ``|m| <= mmax`` kept in the edge frame.

    Get one with :meth:`of` (cached): every module of the same ``(lmax, mmax)`` shares it.
    """

    lmax: int
    mmax: int

    @staticmethod
    def of(lmax: int, mmax: int | None = None) -> SphericalLayout:
        """The layout of ``(lmax, mmax)``; ``mmax = None`` keeps every order."""
        return _cached_layout(int(lmax), int(lmax) if mmax is None else int(mmax))

    # --- packed (l-major) rows ------------------------------------------------------------
    @cached_property
    def dim(self) -> int:
        """``D = (L+1)^2`` packed rows."""
        return so3_dim(self.lmax)

    @cached_property
    def degrees(self) -> tuple[int, ...]:
        """Degree of every packed row: ``(0, 1,1,1, 2,2,2,2,2, ...)``, ``(D,)``."""
        return tuple(l for l in range(self.lmax + 1) for _ in range(2 * l + 1))

    @cached_property
    def gains(self) -> tuple[float, ...]:
        """Truncation gain of every packed row: ``sqrt((2l+1)/(2M+1))`` for ``l > M``, else 1.

        A degree that lost orders to the ``|m| <= M`` truncation is rescaled so that its
        amplitude matches the full ``2l+1``-dimensional representation.
        """
        m = self.mmax
        return tuple(math.sqrt((2 * l + 1) / (2 * m + 1)) if l > m else 1.0 for l in self.degrees)

    @cached_property
    def truncated_rows(self) -> tuple[int, ...]:
        """Packed rows with ``|m| <= min(M, l)``, in packed (l-major) order."""
        return tuple(
            packed_index(l, m)
            for l in range(self.lmax + 1)
            for m in range(-min(self.mmax, l), min(self.mmax, l) + 1)
        )

    @cached_property
    def wigner_offsets(self) -> tuple[int, ...]:
        """Start of each degree's ``(2l+1)^2`` entries in the flat block-diagonal Wigner values,
        plus their total: ``L + 2`` entries."""
        return tuple(sum((2 * k + 1) ** 2 for k in range(l)) for l in range(self.lmax + 2))

    def wigner_entry(self, row: int, col: int) -> int | None:
        """Position of ``D[row, col]`` (packed rows) in the flat Wigner values, or ``None``
        off the block diagonal (where ``D`` is zero)."""
        l = self.degrees[row]
        if self.degrees[col] != l:
            return None
        return self.wigner_offsets[l] + (row - l * l) * (2 * l + 1) + (col - l * l)

    # --- m-major reduced rows ---------------------------------------------------------------
    @cached_property
    def reduced_rows(self) -> tuple[int, ...]:
        """Packed row of every m-major row; lmax=2, mmax=1 -> ``(0,2,6,1,5,3,7)``, ``(D_m,)``."""
        rows = [packed_index(l, 0) for l in range(self.lmax + 1)]
        for m in range(1, self.mmax + 1):
            rows += [packed_index(l, -m) for l in range(m, self.lmax + 1)]
            rows += [packed_index(l, m) for l in range(m, self.lmax + 1)]
        return tuple(rows)

    @cached_property
    def reduced_degrees(self) -> tuple[int, ...]:
        """Degree of every m-major row; lmax=2, mmax=1 -> ``(0,1,2,1,2,1,2)``."""
        return tuple(self.degrees[p] for p in self.reduced_rows)

    @cached_property
    def reduced_dim(self) -> int:
        """``D_m`` rows in the m-major layout."""
        return len(self.reduced_rows)

    @cached_property
    def block_sizes(self) -> tuple[int, ...]:
        """Degrees per ``|m|`` block, ``n_m = L - m + 1`` for ``m = 0..M``."""
        return tuple(self.lmax - m + 1 for m in range(self.mmax + 1))

    @cached_property
    def m_blocks(self) -> tuple[MBlock, ...]:
        """The ``|m| >= 1`` blocks of the m-major layout (the ``m = 0`` block is rows ``0..L``)."""
        blocks, start = [], self.lmax + 1
        for m, n in enumerate(self.block_sizes[1:], start=1):
            blocks.append(MBlock(m, start, start + n, n))
            start += 2 * n
        return tuple(blocks)

    @cached_property
    def m_block_rows(self) -> tuple[int, ...]:
        """Rows of each ``|m|`` block of the m-major layout: ``L + 1`` for ``m = 0``, then
        ``2 n_m`` (the ``-m`` rows, then the ``+m`` rows) for each ``m >= 1``."""
        return (self.block_sizes[0], *(2 * n for n in self.block_sizes[1:]))


_LAYOUTS: dict[tuple[int, int], SphericalLayout] = {}


def _cached_layout(lmax: int, mmax: int) -> SphericalLayout:
    """One shared layout per ``(lmax, mmax)``, every index map filled at once (the first read of
    a ``cached_property`` takes a lock on Python 3.11, which breaks a torch.compile graph)."""
    if (lmax, mmax) not in _LAYOUTS:
        if not 0 <= mmax <= lmax:
            raise ValueError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
        layout = _LAYOUTS[(lmax, mmax)] = SphericalLayout(lmax, mmax)
        for name in [n for n, v in vars(SphericalLayout).items() if isinstance(v, cached_property)]:
            getattr(layout, name)
    return _LAYOUTS[(lmax, mmax)]


def index_tensor(values: tuple[int, ...]) -> torch.Tensor:
    """A fresh long tensor of an index map (for a module buffer: never shared, since loading a
    state dict writes into buffers in place)."""
    return torch.tensor(values, dtype=torch.long)
