"""One DeePMD-kit npy system: a folder with ``type.raw`` and ``set.*/`` holding ``<key>.npy``.

Layout (every array has one row per frame; ``nat`` atoms, the same in every frame)::

    type.raw           nat integers, the atom types of the system
    type_map.raw       optional: the element of each system type (remapped onto the model's)
    nopbc              optional empty file: open boundaries (no box.npy needed)
    set.000/coord.npy  (nf, nat*3) Å      box.npy (nf, 9), rows are the cell vectors
    set.000/<key>.npy  one array per field, e.g. energy (nf,), force (nf, nat*3)
    set.000/real_atom_types.npy   mixed-type systems only: (nf, nat) per-frame types, -1 = none
    set.000/spin.npy   spin models: (nf, nat*3) atomic spins (μB), 0 on non-magnetic atoms

Everything is checked when the system is opened (shapes, frame counts, NaN/inf, cells, types)
and every problem raises :class:`DataError` naming the system, file and frame. Arrays are
memory-mapped and read a batch of frames at a time, so large systems stay cheap to hold.
Absent optional fields are recorded in :attr:`System.present` and never filled in.
:class:`BaseSystem` is what the rest of sezm reads; files read with ASE (extxyz, ...) give
systems of the same interface (:mod:`.ase_frames`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .frames import cell_volume_and_flatness, degenerate_cells

_SCAN_VALUES = 1 << 22  # values per chunk when scanning a file for NaN/inf


class DataError(ValueError):
    """Training or test data that cannot be used; the message says where and what to fix."""


@dataclass(frozen=True)
class Field:
    """A per-frame array ``<key>.npy`` of every set (``atom_<x>`` may be ``atomic_<x>.npy``).

    ``shape``: per-frame shape, after the atom axis when ``atomic`` (``force``: ``(3,)``,
    atomic, read as ``(nf, nat, 3)``; ``energy``: ``()``, read as ``(nf,)``).
    ``must``: a system without the file is an error; otherwise it is recorded as absent.
    """

    shape: tuple[int, ...] = ()
    atomic: bool = False
    must: bool = False

    def values_per_frame(self, nat: int) -> int:
        return math.prod(self.shape) * (nat if self.atomic else 1)


@dataclass(frozen=True)
class SpinField(Field):
    """The atomic spins ``spin.npy`` of a spin model, with what is needed to recognise data in
    DeePMD-kit's older virtual-atom spin layout (:meth:`System._check_virtual_spin`).

    ``use_spin``: whether each model type is magnetic. ``virtual_scale``: the model's
    virtual-atom offset per unit spin of each type (``None`` when the model has none).
    """

    use_spin: tuple[bool, ...] = ()
    virtual_scale: tuple[float, ...] | None = None


LABEL_FIELDS: dict[str, Field] = {
    "energy": Field(()),
    "force": Field((3,), atomic=True),
    "virial": Field((9,)),
    "atom_ener": Field((), atomic=True),
    "atom_pref": Field((), atomic=True),
    "force_mag": Field((3,), atomic=True),
}
"""The labels of energy models; each is optional per system."""


@functools.lru_cache(maxsize=1024)
def _mmap(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _open(path: Path) -> np.ndarray:
    try:
        return _mmap(str(path))
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: cannot be read as a .npy array ({err})") from err


class BaseSystem:
    """Frames with a fixed atom count, as training, testing and the commands read them.

    ``path``: where the frames come from (for messages); ``nat``, ``nframes``; ``pbc``: periodic
    (frames have ``box``) or open boundaries; ``mixed_type``: atom types differ between frames;
    ``atom_type (nat,)``: the model types (of the first frame when ``mixed_type``);
    ``fields``: the fields read besides ``coord``/``box``; ``present``: whether each field is in
    the data; ``ntypes``: number of model types (``None``: not known).
    """

    path: Path
    nat: int
    nframes: int
    pbc: bool
    mixed_type: bool
    atom_type: np.ndarray
    fields: dict[str, Field]
    present: dict[str, bool]

    @property
    def ntypes(self) -> int | None:
        """Number of model types (``None``: not known)."""
        raise NotImplementedError

    def frames(
        self, index: Sequence[int] | np.ndarray, keys: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Frames ``index`` as float64/int64 arrays: ``coord (n, nat, 3)``, ``atype (n, nat)``,
        ``box (n, 3, 3)`` (periodic systems only) and every present field (or those of
        ``keys``), e.g. ``energy (n,)``, ``force (n, nat, 3)``."""
        raise NotImplementedError

    def chunks(self, batch_atoms: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(first frame, frames)`` of consecutive frames, about ``batch_atoms`` atoms (at
        least one frame) at a time, in :meth:`frames`' layout."""
        step = max(1, batch_atoms // self.nat)
        for start in range(0, self.nframes, step):
            yield start, self.frames(np.arange(start, min(start + step, self.nframes)))


class System(BaseSystem):
    """A validated npy system whose types are mapped onto the model ``type_map``.

    ``fields``: the arrays to read besides ``coord``/``box`` (default: :data:`LABEL_FIELDS`).
    ``type_map``: the model's elements; ``None`` keeps the system's type indices as they are.
    """

    def __init__(
        self,
        path: str | Path,
        type_map: Sequence[str] | None,
        fields: Mapping[str, Field] = LABEL_FIELDS,
    ) -> None:
        self.path = Path(path)
        self.fields = dict(fields)
        if not (self.path / "type.raw").is_file():
            raise DataError(f"{self.path}: not a system (no type.raw file)")
        self.pbc = not (self.path / "nopbc").is_file()
        self.sets = sorted(p for p in self.path.glob("set.*") if p.is_dir())
        if not self.sets:
            raise DataError(f"{self.path}: no set.* folder; the system holds no frames")
        self.mixed_type = self._mixed_type()
        self.type_map = self._read_type_map()
        self._set_type_index(type_map)
        raw_types = self._read_types()
        self.nat = len(raw_types)
        if not self.mixed_type:
            self._check_virtual_spin(raw_types)
        # (nat,) model types; placeholders in a mixed-type system (real_atom_types.npy rules)
        self.atom_type = raw_types if self.mixed_type else self._remap(raw_types, "type.raw")
        frames = [self._check_set(s) for s in self.sets]
        self.set_frames = np.asarray(frames, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.set_frames)])
        self.nframes = int(self._offsets[-1])
        self.present = self._presence()

    def __repr__(self) -> str:
        return f"System({str(self.path)!r}, nat={self.nat}, nframes={self.nframes})"

    # -- reading ---------------------------------------------------------------------------

    def frames(
        self, index: Sequence[int] | np.ndarray, keys: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Frames ``index`` (numbered across sets) as float64/int64 arrays.

        Keys: ``coord (n, nat, 3)``, ``atype (n, nat)``, ``box (n, 3, 3)`` (periodic systems
        only) and every present field (or those of ``keys``), e.g. ``energy (n,)``,
        ``force (n, nat, 3)``.
        """
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.nframes):
            raise IndexError(f"{self.path}: frame index out of range [0, {self.nframes})")
        which = np.searchsorted(self._offsets, index, side="right") - 1  # set of each frame
        local = index - self._offsets[which]
        out = {"coord": self._gather("coord", which, local, (self.nat, 3))}
        if self.pbc:
            out["box"] = self._gather("box", which, local, (3, 3))
        out["atype"] = self._atom_types(which, local)
        for key, field in self.fields.items():
            if self.present[key] and (keys is None or key in keys):
                shape = ((self.nat,) if field.atomic else ()) + field.shape
                out[key] = self._gather(key, which, local, shape)
        return out

    def _gather(self, stem: str, which: np.ndarray, local: np.ndarray, shape: tuple) -> np.ndarray:
        out = np.empty((len(which), *shape), dtype=np.float64)
        for s in np.unique(which):
            rows = which == s
            data = _open(self._file(self.sets[s], stem))
            data = data.reshape(self.set_frames[s], -1)
            out[rows] = data[local[rows]].reshape(-1, *shape)
        return out

    def _atom_types(self, which: np.ndarray, local: np.ndarray) -> np.ndarray:
        if not self.mixed_type:
            return np.broadcast_to(self.atom_type, (len(which), self.nat)).copy()
        out = np.empty((len(which), self.nat), dtype=np.int64)
        for s in np.unique(which):
            rows = which == s
            raw = _open(self.sets[s] / "real_atom_types.npy").reshape(self.set_frames[s], -1)
            out[rows] = self._to_model(raw[local[rows]])
        return out

    # -- types -----------------------------------------------------------------------------

    def _mixed_type(self) -> bool:
        mixed = [(s / "real_atom_types.npy").is_file() for s in self.sets]
        if any(mixed) and not all(mixed):
            with_file = [s.name for s, m in zip(self.sets, mixed) if m]
            raise DataError(
                f"{self.path}: real_atom_types.npy is in {with_file} but not in every set; "
                "a mixed-type system needs it in all sets"
            )
        return all(mixed)

    def _read_type_map(self) -> list[str] | None:
        path = self.path / "type_map.raw"
        if not path.is_file():
            return None
        return path.read_text().split()

    def _read_types(self) -> np.ndarray:
        words = (self.path / "type.raw").read_text().split()
        try:
            types = np.array([int(w) for w in words], dtype=np.int64)
        except ValueError as err:
            raise DataError(
                f"{self.path / 'type.raw'}: atom types must be integers ({err})"
            ) from err
        if types.size == 0:
            raise DataError(f"{self.path / 'type.raw'}: lists no atoms; the system is empty")
        return types

    def _set_type_index(self, model_type_map: Sequence[str] | None) -> None:
        """``_index``: model type of each system type (``None``: the same number);
        ``_nsys``: bound on system types; ``_ntypes``: bound on model types (``None``: none)."""
        sys_map = self.type_map
        self._index = None
        self._nsys = len(sys_map) if sys_map is not None else None
        self._model_names = None if model_type_map is None else list(model_type_map)
        if model_type_map is None:
            self._ntypes = self._nsys
            return
        model_type_map = list(model_type_map)
        self._ntypes = len(model_type_map)
        if sys_map is None:
            self._nsys = self._ntypes
            return
        missing = [e for e in sys_map if e not in model_type_map]
        if missing:
            raise DataError(
                f"{self.path}: element(s) {missing} of type_map.raw are not in the model "
                f"type_map {model_type_map}; add them to model/type_map"
            )
        self._index = np.array([model_type_map.index(e) for e in sys_map], dtype=np.int64)

    def _check_virtual_spin(self, raw: np.ndarray) -> None:
        """A spin model's system in DeePMD-kit's older virtual-atom spin layout is an error
        that says how to convert it: no ``spin.npy``, and ``type.raw`` holding, after the
        system types ``0..n-1``, types ``n..n+m-1`` (``m`` magnetic model types) with one atom
        per atom of the matching magnetic type (the virtual atoms that carry the spins)."""
        spin = self.fields.get("spin")
        if not isinstance(spin, SpinField) or self._nsys is None:
            return
        magnetic = [t for t, used in enumerate(spin.use_spin) if used]  # model types
        if not magnetic or any((s / "spin.npy").is_file() for s in self.sets):
            return
        nsys = self._nsys
        if raw.min() < 0 or raw.max() < nsys or raw.max() >= nsys + len(magnetic):
            return
        if self._index is None and nsys != len(spin.use_spin):
            return
        model = self._to_model(np.where(raw < nsys, raw, 0))  # real atoms' model types
        for k, t in enumerate(magnetic):
            if np.sum((raw < nsys) & (model == t)) != np.sum(raw == nsys + k):
                return
        raise DataError(self._virtual_spin_message(raw, model, magnetic, spin))

    def _virtual_spin_message(
        self, raw: np.ndarray, model: np.ndarray, magnetic: list[int], spin: SpinField
    ) -> str:
        nsys = self._nsys
        nreal = int(np.sum(raw < nsys))
        names = self._model_names

        def name(t: int) -> str:  # a magnetic model type
            return f"type-{t}" if names is None else names[t]

        pairs = "; ".join(
            f"the k-th atom of type {nsys + k} with the k-th {name(t)} atom"
            for k, t in enumerate(magnetic)
            if np.any(raw == nsys + k)
        )
        scales = set() if spin.virtual_scale is None else {spin.virtual_scale[t] for t in magnetic}
        lam = scales.pop() if len(scales) == 1 else None  # one virtual_scale for all
        if lam is not None:
            scale = f"the model's virtual_scale {lam:g}"
        elif spin.virtual_scale is not None:
            scale = "the model's virtual_scale of the atom's type"
        else:
            scale = (
                "virtual_scale = the offset of a virtual atom per μB of spin "
                "(DeePMD-kit TensorFlow's virtual_len / spin_norm)"
            )
        dist = self._virtual_distance(raw, model, magnetic)
        seen = ""
        if dist is not None:
            moment = f", i.e. |spin| = {dist / lam:.4g} μB" if lam else ""
            seen = f" (in frame 0 the virtual atoms sit {dist:.4g} Å from their atoms{moment})"
        first = " (the first ones)" if np.all(raw[:nreal] < nsys) else ""
        if self.type_map is not None:
            type_map = ""
        elif names is None:
            type_map = "; add a type_map.raw naming the real types"
        else:
            type_map = f"; add a type_map.raw naming the real types ({' '.join(names)})"
        vtypes = f"type {nsys}" if raw.max() == nsys else f"types {nsys}..{raw.max()}"
        return (
            f"{self.path}: looks like DeePMD-kit's older (TensorFlow) virtual-atom spin format, "
            f"which spin models do not read: type.raw lists {nreal} real atoms (types "
            f"0..{nsys - 1}) and {raw.size - nreal} virtual atoms ({vtypes}), one per magnetic "
            f"atom, and there is no set.*/spin.npy. Convert every set to the spin format:\n"
            f"  1. type.raw, coord.npy, force.npy: keep the {nreal} real atoms{first} in their "
            f"order{type_map};\n"
            f"  2. pair {pairs};\n"
            f"  3. spin.npy (nf, {nreal * 3}): (r_virtual - r_real) / virtual_scale on magnetic "
            f"atoms (minimum image in periodic cells), 0 on the others, with {scale}{seen};\n"
            f"  4. force_mag.npy (nf, {nreal * 3}): the virtual atom's row of force.npy on "
            f"magnetic atoms, 0 on the others. DeePMD-kit's virtual-atom format stores the "
            f"magnetic force -dE/dspin in those rows and the total atomic force in the real "
            f"atoms' rows, which force.npy keeps as they are. If your virtual rows hold the "
            f"plain force F_virtual on the virtual atom instead, use force = F_real + F_virtual "
            f"and force_mag = virtual_scale * F_virtual;\n"
            f"  5. energy.npy, box.npy, virial.npy: unchanged."
        )

    def _virtual_distance(
        self, raw: np.ndarray, model: np.ndarray, magnetic: list[int]
    ) -> float | None:
        """Mean distance (Å, minimum image) of the virtual atoms from their atoms in the first
        frame; ``None`` when the frame cannot be read."""
        try:
            coord = np.asarray(_open(self.sets[0] / "coord.npy"), dtype=np.float64)
            coord = coord.reshape(-1, raw.size, 3)[0]
            box = None
            if self.pbc:
                box = np.asarray(_open(self.sets[0] / "box.npy"), dtype=np.float64)
                box = box.reshape(-1, 3, 3)[0]
                inverse = np.linalg.inv(box)
        except (DataError, ValueError, np.linalg.LinAlgError):
            return None
        dists = []
        for k, t in enumerate(magnetic):
            real = np.flatnonzero((raw < self._nsys) & (model == t))
            d = coord[np.flatnonzero(raw == self._nsys + k)] - coord[real]
            if box is not None:
                frac = d @ inverse
                d = (frac - np.round(frac)) @ box
            dists.append(np.linalg.norm(d, axis=1))
        return float(np.concatenate(dists).mean())

    def _to_model(self, raw: np.ndarray) -> np.ndarray:
        """System types as model types; ``-1`` (no atom) stays ``-1``."""
        raw = np.asarray(raw, dtype=np.int64)
        if self._index is None:
            return raw.copy()
        return np.where(raw < 0, -1, self._index[np.maximum(raw, 0)])

    def _remap(self, raw: np.ndarray, where: str, first_frame: int = 0) -> np.ndarray:
        """Checked :meth:`_to_model` of ``raw`` (``(nat,)``, or ``(n, nat)`` per frame)."""
        raw = np.asarray(raw, dtype=np.int64)
        low = -1 if raw.ndim == 2 else 0  # only per-frame types may mark missing atoms
        high = self._nsys if self._nsys is not None else np.iinfo(np.int64).max
        bad = np.flatnonzero((raw < low) | (raw >= high))
        if bad.size:
            pos = np.unravel_index(bad[0], raw.shape)
            at = (
                f"frame {first_frame + pos[0]}, atom {pos[1]}"
                if raw.ndim == 2
                else f"atom {pos[0]}"
            )
            valid = f"0..{high - 1}" + (" or -1" if low < 0 else "")
            names = "" if self.type_map is None else f" (type_map.raw: {self.type_map})"
            raise DataError(
                f"{self.path}: {where}: type {int(raw.flat[bad[0]])} at {at} is outside "
                f"{valid}{names}; {bad.size} such atom(s)"
            )
        return self._to_model(raw)

    # -- validation ------------------------------------------------------------------------

    def _file(self, set_dir: Path, stem: str) -> Path:
        path = set_dir / f"{stem}.npy"
        if not path.is_file() and stem.startswith("atom_"):
            alt = set_dir / f"atomic_{stem[5:]}.npy"
            if alt.is_file():
                return alt
        return path

    def _check_set(self, set_dir: Path) -> int:
        """Check every file of one set; return its frame count."""
        coord_path = set_dir / "coord.npy"
        if not coord_path.is_file():
            raise DataError(f"{set_dir}: coord.npy is missing")
        coord = _open(coord_path)
        nf = coord.shape[0] if coord.ndim > 1 else 1
        if nf == 0:
            raise DataError(f"{coord_path}: holds 0 frames; remove the empty set")
        self._check_array(coord_path, "coord", nf, 3 * self.nat)
        if self.pbc:
            box_path = set_dir / "box.npy"
            if not box_path.is_file():
                raise DataError(
                    f"{set_dir}: box.npy is missing; add it, or an empty file "
                    f"{self.path / 'nopbc'} for a system without periodic boundaries"
                )
            self._check_array(box_path, "box", nf, 9)
            self._check_cells(box_path)
        if self.mixed_type:
            self._check_mixed_types(set_dir / "real_atom_types.npy", nf)
        for key, field in self.fields.items():
            path = self._file(set_dir, key)
            if path.is_file():
                self._check_array(path, key, nf, field.values_per_frame(self.nat))
            elif isinstance(field, SpinField) and field.must:
                raise DataError(
                    f"{set_dir}: {path.name} is missing; a spin model needs the atomic spins of "
                    f"every frame, ({nf}, {3 * self.nat}) in μB, 0 on non-magnetic atoms"
                )
            elif field.must:
                raise DataError(f"{set_dir}: {path.name} is missing; it is required ({key})")
        return nf

    @staticmethod
    def _frame_count(data: np.ndarray, per_frame: int) -> int:
        """Rows of a file: a 1-D array is one frame unless a frame holds one value."""
        return data.shape[0] if data.ndim > 1 or (data.ndim == 1 and per_frame == 1) else 1

    def _check_array(self, path: Path, key: str, nf: int, per_frame: int) -> None:
        data = _open(path)
        rows = self._frame_count(data, per_frame)
        if rows != nf and data.size != nf * per_frame:
            raise DataError(
                f"{path}: {rows} frame(s) (shape {data.shape}) but coord.npy of the set has {nf}; "
                "every file of a set needs one row per frame"
            )
        if data.size != nf * per_frame:
            got = data.size / max(nf, 1)
            raise DataError(
                f"{path}: shape {data.shape} gives {got:g} values per frame for {key!r}, "
                f"expected {per_frame} (nat={self.nat}); check the file and its name"
            )
        self._check_finite(path, data.reshape(nf, per_frame))

    def _check_finite(self, path: Path, data: np.ndarray) -> None:
        if data.dtype.kind not in "fc":
            if data.dtype.kind in "iub":
                return
            raise DataError(f"{path}: dtype {data.dtype} is not numeric")
        step = max(1, _SCAN_VALUES // max(data.shape[1], 1))
        for start in range(0, data.shape[0], step):
            ok = np.isfinite(data[start : start + step]).all(axis=1)
            if not ok.all():
                frame = start + int(np.argmin(ok))
                col = int(np.argmin(np.isfinite(data[frame])))
                raise DataError(
                    f"{path}: frame {frame} holds NaN or inf (value {data[frame, col]} at "
                    f"column {col}); fix or remove the frame"
                )

    def _check_cells(self, path: Path) -> None:
        box = np.asarray(_open(path), dtype=np.float64).reshape(-1, 3, 3)  # (nf, 3, 3)
        volume, _ = cell_volume_and_flatness(box)
        bad = np.flatnonzero(degenerate_cells(box))
        if bad.size:
            f = int(bad[0])
            raise DataError(
                f"{path}: frame {f} has a degenerate cell (volume {volume[f]:.4g} Å^3): "
                f"{box[f].tolist()}; rows must be three independent lattice vectors "
                f"({bad.size} such frame(s))"
            )

    def _check_mixed_types(self, path: Path, nf: int) -> None:
        data = _open(path)
        if data.size != nf * self.nat:
            raise DataError(
                f"{path}: shape {data.shape}, expected ({nf}, {self.nat}) per-frame atom types"
            )
        if data.dtype.kind not in "iu":
            values = np.asarray(data, dtype=np.float64)
            if not np.all(values == np.round(values)):
                raise DataError(f"{path}: atom types must be integers, got dtype {data.dtype}")
        data = data.reshape(nf, self.nat)
        step = max(1, _SCAN_VALUES // self.nat)
        for start in range(0, nf, step):
            self._remap(data[start : start + step], path.name, start)

    def _presence(self) -> dict[str, bool]:
        """Whether each field is present; a field found in some sets only is an error."""
        present = {}
        for key in self.fields:
            has = [self._file(s, key).is_file() for s in self.sets]
            if any(has) and not all(has):
                missing = [s.name for s, h in zip(self.sets, has) if not h]
                raise DataError(
                    f"{self.path}: {key}.npy is missing from {missing} but present "
                    "in other sets; give it in every set or in none"
                )
            present[key] = all(has)
        return present

    @property
    def ntypes(self) -> int | None:
        """Number of model types (``None`` when no type_map was given)."""
        return self._ntypes
