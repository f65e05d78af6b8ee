"""The structure ``sezm check`` tests a model on: a file ASE reads, a DeePMD npy system, or the
bundled water frame.

The bundled frame (``water.xyz``) is frame 0 of ``examples/water/data/data_0``: 64 water
molecules (192 atoms) in a periodic cubic box of 12.44 Å, the system DeePMD-kit's water example
trains on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ...data.frames import InputError, normalize_frames
from ...data.neighbors import build_edges

BUNDLED = Path(__file__).with_name("water.xyz")


@dataclass(frozen=True)
class Structure:
    """One frame: ``coord (nat, 3)`` Å, ``atype (nat,)`` model types, ``cell (3, 3)`` rows or
    ``None`` (open boundaries); ``source`` says where it came from."""

    coord: np.ndarray
    atype: np.ndarray
    cell: np.ndarray | None
    source: str

    @property
    def nat(self) -> int:
        return len(self.atype)

    def moved(self, coord: np.ndarray, cell: np.ndarray | None = None) -> Structure:
        """The same atoms at ``coord`` (and ``cell``, if given)."""
        return replace(self, coord=coord, cell=self.cell if cell is None else cell)


def read_structure(path: str | None, frame: int, type_map: list[str]) -> Structure:
    """Frame ``frame`` of ``path`` (default: the bundled water frame) with types mapped onto
    the model's ``type_map``; a folder holding ``type.raw`` is read as a DeePMD npy system."""
    if path is None:
        return _from_ase(BUNDLED, 0, type_map, "bundled water frame (192 atoms)")
    where = Path(path)
    if not where.exists():
        raise FileNotFoundError(f"structure not found: {path}")
    if where.is_dir():
        return _from_npy(where, frame, type_map)
    return _from_ase(where, frame, type_map, f"{path}, frame {frame}")


def _from_npy(path: Path, frame: int, type_map: list[str]) -> Structure:
    from ...data.system import System

    system = System(path, type_map, fields={})
    if not -system.nframes <= frame < system.nframes:
        raise InputError(f"{path}: frame {frame} does not exist; the system has {system.nframes}")
    data = system.frames([frame % system.nframes], keys=())
    cell = data["box"][0] if "box" in data else None
    return _checked(data["coord"][0], cell, data["atype"][0], type_map, f"{path}, frame {frame}")


def _from_ase(path: Path, frame: int, type_map: list[str], source: str) -> Structure:
    import ase.io

    try:
        atoms = ase.io.read(path, index=frame)
    except IndexError:
        raise InputError(f"{path}: frame {frame} does not exist") from None
    except Exception as err:  # ASE raises many types for a file it cannot parse
        raise InputError(
            f"{path}: ASE cannot read it as a structure ({type(err).__name__}: {err}); give a "
            "file ASE reads (extxyz, POSCAR, cif, ...) or a DeePMD npy system folder"
        ) from None
    if atoms.pbc.any() and not atoms.pbc.all():
        raise InputError(
            f"{path}: pbc={atoms.pbc.tolist()}; sezm needs periodic boundaries along all three "
            "cell vectors or along none (give a slab a vacuum gap and pbc=True)"
        )
    symbols = atoms.get_chemical_symbols()
    unknown = sorted(set(symbols) - set(type_map))
    if unknown:
        raise InputError(f"{path}: elements {unknown} are not in the model's type_map {type_map}")
    atype = np.array([type_map.index(s) for s in symbols])
    cell = atoms.cell.array if atoms.pbc.all() else None
    return _checked(atoms.positions, cell, atype, type_map, source)


def _checked(coord, cell, atype, type_map: list[str], source: str) -> Structure:
    coord, cell, atype = normalize_frames(coord, cell, atype, len(type_map), type_map)
    return Structure(coord[0], atype[0], None if cell is None else cell[0], source)


def min_pair_distance(structure: Structure, rcut: float) -> float:
    """The shortest distance between two atoms (periodic images included), ``inf`` when no
    two atoms are within ``rcut``."""
    cell = None if structure.cell is None else structure.cell[None]
    edges = build_edges(structure.coord[None], cell, rcut)
    if len(edges) == 0:
        return float("inf")
    return float(np.sqrt((edges.vec * edges.vec).sum(axis=1)).min())
