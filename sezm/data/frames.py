"""Checks and normalises user inputs (coordinates, cells, atom types) before the model sees them.

Inputs follow the ``DeepPot.eval`` conventions of DeePMD-kit: ``coords`` as ``(nf, nat*3)``,
``(nf, nat, 3)`` or one frame ``(nat, 3)``/``(nat*3,)``; ``cells`` as ``(nf, 9)``,
``(nf, 3, 3)``, one cell ``(9,)``/``(3, 3)`` shared by every frame, or ``None`` for open
boundaries; ``atom_types`` as ``(nat,)`` shared by every frame or ``(nf, nat)``.
Every problem raises :class:`InputError` naming the frame (and atoms) and saying what to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .neighbors import EdgeList

MIN_CELL_VOLUME = 1e-3
"""Cells with ``|det|`` below this (Å^3) are rejected as degenerate."""

MIN_CELL_FLATNESS = 1e-5
"""Cells with ``|det| / (|a| |b| |c|)`` below this have nearly dependent vectors."""


def cell_volume_and_flatness(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``|det|`` and ``|det| / (|a| |b| |c|)`` of cells ``box (..., 3, 3)`` (rows are vectors)."""
    volume = np.abs(np.linalg.det(box))
    flatness = volume / np.maximum(np.prod(np.linalg.norm(box, axis=-1), axis=-1), 1e-300)
    return volume, flatness


def degenerate_cells(box: np.ndarray) -> np.ndarray:
    """Whether each cell of ``box (..., 3, 3)`` is too small or too flat to be a lattice."""
    volume, flatness = cell_volume_and_flatness(box)
    return (volume < MIN_CELL_VOLUME) | (flatness < MIN_CELL_FLATNESS)


_LIST_LIMIT = 5  # offenders listed in a message before "... and N more"


class InputError(ValueError):
    """User input that the model cannot evaluate; the message says where and what to fix."""


def normalize_frames(
    coords: np.ndarray | Sequence,
    cells: np.ndarray | Sequence | None,
    atom_types: np.ndarray | Sequence,
    ntypes: int,
    type_map: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Validate inputs and return ``coord [nf, nat, 3]``, ``cell [nf, 3, 3] | None``,
    ``atype [nf, nat]`` (float64, float64, int64)."""
    atype = _atom_types_array(atom_types)
    nat = atype.shape[-1]
    if nat == 0:
        raise InputError("the system is empty: atom_types lists 0 atoms; give at least one atom")
    coord = _coord_array(coords, nat)
    nf = coord.shape[0]
    atype = _broadcast_types(atype, nf)
    cell = None if cells is None else _cell_array(cells, nf)
    _check_finite(coord)
    _check_types(atype, ntypes, type_map)
    if cell is not None:
        _check_cells(cell)
    return coord, cell, atype


def check_overlaps(edges: EdgeList, nat: int, min_dist: float = 1e-3) -> None:
    """Raise if two atoms (or an atom and a periodic image) are closer than ``min_dist`` Å."""
    if len(edges.coincident):
        dst, src = (int(k) for k in edges.coincident[0])
        raise InputError(
            f"frame {dst // nat}: atoms {dst % nat} and {src % nat} sit on top of each other "
            f"(distance < 1e-5 Å; {len(edges.coincident) // 2 or 1} such pair(s) in total). "
            "Remove duplicated atoms or check the coordinates and cell."
        )
    dist = np.linalg.norm(edges.vec, axis=1)
    close = np.flatnonzero(dist < min_dist)
    if close.size == 0:
        return
    e = int(close[0])
    dst, src = int(edges.dst[e]), int(edges.src[e])
    image = tuple(int(s) for s in edges.shift[e])
    via = "" if not any(image) else f" through periodic image {image}"
    raise InputError(
        f"frame {dst // nat}: atoms {dst % nat} and {src % nat} are {dist[e]:.3g} Å apart{via}, "
        f"closer than {min_dist} Å ({max(close.size // 2, 1)} such pair(s) in total). "
        "Remove duplicated atoms or check the coordinates and cell."
    )


def _as_array(value: object, dtype: type, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=dtype)
    except (ValueError, TypeError) as err:
        raise InputError(f"{name} cannot be read as a numeric array: {err}") from err


def _atom_types_array(atom_types: object) -> np.ndarray:
    """``atom_types`` as int64 ``[nat]`` or ``[nf, nat]``."""
    try:
        raw = np.asarray(atom_types)
    except ValueError as err:
        raise InputError(f"atom_types cannot be read as an integer array: {err}") from err
    if raw.ndim not in (1, 2):
        raise InputError(f"atom_types: expected shape (nat,) or (nf, nat), got {raw.shape}")
    if raw.size and raw.dtype.kind not in "iu":
        values = _as_array(raw, np.float64, "atom_types")
        if not np.all(np.isfinite(values) & (values == np.round(values))):
            raise InputError(f"atom_types must be integers, got dtype {raw.dtype}")
    return raw.astype(np.int64)


def _coord_array(coords: object, nat: int) -> np.ndarray:
    """``coords`` as float64 ``[nf, nat, 3]`` from any accepted layout."""
    arr = _as_array(coords, np.float64, "coords")
    shape = arr.shape
    if arr.ndim == 1 and shape[0] == 3 * nat:
        arr = arr.reshape(1, nat, 3)
    elif arr.ndim == 2 and shape[1] == 3 * nat:
        arr = arr.reshape(shape[0], nat, 3)
    elif arr.ndim == 2 and shape == (nat, 3):
        arr = arr.reshape(1, nat, 3)
    elif not (arr.ndim == 3 and shape[1:] == (nat, 3)):
        raise InputError(
            f"coords: expected shape (nf, {3 * nat}), (nf, {nat}, 3), ({nat}, 3) or "
            f"({3 * nat},) for nat={nat} atoms (from atom_types), got {shape}"
        )
    if arr.shape[0] == 0:
        raise InputError("coords holds 0 frames; give at least one frame")
    return arr


def _broadcast_types(atype: np.ndarray, nf: int) -> np.ndarray:
    if atype.ndim == 1:
        return np.broadcast_to(atype, (nf, atype.shape[0])).copy()
    if atype.shape[0] != nf:
        raise InputError(
            f"atom_types has {atype.shape[0]} frames (shape {atype.shape}) but coords has "
            f"{nf}; give atom_types as (nat,) shared by all frames or as ({nf}, nat)"
        )
    return atype


def _cell_array(cells: object, nf: int) -> np.ndarray:
    """``cells`` as float64 ``[nf, 3, 3]``; a single cell is shared by every frame."""
    arr = _as_array(cells, np.float64, "cells")
    if arr.shape in ((9,), (3, 3)):
        return np.broadcast_to(arr.reshape(1, 3, 3), (nf, 3, 3)).copy()
    if (arr.ndim == 2 and arr.shape[1] == 9) or (arr.ndim == 3 and arr.shape[1:] == (3, 3)):
        if arr.shape[0] != nf:
            raise InputError(
                f"cells has {arr.shape[0]} frames (shape {arr.shape}) but coords has {nf}; "
                f"give one cell per frame ({nf}, 9) or a single cell (9,)"
            )
        return arr.reshape(nf, 3, 3)
    raise InputError(
        f"cells: expected shape ({nf}, 9), ({nf}, 3, 3), (9,) or (3, 3), got {arr.shape}; "
        "pass cells=None for a non-periodic system"
    )


def _check_finite(coord: np.ndarray) -> None:
    bad = np.argwhere(~np.isfinite(coord).all(axis=2))  # [K, 2] (frame, atom)
    if bad.size == 0:
        return
    frame = int(bad[0, 0])
    atoms = bad[bad[:, 0] == frame, 1]
    raise InputError(
        f"frame {frame}: non-finite coordinates (NaN or inf) at atom(s) {_listing(atoms)}, "
        f"e.g. atom {atoms[0]} = {coord[frame, atoms[0]].tolist()}; "
        f"{len(bad)} atom(s) affected over all frames. Fix or drop these frames."
    )


def _check_types(atype: np.ndarray, ntypes: int, type_map: Sequence[str] | None) -> None:
    bad = np.argwhere((atype < 0) | (atype >= ntypes))  # [K, 2] (frame, atom)
    if bad.size == 0:
        return
    frame = int(bad[0, 0])
    atoms = bad[bad[:, 0] == frame, 1]
    values = atype[frame, atoms]
    if type_map is not None:
        valid = ", ".join(f"{k}={name}" for k, name in enumerate(type_map))
    else:
        valid = f"0..{ntypes - 1}"
    raise InputError(
        f"frame {frame}: unknown atom type(s) {_listing(values)} at atom(s) {_listing(atoms)}; "
        f"valid types are {valid}. Map the elements with the model's type_map."
    )


def _check_cells(cell: np.ndarray) -> None:
    for frame in range(cell.shape[0]):
        box = cell[frame]
        if not np.isfinite(box).all():
            raise InputError(
                f"frame {frame}: cell contains NaN or inf: {box.tolist()}; "
                "give finite lattice vectors, or cells=None for a non-periodic system"
            )
        volume, flatness = cell_volume_and_flatness(box)
        if degenerate_cells(box):
            raise InputError(
                f"frame {frame}: degenerate cell, volume {volume:.4g} Å^3 "
                f"(|det| / (|a||b||c|) = {flatness:.3g}); its vectors are (nearly) linearly "
                f"dependent: {box.tolist()}. Give three independent lattice vectors as rows, "
                "or cells=None for a non-periodic system."
            )


def _listing(values: np.ndarray) -> str:
    """``[a, b, c]`` of the first few values, with a count of the rest."""
    shown = ", ".join(str(int(v)) for v in values[:_LIST_LIMIT])
    rest = len(values) - _LIST_LIMIT
    return f"[{shown}" + (f", ... and {rest} more]" if rest > 0 else "]")
