"""Neighbour search: every ordered pair ``(i, j, image)`` within the cutoff, as a flat edge list.

The search engine is vesin (``vesin.NeighborList``, numpy flavour), chosen because it is
maintained, runs O(N) cell lists and accepts any cell shape, including cells smaller than the
cutoff sphere (an atom then sees several images of every atom, its own among them).

vesin keeps pairs with ``d < cutoff``; this module keeps ``1e-10 < d^2 <= rcut^2`` (both ends
as the model defines them), so vesin is asked for a cutoff a hair larger and the result is
filtered here on ``d^2`` recomputed from the integer shifts. Pairs at (near) zero distance are
never edges; they are recorded in ``EdgeList.coincident`` so that overlapping atoms can be
reported instead of vanishing silently.

Indices are flattened over frames: atom ``i`` of frame ``f`` is ``f * nat + i``.
Edge ``e`` points from the neighbour ``src`` (message source) to the centre ``dst``::

    vec[e] = r[src] + shift[e] @ cell[frame] - r[dst]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import vesin

from sezm.geometry.frames import InputError

ZERO_DIST2 = 1e-10
"""Pairs with ``|vec|^2`` at or below this (Å^2) are coincident atoms, not edges."""

MAX_NEIGHBOURS_PER_ATOM = 20_000
"""Refuse cells whose density implies more neighbours per atom than this (real matter: ~100)."""

_CUTOFF_PAD = 1e-9  # relative padding of the vesin cutoff, so that d == rcut is found


def _empty_pairs() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int64)


@dataclass(frozen=True)
class EdgeList:
    """Directed edges of a batch of frames, sorted by ``(dst, src, shift)``.

    ``src``/``dst``: ``[E]`` int64 flattened atom indices (neighbour / centre).
    ``vec``: ``[E, 3]`` float64, ``r_src + shift @ cell - r_dst`` in Å.
    ``shift``: ``[E, 3]`` int64 cell-image offsets (zeros without a cell).
    ``coincident``: ``[K, 2]`` int64 flattened ``(dst, src)`` pairs closer than
    ``sqrt(ZERO_DIST2)``; they are not edges and are kept only for diagnostics.
    """

    src: np.ndarray
    dst: np.ndarray
    vec: np.ndarray
    shift: np.ndarray
    coincident: np.ndarray = field(default_factory=_empty_pairs)

    def __len__(self) -> int:
        return int(self.src.shape[0])

    def frame_of_edge(self, nat: int) -> np.ndarray:
        """Frame index ``[E]`` of every edge, for ``nat`` atoms per frame."""
        return self.dst // nat


def build_edges(coord: np.ndarray, cell: np.ndarray | None, rcut: float) -> EdgeList:
    """All ordered pairs with ``1e-10 < |vec|^2 <= rcut^2``, over every periodic image.

    ``coord``: ``[nf, nat, 3]`` Å; ``cell``: ``[nf, 3, 3]`` with rows the cell vectors,
    or ``None`` for open boundaries in every frame. No per-atom neighbour cap is applied.
    """
    coord = np.asarray(coord, dtype=np.float64)
    if coord.ndim != 3 or coord.shape[2] != 3:
        raise ValueError(f"coord must have shape (nf, nat, 3), got {coord.shape}")
    nf, nat = coord.shape[:2]
    if cell is not None:
        cell = np.asarray(cell, dtype=np.float64)
        if cell.shape != (nf, 3, 3):
            raise ValueError(f"cell must have shape ({nf}, 3, 3) or be None, got {cell.shape}")
    if not rcut > 0.0:
        raise ValueError(f"rcut must be positive, got {rcut}")

    searcher = vesin.NeighborList(cutoff=rcut * (1.0 + _CUTOFF_PAD), full_list=True)
    parts = []
    for f in range(nf):
        box = None if cell is None else cell[f]
        if box is not None:
            _check_image_count(box, nat, rcut, f)
        parts.append(_frame_edges(searcher, coord[f], box, rcut, offset=f * nat))
    return _sorted_edge_list(parts)


def _check_image_count(box: np.ndarray, nat: int, rcut: float, frame: int) -> None:
    """Refuse a cell so small for its atoms that the edge count would explode."""
    volume = abs(np.linalg.det(box))
    per_atom = nat * (4.0 / 3.0) * np.pi * rcut**3 / max(volume, 1e-300)
    if per_atom > MAX_NEIGHBOURS_PER_ATOM:
        raise InputError(
            f"frame {frame}: the cell (volume {volume:.4g} Å^3) is tiny for {nat} atoms: "
            f"about {per_atom:.3g} neighbours per atom within rcut {rcut} Å. "
            "Check the cell units (Å) and that cell rows are the lattice vectors."
        )


def _frame_edges(
    searcher: vesin.NeighborList,
    pos: np.ndarray,
    box: np.ndarray | None,
    rcut: float,
    offset: int,
) -> tuple[np.ndarray, ...]:
    """Edges of one frame as ``(src, dst, vec, shift, coincident)`` with flattened indices."""
    if box is None:
        i, j, shift = searcher.compute(pos, np.zeros((3, 3)), False, "ijS")
    else:
        i, j, shift = searcher.compute(pos, box, True, "ijS")
    dst = i.astype(np.int64)
    src = j.astype(np.int64)
    shift = shift.astype(np.int64)
    shift_cart = 0.0 if box is None else shift.astype(np.float64) @ box  # [E, 3]
    vec = pos[src] + shift_cart - pos[dst]  # [E, 3]
    dist2 = np.einsum("ed,ed->e", vec, vec)
    keep = (dist2 > ZERO_DIST2) & (dist2 <= rcut * rcut)
    zero = dist2 <= ZERO_DIST2
    coincident = np.stack([dst[zero], src[zero]], axis=1) + offset
    return src[keep] + offset, dst[keep] + offset, vec[keep], shift[keep], coincident


def _sorted_edge_list(parts: list[tuple[np.ndarray, ...]]) -> EdgeList:
    """Concatenate per-frame edges and sort them by ``(dst, src, shift)``."""
    if not parts:
        empty = np.zeros((0,), dtype=np.int64)
        return EdgeList(empty, empty, np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    src, dst, vec, shift, coincident = (np.concatenate(p, axis=0) for p in zip(*parts, strict=True))
    order = np.lexsort((shift[:, 2], shift[:, 1], shift[:, 0], src, dst))
    return EdgeList(
        src=src[order],
        dst=dst[order],
        vec=vec[order],
        shift=shift[order],
        coincident=coincident[np.lexsort(coincident.T[::-1])],
    )


def edge_vectors(
    coord_flat: torch.Tensor,
    cell: torch.Tensor | None,
    edges: EdgeList,
    frame_of_edge: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Differentiable ``vec = r[src] + shift @ cell[frame] - r[dst]``: ``[E, 3]``.

    ``coord_flat``: ``[nf * nat, 3]``; ``cell``: ``[nf, 3, 3]`` or ``None``;
    ``frame_of_edge``: ``[E]`` frame index of each edge (needed only with a cell).
    Gradients flow to both ``coord_flat`` and ``cell``, so a strain applied to both gives
    the virial.
    """
    device = coord_flat.device
    src = torch.as_tensor(edges.src, device=device)
    dst = torch.as_tensor(edges.dst, device=device)
    if cell is None:
        return coord_flat.index_select(0, src) - coord_flat.index_select(0, dst)
    if frame_of_edge is None:
        raise ValueError("frame_of_edge is required when a cell is given")
    frame = torch.as_tensor(frame_of_edge, device=device, dtype=torch.int64)
    shift = torch.as_tensor(edges.shift, device=device).to(coord_flat.dtype)  # [E, 3]
    shift_cart = torch.einsum("ea,eab->eb", shift, cell[frame])  # [E, 3]
    return coord_flat.index_select(0, src) + shift_cart - coord_flat.index_select(0, dst)
