"""Neighbour statistics of the training data, and ``sel: "auto"`` as DeePMD-kit resolves it.

Over every frame of every system (no frame skipped), with all periodic images:

* ``max_nbor_size``: the largest number of neighbours ``0 < d < rcut`` of one atom, per
  neighbour type, and over all types (the mixed-type count DPA4 uses);
* ``min_nbor_dist``: the shortest distance between two atoms, at most 10 Å (DeePMD-kit's
  starting value). Pairs farther apart than ``rcut`` are not searched.

``sel = "auto[:f]"`` becomes ``4 * ceil(int(f * max_nbor_size) / 4)`` (``f`` = 1.1 by
default); an int ``sel`` is kept, with a warning when the data have more neighbours.
Atoms typed ``-1`` (mixed-type padding) are neither centres nor neighbours.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ase_frames import FileOptions
from .dataset import expand_systems, open_systems
from .neighbors import build_edges
from .system import BaseSystem, DataError

log = logging.getLogger(__name__)

MAX_MIN_NBOR_DIST = 10.0
"""``min_nbor_dist`` when no two atoms are closer (DeePMD-kit's initial value)."""

_CHUNK_ATOMS = 1 << 14  # atoms per neighbour search


@dataclass(frozen=True)
class NeighborStat:
    """``min_nbor_dist`` (Å), ``max_nbor_size`` ``(ntypes,)`` per neighbour type and
    ``max_nbor_total`` (all types together)."""

    min_nbor_dist: float
    max_nbor_size: np.ndarray
    max_nbor_total: int


def neighbor_stat(
    systems: Sequence[BaseSystem], rcut: float, ntypes: int | None = None
) -> NeighborStat:
    """Neighbour statistics of ``systems`` within ``rcut``; ``ntypes`` defaults to the systems'."""
    if ntypes is None:
        ntypes = max(_type_count(s) for s in systems)
    min_dist = np.inf
    max_size = np.zeros(ntypes, dtype=np.int64)
    max_total = 0
    for system in systems:
        step = max(1, _CHUNK_ATOMS // system.nat)
        for start in range(0, system.nframes, step):
            frames = np.arange(start, min(start + step, system.nframes))
            dist, size, total = _chunk_stat(system, frames, rcut, ntypes)
            min_dist = min(min_dist, dist)
            max_size = np.maximum(max_size, size)
            max_total = max(max_total, total)
    if not np.isfinite(min_dist):
        log.warning("no atom has a neighbour within rcut=%g Å in any frame", rcut)
    stat = NeighborStat(float(min(min_dist, MAX_MIN_NBOR_DIST)), max_size, int(max_total))
    log.info(
        "neighbour statistics (rcut %g Å): min_nbor_dist %.6f, max_nbor_size %s (total %d)",
        rcut,
        stat.min_nbor_dist,
        stat.max_nbor_size.tolist(),
        stat.max_nbor_total,
    )
    return stat


def _chunk_stat(
    system: BaseSystem, frames: np.ndarray, rcut: float, ntypes: int
) -> tuple[float, np.ndarray, int]:
    """``(min distance, max neighbours per type (ntypes,), max neighbours)`` of some frames."""
    data = system.frames(frames, keys=())
    atype = data["atype"].reshape(-1)  # (n * nat,)
    edges = build_edges(data["coord"], data.get("box"), rcut)
    _check_coincident(system, frames, edges.coincident, atype)
    dist = np.linalg.norm(edges.vec, axis=1)
    keep = (dist < rcut) & (atype[edges.src] >= 0) & (atype[edges.dst] >= 0)
    dst, src_type = edges.dst[keep], atype[edges.src[keep]]
    if not keep.any():
        return np.inf, np.zeros(ntypes, dtype=np.int64), 0
    counts = np.zeros((len(atype), ntypes), dtype=np.int64)  # (n * nat, ntypes)
    np.add.at(counts, (dst, src_type), 1)
    return float(dist[keep].min()), counts.max(axis=0), int(counts.sum(axis=1).max())


def _type_count(system: BaseSystem) -> int:
    if system.ntypes is not None:
        return system.ntypes
    if system.mixed_type:
        raise DataError(f"{system.path}: a mixed-type system needs type_map.raw or a type map")
    return int(system.atom_type.max()) + 1


def _check_coincident(system: BaseSystem, frames, pairs: np.ndarray, atype: np.ndarray) -> None:
    real = pairs[(atype[pairs[:, 0]] >= 0) & (atype[pairs[:, 1]] >= 0)] if len(pairs) else pairs
    if len(real):
        i, j = (int(k) for k in real[0])
        raise DataError(
            f"{system.path}: frame {frames[i // system.nat]}: atoms {i % system.nat} and "
            f"{j % system.nat} overlap (distance < 1e-5 Å); remove duplicated atoms"
        )


def resolve_sel(sel: int | str | Sequence[int], max_nbor_total: int) -> int:
    """DPA4's single ``sel`` from the option and the data's largest neighbour count."""
    if isinstance(sel, str):
        name, _, factor = sel.partition(":")
        if name != "auto" or factor.count(":"):
            raise DataError(f"sel {sel!r}: expected an int, 'auto' or 'auto:factor'")
        try:
            ratio = float(factor) if factor else 1.1
        except ValueError:
            raise DataError(f"sel {sel!r}: the factor must be a number") from None
        return 4 * ((int(max_nbor_total * ratio) + 3) // 4)
    value = int(sel[0] if isinstance(sel, Sequence) else sel)
    if 0 < value < max_nbor_total:
        log.warning(
            "sel=%d is below the %d neighbours found in the data; the neighbour search grows on "
            "demand, but the dens and spin paths truncate to sel",
            value,
            max_nbor_total,
        )
    return value


def update_sel(
    systems: Sequence[BaseSystem],
    rcut: float,
    sel: int | str | Sequence[int],
    ntypes: int | None = None,
) -> tuple[int, float]:
    """``(sel, min_nbor_dist)`` to store in the model, from a neighbour-statistics pass."""
    stat = neighbor_stat(systems, rcut, ntypes)
    return resolve_sel(sel, stat.max_nbor_total), stat.min_nbor_dist


def neighbor_stat_command(
    system: str | Path,
    rcut: float,
    type_map: Sequence[str] | None = None,
    mixed_type: bool = False,
    file_options: FileOptions | None = None,
) -> tuple[float, list[int]]:
    """``sezm neighbor-stat``: ``(min_nbor_dist, max_nbor_size)`` of every system under
    ``system``; ``max_nbor_size`` per type, or ``[total]`` with ``mixed_type``."""
    paths = expand_systems(system)
    type_map = list(type_map) if type_map else _merged_type_map(paths)
    systems = [s for p in paths for s in open_systems(p, type_map, {}, file_options)]
    stat = neighbor_stat(systems, rcut, None if type_map is None else len(type_map))
    sizes = [stat.max_nbor_total] if mixed_type else stat.max_nbor_size.tolist()
    print(f"min_nbor_dist: {stat.min_nbor_dist:f}")
    print(f"max_nbor_size: {sizes}")
    return stat.min_nbor_dist, sizes


def _merged_type_map(paths: Sequence[str]) -> list[str] | None:
    """The longest ``type_map.raw`` of the systems, all others being its prefixes."""
    merged: list[str] = []
    for path in paths:
        file = Path(path) / "type_map.raw"
        if not file.is_file():
            continue
        names = file.read_text().split()
        short, long = sorted((merged, names), key=len)
        if long[: len(short)] != short:
            raise DataError(
                f"{path}: type_map.raw {names} disagrees with {merged} of other systems; "
                "give --type-map"
            )
        merged = long
    return merged or None
