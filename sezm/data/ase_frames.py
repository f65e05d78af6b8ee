"""Systems from a file that ASE reads: extended XYZ, XYZ, ASE trajectories, VASP OUTCARs, ...

A file named in ``systems`` (folders are DeePMD npy systems) is read with ASE. Its frames are
grouped by atom count and boundary condition (periodic or open), in file order; each group is
one system, with per-frame atom types (a mixed-type system) when its frames hold different
elements or the same elements in another order. Elements map by symbol onto the model's
``type_map``.

Labels (sezm name: the name ASE keeps it under by default, unit, shape per frame)::

    energy     energy                                 eV       ()
    force      forces                                 eV/Å     (nat, 3)
    virial     virial (3x3 or 9 values)               eV       (9,)
               or else stress (Voigt 6 or 3x3) eV/Å^3, converted to virial = -stress * volume
    atom_ener  energies                               eV       (nat,)
    others     (fparam, aparam, spin, ...) their own name

ASE's stress is ``(1/V) dE/d(strain)`` and DeePMD's virial ``-dE/d(strain)``, hence the sign.
:class:`FileOptions` renames labels (``{"energy": "REF_energy"}``) and fixes the format. A
name is looked up in the calculator results ASE attaches (``energy``, ``forces``, ``stress``,
...), then in ``atoms.info`` (per frame), then in ``atoms.arrays`` (per atom).

The file is scanned once when it is opened: every frame is parsed and checked (elements, pbc,
cell, labels, shapes, NaN/inf) and only its place in the file and its atom types are kept;
frames are parsed again when a batch needs them. (Ext)XYZ files are indexed by the byte
offset of each frame, so a frame is read with one seek; other formats are read with
``ase.io.read(path, index=i)`` (random access for ASE's ``.traj``, a re-read from the start
for most text formats). Every problem raises :class:`DataError` naming the file and frame.
"""

from __future__ import annotations

import io
import itertools
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress

from ..config.errors import did_you_mean
from .frames import cell_volume_and_flatness, degenerate_cells
from .system import BaseSystem, DataError, Field

DEFAULT_KEYS = {
    "energy": "energy",
    "force": "forces",
    "virial": "virial",
    "stress": "stress",
    "atom_ener": "energies",
}
"""Where ASE keeps each label when :attr:`FileOptions.keys` does not say otherwise."""

_OFFSET_FORMATS = ("extxyz", "xyz")  # formats read by seeking to a frame's byte offset


@dataclass(frozen=True)
class FileOptions:
    """How files are read with ASE: ``format`` (ASE's name, e.g. ``"extxyz"``; ``None``: ASE
    tells it from the file name and contents) and ``keys`` (sezm label -> ASE name)."""

    format: str | None = None
    keys: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, params: Mapping) -> FileOptions:
        """From a ``training_data`` / ``validation_data`` section (``file_format``,
        ``label_keys``)."""
        return cls(params.get("file_format"), dict(params.get("label_keys") or {}))

    def key(self, label: str) -> str:
        """The ASE name of the sezm label ``label``."""
        return self.keys.get(label, DEFAULT_KEYS.get(label, label))

    def check(self, fields: Mapping[str, Field]) -> None:
        """Every renamed label is one the model reads, and every name is a string."""
        known = [*fields, "stress"] if "virial" in fields else list(fields)
        for label, name in self.keys.items():
            if label not in known:
                raise DataError(
                    f"label_keys: {label!r} is not a label or input of the model, which reads "
                    f"{known}{did_you_mean(label, known)}"
                )
            if not isinstance(name, str) or not name:
                raise DataError(f"label_keys: {label!r} maps to {name!r}; expected a name")

    def resolve_format(self, path: Path) -> str:
        """ASE's format of ``path``: :attr:`format`, or what ASE tells from the file."""
        formats = _ase_io().formats
        ioformats = formats.ioformats
        if self.format is not None:
            if self.format not in ioformats:
                raise DataError(
                    f"file_format {self.format!r} is not a format ASE reads"
                    f"{did_you_mean(self.format, ioformats)}"
                )
            return self.format
        try:
            name = formats.filetype(str(path), read=True)
        except (formats.UnknownFileTypeError, OSError) as err:
            name, reason = None, str(err)
        else:
            reason = f"ASE guesses {name!r}"
        if name not in ioformats or not ioformats[name].can_read:
            raise DataError(
                f"{path}: not a system folder (no type.raw) and not a file ASE can read "
                f'({reason}); name the format with file_format (e.g. "extxyz")'
            )
        return name


def _ase_io():
    """``ase.io``, imported when a file is first read: its format registry costs a quarter of a
    second and ~40 MB at start-up, which runs on npy data never need."""
    import ase.io

    return ase.io


class FrameFile:
    """An ASE-readable file, scanned and checked once; :attr:`systems` holds its groups.

    ``type_map``: the model's elements (``None``: types in the order elements first appear).
    ``fields``: the labels and inputs to read (see :data:`~sezm.data.system.LABEL_FIELDS`).
    """

    def __init__(
        self,
        path: str | Path,
        type_map: Sequence[str] | None,
        fields: Mapping[str, Field],
        options: FileOptions | None = None,
    ) -> None:
        self.path = Path(path)
        self.options = options or FileOptions()
        self.options.check(fields)
        self.fields = dict(fields)
        self.format = self.options.resolve_format(self.path)
        self.fixed_types = type_map is not None
        self.type_map = list(type_map) if type_map is not None else []
        self._starts = array("q")  # byte offset of each frame, (ext)xyz only
        self._sizes = array("q")  # bytes of each frame
        self.systems = self._scan()

    def __repr__(self) -> str:
        return f"FrameFile({str(self.path)!r}, format={self.format!r})"

    # -- reading ---------------------------------------------------------------------------

    def read(self, frames: Sequence[int] | np.ndarray) -> Iterator[Atoms]:
        """The frames ``frames`` (numbers in the file) as ASE ``Atoms``, in that order."""
        if self.format not in _OFFSET_FORMATS:
            for frame in map(int, frames):
                yield self._parse(partial(_ase_io().read, self.path, frame, self.format), frame)
            return
        with open(self.path, "rb") as handle:
            for frame in map(int, frames):
                handle.seek(self._starts[frame])
                text = handle.read(self._sizes[frame]).decode()
                yield self._parse(partial(self._parse_text, text), frame)

    def _parse(self, read, frame: int) -> Atoms:
        try:
            return read()
        except Exception as err:  # ASE raises many kinds; any of them means a bad frame
            raise DataError(f"{self.path}: frame {frame}: ASE cannot read it ({err})") from err

    def _parse_text(self, text: str) -> Atoms:
        return _ase_io().read(io.StringIO(text), format=self.format)

    def _all_frames(self) -> Iterator[Atoms]:
        """Every frame in file order (recording byte offsets of (ext)xyz files)."""
        if self.format not in _OFFSET_FORMATS:
            frames = _ase_io().iread(self.path, index=":", format=self.format)
            for k in itertools.count():
                atoms = self._parse(lambda: next(frames, None), k)
                if atoms is None:
                    return
                yield atoms
            return
        for k, (start, text) in enumerate(xyz_frame_texts(self.path)):
            self._starts.append(start)
            self._sizes.append(len(text))
            yield self._parse(partial(self._parse_text, text.decode()), k)

    # -- scanning --------------------------------------------------------------------------

    def _scan(self) -> list[AseSystem]:
        groups: dict[tuple[int, bool], _Group] = {}
        for k, atoms in enumerate(self._all_frames()):
            coord, box = self.geometry(atoms, k)
            types = self.types(atoms, k)
            labels = self.labels(atoms, k, coord, box, self.fields)
            key = (len(types), box is not None)
            group = groups.setdefault(key, _Group(k, set(labels)))
            group.add(k, types, set(labels), self.path)
        if not groups:
            raise DataError(
                f"{self.path}: holds no frame (read as ASE format {self.format!r}; name the "
                "right one with file_format)"
            )
        several = len(groups) > 1
        return [AseSystem(self, nat, pbc, group, several) for (nat, pbc), group in groups.items()]

    def types(self, atoms: Atoms, frame: int) -> np.ndarray:
        """``(nat,)`` model types of the frame's elements."""
        symbols = atoms.get_chemical_symbols()
        if not symbols:
            raise DataError(f"{self.path}: frame {frame} holds no atom")
        for i, symbol in enumerate(symbols):
            if symbol in self.type_map:
                continue
            if self.fixed_types:
                raise DataError(
                    f"{self.path}: frame {frame}: element {symbol!r} (atom {i}) is not in the "
                    f"model type_map {self.type_map}; add it to model/type_map or drop the frame"
                )
            self.type_map.append(symbol)
        index = {name: t for t, name in enumerate(self.type_map)}
        return np.array([index[s] for s in symbols], dtype=np.int64)

    def geometry(self, atoms: Atoms, frame: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``coord (nat, 3)`` and ``box (3, 3)`` (rows are cell vectors; ``None``: open)."""
        where = f"{self.path}: frame {frame}"
        coord = np.asarray(atoms.positions, dtype=np.float64)
        _check_finite(coord, where, "positions")
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if not pbc.any():
            return coord, None
        if not pbc.all():
            raise DataError(
                f"{where}: pbc {pbc.tolist()} is periodic along some axes only; sezm reads "
                "frames periodic along all three axes or along none"
            )
        box = np.asarray(atoms.cell.array, dtype=np.float64)
        _check_finite(box, where, "cell")
        volume, _ = cell_volume_and_flatness(box)
        if degenerate_cells(box):
            raise DataError(
                f"{where}: periodic (pbc True) but the cell {box.tolist()} is degenerate "
                f"(volume {volume:.4g} Å^3); give three independent lattice vectors, or "
                "pbc False for open boundaries"
            )
        return coord, box

    def labels(
        self,
        atoms: Atoms,
        frame: int,
        coord: np.ndarray,
        box: np.ndarray | None,
        fields: Mapping[str, Field],
    ) -> dict[str, np.ndarray]:
        """The frame's values of ``fields`` that it holds, checked, in the layout of
        :meth:`BaseSystem.frames` without the frame axis (``force (nat, 3)``, ...)."""
        where = f"{self.path}: frame {frame}"
        nat = len(coord)
        out = {}
        for name, spec in fields.items():
            key = self.options.key(name)
            value = _lookup(atoms, key)
            if value is None and name == "virial":
                value = self._virial_from_stress(atoms, box, where)
                key = self.options.key("stress")
            if value is None:
                if spec.must:
                    raise DataError(f"{where}: no {key!r} ({name}); the model needs it")
                continue
            shape = ((nat,) if spec.atomic else ()) + spec.shape
            value = _numbers(value, where, key)
            if value.size != int(np.prod(shape)):
                raise DataError(
                    f"{where}: {key!r} ({name}) has shape {value.shape}, expected {shape} "
                    f"for {nat} atoms"
                )
            _check_finite(value, where, repr(key))
            out[name] = value.reshape(shape)
        return out

    def _virial_from_stress(self, atoms: Atoms, box: np.ndarray | None, where: str):
        """``(9,)`` virial ``-stress * volume`` (eV), or ``None`` without a stress."""
        key = self.options.key("stress")
        stress = _lookup(atoms, key)
        if stress is None:
            return None
        stress = _numbers(stress, where, key)
        if box is None:
            raise DataError(
                f"{where}: {key!r} (stress) on a frame with open boundaries, which has no "
                "volume; give a virial (eV) instead, or a periodic cell"
            )
        if stress.size == 6:
            stress = voigt_6_to_full_3x3_stress(stress)
        elif stress.size != 9:
            raise DataError(
                f"{where}: {key!r} (stress) has shape {stress.shape}, expected 6 (Voigt xx yy "
                "zz yz xz xy) or 9 values (3x3)"
            )
        _check_finite(stress, where, repr(key))
        return -stress.reshape(9) * abs(float(np.linalg.det(box)))


@dataclass
class _Group:
    """Frames of one atom count and boundary condition, found while scanning: their numbers in
    the file, and for each the index of its atom types among the distinct ``type_rows``."""

    first: int
    labels: set[str]
    frames: array = field(default_factory=lambda: array("q"))
    rows: array = field(default_factory=lambda: array("q"))
    type_rows: dict[bytes, int] = field(default_factory=dict)  # int64 bytes of (nat,) types

    def add(self, frame: int, types: np.ndarray, labels: set[str], path: Path) -> None:
        if labels != self.labels:
            raise DataError(
                f"{path}: frame {frame} has the labels {sorted(labels)} but frame {self.first}, "
                f"with the same atom count ({len(types)}) and boundaries, has "
                f"{sorted(self.labels)}; give every such frame the same labels, or put the "
                "frames in separate files"
            )
        self.frames.append(frame)
        self.rows.append(self.type_rows.setdefault(types.tobytes(), len(self.type_rows)))


class AseSystem(BaseSystem):
    """The frames of one atom count and boundary condition in a :class:`FrameFile`.

    ``file_frames (nframes,)``: the number in the file of each frame. ``path``: the file,
    with ``[nat atoms]`` (and ``, open`` for open boundaries) appended when the file holds
    several groups.
    """

    def __init__(self, file: FrameFile, nat: int, pbc: bool, group: _Group, several: bool):
        self.file = file
        self.nat, self.pbc = nat, pbc
        self.fields = file.fields
        self.present = {k: k in group.labels for k in file.fields}
        self.file_frames = np.asarray(group.frames, dtype=np.int64)
        self.nframes = len(self.file_frames)
        self._rows = np.asarray(group.rows, dtype=np.int64)  # (nframes,)
        rows = b"".join(group.type_rows)  # distinct rows, in order of first appearance
        self._types = np.frombuffer(rows, dtype=np.int64).reshape(-1, nat)  # (nrows, nat)
        self.mixed_type = len(self._types) > 1
        self.atom_type = self._types[0].copy()  # (nat,)
        suffix = f"[{nat} atoms{'' if pbc else ', open'}]" if several else ""
        self.path = Path(f"{file.path}{suffix}")

    def __repr__(self) -> str:
        return f"AseSystem({str(self.path)!r}, nat={self.nat}, nframes={self.nframes})"

    @property
    def ntypes(self) -> int | None:
        return len(self.file.type_map)

    @property
    def type_map(self) -> list[str]:
        """The element of each type."""
        return list(self.file.type_map)

    def frames(
        self, index: Sequence[int] | np.ndarray, keys: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Frames ``index`` (numbered within this group) in the layout of
        :meth:`BaseSystem.frames`."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.nframes):
            raise IndexError(f"{self.path}: frame index out of range [0, {self.nframes})")
        wanted = {
            k: f for k, f in self.fields.items() if self.present[k] and (keys is None or k in keys)
        }
        n = len(index)
        out = {"coord": np.empty((n, self.nat, 3))}
        if self.pbc:
            out["box"] = np.empty((n, 3, 3))
        out["atype"] = self._types[self._rows[index]]  # (n, nat)
        for key, spec in wanted.items():
            out[key] = np.empty((n, *((self.nat,) if spec.atomic else ()), *spec.shape))
        frames = self.file_frames[index]
        for j, (frame, atoms) in enumerate(zip(frames, self.file.read(frames))):
            coord, box = self.file.geometry(atoms, int(frame))
            if len(coord) != self.nat:
                raise DataError(f"{self.file.path}: frame {frame} changed since it was opened")
            out["coord"][j] = coord
            if self.pbc:
                out["box"][j] = box
            labels = self.file.labels(atoms, int(frame), coord, box, wanted)
            for key in wanted:
                out[key][j] = labels[key]
        return out


def xyz_frame_texts(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, text)`` of each frame of an XYZ file: an atom-count line, a comment
    line and one line per atom. Blank lines between frames are skipped."""
    with open(path, "rb") as handle:
        lines = iter(handle)
        offset = 0
        for frame in itertools.count():
            for head in lines:
                if head.strip():
                    break
                offset += len(head)
            else:
                return
            try:
                nat = int(head)
            except ValueError:
                nat = -1
            if nat < 0:
                raise DataError(
                    f"{path}: frame {frame}: expected the atom count, found "
                    f"{head[:60].decode(errors='replace').strip()!r}"
                )
            body = list(itertools.islice(lines, nat + 1))
            if len(body) < nat + 1:
                raise DataError(
                    f"{path}: frame {frame} is cut short: {nat} atoms announced, "
                    f"{max(len(body) - 1, 0)} atom line(s) follow"
                )
            text = b"".join([head, *body])
            yield offset, text
            offset += len(text)


def _lookup(atoms: Atoms, key: str):
    """``key`` from the calculator results, ``atoms.info`` or ``atoms.arrays`` (``None``)."""
    calc = atoms.calc
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    if key in atoms.info:
        return atoms.info[key]
    return atoms.arrays.get(key)


def _numbers(value, where: str, key: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {key!r} is {value!r}, not numbers") from None


def _check_finite(value: np.ndarray, where: str, what: str) -> None:
    bad = ~np.isfinite(value)
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), value.shape) if value.ndim else ()
        raise DataError(
            f"{where}: {what} holds NaN or inf ({value[at]} at index {list(map(int, at))}); "
            "fix or remove the frame"
        )
