"""Data statistics computed when training starts, as DeePMD-kit 3.2 computes them for DPA4.

Output statistics (``out_bias``/``out_std``) from the reduced labels of the sampled frames,
with ``c[f, t]`` the number of atoms of type ``t`` in frame ``f`` (excluded types count 0)::

    distinguish_types (energy):  bias = argmin_b || c b - y ||  (lstsq, rcond; preset rows
                                 fixed), std = std_f(y - c bias)  for every type
    intensive:                   the same with c normalised to atom fractions
    not distinguish_types:       bias = mean_f(y / n_f) (extensive) or mean_f(y) (intensive),
                                 std = the matching std, the same for every type

Fitting-input statistics of ``fparam``/``aparam``: ``avg`` and ``inv_std = 1 / max(std,
protect)`` over every sampled frame (atom for aparam).

Per-atom labels (``atom_ener``) do not enter: DeePMD-kit looks for an ``atom_energy`` label
that its loaders never produce, so its energy bias always comes from the reduced energy.

The stat file has DeePMD-kit's layout, so either program reads the other's: an HDF5 file
(``.h5``/``.hdf5``) or a folder, holding for the model's type map (group/folder named by the
elements joined by spaces, e.g. ``"O H"``) the items ``bias_atom_<key>`` and
``std_atom_<key>`` ``(ntypes, dim)`` (key ``energy`` or the property name), ``fparam`` /
``aparam`` ``(dim, 3)`` rows ``[count, sum, sum of squares]``, and ``observed_type`` (bytes).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .system import DataError

log = logging.getLogger(__name__)

_HDF5_SUFFIXES = (".h5", ".hdf5")
_MARKER = "__deepmd_output_stat_transaction__"  # present while a bias/std pair is rewritten


# -- output statistics -----------------------------------------------------------------------


def type_counts(atype: np.ndarray, ntypes: int, exclude_types: Sequence[int] = ()) -> np.ndarray:
    """``(nf, ntypes)`` float64 atoms of each type per frame; ``-1`` and excluded types: 0."""
    atype = np.asarray(atype)
    counts = np.stack([(atype == t).sum(axis=1) for t in range(ntypes)], axis=1)
    counts[:, list(exclude_types)] = 0
    return counts.astype(np.float64)


def fit_bias(
    reduced: np.ndarray,
    counts: np.ndarray,
    *,
    rcond: float | None = None,
    preset: np.ndarray | None = None,
    intensive: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-type bias ``(ntypes, dim)`` by least squares and the residual std ``(dim,)``.

    ``reduced``: ``(nf, dim)`` frame labels; ``counts``: ``(nf, ntypes)``; ``preset``:
    ``(ntypes, dim)`` fixed biases, NaN rows are fitted.
    """
    coef = counts / counts.sum(axis=1, keepdims=True) if intensive else counts.copy()
    target = reduced.copy()
    fixed = np.zeros(coef.shape[1], dtype=bool)
    if preset is not None:
        fixed = ~np.isnan(preset).any(axis=1)
        target -= coef[:, fixed] @ preset[fixed]
        coef[:, fixed] = 0.0
    bias = np.linalg.lstsq(coef, target, rcond=rcond)[0]  # (ntypes, dim)
    residual = target - coef @ bias
    if preset is not None:
        bias[fixed] = preset[fixed]
    return bias, residual.std(axis=0)


def mean_bias(
    reduced: np.ndarray, counts: np.ndarray, intensive: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The same bias and std ``(ntypes, dim)`` for every type: the mean label per atom
    (extensive) or per frame (intensive)."""
    values = reduced if intensive else reduced / counts.sum(axis=1, keepdims=True)
    ntypes = counts.shape[1]
    return np.tile(values.mean(axis=0), (ntypes, 1)), np.tile(values.std(axis=0), (ntypes, 1))


def out_stat(
    samples: Sequence[Mapping[str, np.ndarray]],
    key: str,
    ntypes: int,
    *,
    distinguish_types: bool = True,
    intensive: bool = False,
    rcond: float | None = None,
    preset: np.ndarray | None = None,
    exclude_types: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """``(bias, std)``, each ``(ntypes, dim)``, of label ``key`` over the sampled frames.

    ``samples``: per system, ``atype (n, nat)`` and ``key (n, ...)``; systems without the
    label are left out. ``preset`` is ignored when types are not distinguished.
    """
    having = [s for s in samples if key in s]
    if not having:
        raise DataError(f"no training system has {key!r} labels to compute its output bias from")
    reduced = np.concatenate([s[key].reshape(len(s[key]), -1) for s in having])  # (nf, dim)
    counts = np.concatenate([type_counts(s["atype"], ntypes, exclude_types) for s in having])
    if not distinguish_types:
        bias, std = mean_bias(reduced, counts, intensive)
    else:
        bias, std = fit_bias(reduced, counts, rcond=rcond, preset=preset, intensive=intensive)
        std = np.tile(std, (ntypes, 1))
    _log_fit_rmse(key, reduced, counts, bias, intensive)
    return bias, std


def _log_fit_rmse(
    key: str, reduced: np.ndarray, counts: np.ndarray, bias: np.ndarray, intensive: bool
) -> None:
    """Log the RMSE of the labels the bias leaves unexplained (per atom if extensive)."""
    natoms = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    diff = reduced - (counts / natoms if intensive else counts) @ bias
    if not intensive:
        diff = diff / natoms
    log.info(
        "RMSE of %s %safter linear regression: %.6g",
        key,
        "" if intensive else "per atom ",
        float(np.sqrt(np.mean(diff * diff))),
    )


def output_stat_mode(fitting: Mapping) -> dict[str, bool]:
    """``distinguish_types`` and ``intensive`` of a fitting's output statistics: a property
    fitting's own settings; per type and extensive for an energy fitting, which has neither."""
    if fitting["type"] == "property":
        return {
            "distinguish_types": bool(fitting["distinguish_types"]),
            "intensive": bool(fitting["intensive"]),
        }
    return {"distinguish_types": True, "intensive": False}


def preset_bias(
    preset_out_bias: Mapping | None, key: str, type_map: Sequence[str], dim: int
) -> np.ndarray | None:
    """``preset_out_bias[key]`` (one entry per type, ``None`` = fitted) as ``(ntypes, dim)``
    with NaN rows for fitted types; ``None`` when nothing is preset."""
    if not preset_out_bias or preset_out_bias.get(key) is None:
        return None
    entries = preset_out_bias[key]
    if len(entries) != len(type_map):
        raise DataError(
            f"preset_out_bias[{key!r}] has {len(entries)} entries for {len(type_map)} types"
        )
    if all(e is None for e in entries):
        return None
    rows = [np.full(dim, np.nan) if e is None else np.broadcast_to(e, (dim,)) for e in entries]
    return np.array(rows, dtype=np.float64)


# -- fitting-input statistics ----------------------------------------------------------------


def param_sums(
    samples: Sequence[Mapping[str, np.ndarray]],
    key: str,
    dim: int,
    default: Sequence[float] | None = None,
) -> np.ndarray:
    """``(dim, 3)`` rows ``[count, sum, sum of squares]`` of ``fparam``/``aparam`` values;
    systems without the file contribute ``default`` per frame, if given."""
    parts = []
    for s in samples:
        if key in s:
            parts.append(s[key].reshape(-1, dim))
        elif default is not None:
            parts.append(np.tile(np.asarray(default, dtype=np.float64), (len(s["atype"]), 1)))
    values = np.concatenate(parts) if parts else np.zeros((0, dim))
    count = np.full(dim, float(len(values)))
    return np.stack([count, values.sum(axis=0), (values * values).sum(axis=0)], axis=1)


def avg_inv_std(sums: np.ndarray, protect: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """``(avg, inv_std)`` ``(dim,)`` from :func:`param_sums` rows; std floored at ``protect``
    (no samples: avg 0, std 0.1)."""
    count, total, squares = sums.T
    safe = np.maximum(count, 1.0)
    avg = np.where(count > 0, total / safe, 0.0)
    std = np.sqrt(np.clip(squares / safe - avg * avg, 0.0, None))
    std = np.where(count > 0, np.maximum(std, protect), 0.1)
    return avg, 1.0 / std


def force_rmsd(samples: Sequence[Mapping], exclude_types: Sequence[int] = ()) -> float:
    """``dens_force_rmsd = sqrt(sum |F_i|^2 / n)`` over the kept atoms of the statistics frames
    (dicts with ``atype (nf, nat)`` and, where labelled, ``force``)."""
    total, count = 0.0, 0
    for sample in samples:
        if "force" not in sample:
            continue
        atype = np.asarray(sample["atype"])
        keep = (atype >= 0) & ~np.isin(atype, list(exclude_types))
        force = np.asarray(sample["force"], dtype=np.float64).reshape(*atype.shape, 3)[keep]
        total += float(np.square(force).sum())
        count += force.shape[0]
    if count == 0:
        raise ValueError("the dens statistics need force labels (dens_force_rmsd)")
    rmsd = math.sqrt(total / count)
    if rmsd <= 0.0:
        raise ValueError("the dens force RMSD of the training data is zero")
    return rmsd


def observed_types(
    samples: Sequence[Mapping[str, np.ndarray]], type_map: Sequence[str]
) -> list[str]:
    """Elements present in the sampled frames, by atomic number (unknown symbols last)."""
    from ase.data import atomic_numbers

    seen = set()
    for s in samples:
        seen.update(int(t) for t in np.unique(s["atype"]) if 0 <= t < len(type_map))
    names = [type_map[t] for t in sorted(seen)]
    return sorted(names, key=lambda e: atomic_numbers.get(e, float("inf")))


# -- stat file -------------------------------------------------------------------------------


def _h5_file(path, mode: str):
    """``h5py.File``; h5py is imported at the first statistics file, not at start-up."""
    import h5py

    return h5py.File(path, mode)


class StatFile:
    """The statistics cache of one type map, in DeePMD-kit's layout (see the module doc).

    ``mode="update"`` creates the file or folder and adds missing items; ``"read"`` requires
    every item asked for and never writes.
    """

    def __init__(self, path: str | Path, type_map: Sequence[str], mode: str = "update") -> None:
        if mode not in ("read", "update"):
            raise ValueError(f"stat_file_mode must be 'read' or 'update', got {mode!r}")
        self.path = Path(path).expanduser()
        self.group = " ".join(type_map)
        self.mode = mode
        exists = self.path.exists()
        if mode == "read" and not exists:
            raise DataError(f"stat_file {self.path} does not exist (stat_file_mode 'read')")
        self.hdf5 = self.path.is_file() or (not exists and self.path.suffix in _HDF5_SUFFIXES)

    def _has(self, name: str) -> bool:
        if self.hdf5:
            if not self.path.exists():
                return False
            with _h5_file(self.path, "r") as f:
                return f"{self.group}/{name}" in f
        return (self.path / self.group / name).is_file()

    def _load(self, name: str) -> np.ndarray:
        if self.hdf5:
            with _h5_file(self.path, "r") as f:
                return f[f"{self.group}/{name}"][()]
        return np.load(self.path / self.group / name)

    def _require(self, names: Sequence[str]) -> bool:
        """Whether every item is stored; in read mode a missing one is an error."""
        missing = [n for n in names if not self._has(n)]
        if missing and self.mode == "read":
            raise DataError(f"stat_file {self.path} [{self.group}] lacks {missing} (read mode)")
        return not missing

    def get(self, name: str) -> np.ndarray | None:
        """Item ``name``, or ``None`` when absent (update mode)."""
        return self._load(name) if self._require([name]) else None

    def get_pair(self, first: str, second: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Both items, or ``None`` if either is absent or their last write was interrupted."""
        if self._has(_MARKER):
            if self.mode == "read":
                raise DataError(f"stat_file {self.path} holds an interrupted write (read mode)")
            return None
        if not self._require([first, second]):
            return None
        return self._load(first), self._load(second)

    def put(self, items: Mapping[str, np.ndarray]) -> None:
        """Write (or replace) items; a pair is written between marker writes."""
        if self.mode == "read":
            return
        if self.hdf5:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _h5_file(self.path, "a") as f:
                group = f.require_group(self.group)
                for name, value in items.items():
                    if name in group:
                        del group[name]
                    group.create_dataset(name, data=value)
        else:
            folder = self.path / self.group
            folder.mkdir(parents=True, exist_ok=True)
            for name, value in items.items():
                with open(folder / name, "wb") as handle:
                    np.save(handle, value)

    def put_pair(self, first: str, second: str, values: tuple[np.ndarray, np.ndarray]) -> None:
        self.put({_MARKER: np.array([1], dtype=np.uint8)})
        self.put({first: values[0], second: values[1]})
        self._delete(_MARKER)

    def _delete(self, name: str) -> None:
        if self.mode == "read":
            return
        if self.hdf5:
            with _h5_file(self.path, "a") as f:
                del f[f"{self.group}/{name}"]
        else:
            (self.path / self.group / name).unlink()


# -- everything a model needs ----------------------------------------------------------------


@dataclass
class ModelStats:
    """Statistics of a model at the start of training (numpy float64).

    ``out_bias``/``out_std``: ``(1, ntypes, dim)`` (dim 1 for energy, task_dim for property);
    ``fparam_avg``/``fparam_inv_std``: ``(numb_fparam,)``, likewise for aparam, or ``None``.
    """

    out_bias: np.ndarray
    out_std: np.ndarray
    fparam_avg: np.ndarray | None
    fparam_inv_std: np.ndarray | None
    aparam_avg: np.ndarray | None
    aparam_inv_std: np.ndarray | None
    observed_type: list[str]

    def apply_to(self, model) -> None:
        """Copy the statistics into ``model``'s ``out_bias``/``out_std`` buffers and its
        fitting's fparam/aparam statistics (those the fitting has)."""
        with torch.no_grad():
            model.out_bias.copy_(torch.as_tensor(self.out_bias))
            model.out_std.copy_(torch.as_tensor(self.out_std))
            fit = model.fitting_net
            for name in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std"):
                value = getattr(self, name)
                if value is not None and getattr(fit, name, None) is not None:
                    getattr(fit, name).copy_(torch.as_tensor(value))


def model_stats(
    data,
    model_params: Mapping,
    stat_file: str | Path | None = None,
    stat_file_mode: str = "update",
) -> ModelStats:
    """Statistics of a DPA4 energy or property model over ``data`` (a training
    :class:`~sezm.data.dataset.DataSystem`), read from ``stat_file`` where it has them and
    written to it otherwise.

    ``model_params``: the normalised model section (``type_map``, ``data_stat_nbatch``,
    ``data_stat_protect``, ``preset_out_bias``, ``atom_exclude_types``, ``fitting_net``).
    The least squares run with the default rcond, as in DeePMD-kit, whose DPA4 does not pass
    ``fitting_net/rcond`` on.
    """
    type_map = list(model_params["type_map"])
    fitting = model_params["fitting_net"]
    protect = float(model_params["data_stat_protect"])
    cache = None if stat_file is None else StatFile(stat_file, type_map, stat_file_mode)
    sampled: list = []

    def samples() -> list:
        if not sampled:
            sampled.extend(data.stat_frames(int(model_params["data_stat_nbatch"])))
        return sampled

    def cached(name: str, compute):
        value = None if cache is None else cache.get(name)
        if value is None:
            value = compute()
            if cache is not None:
                cache.put({name: value})
        return value

    params = {"fparam": (None, None), "aparam": (None, None)}
    for key, default in (("fparam", fitting["default_fparam"]), ("aparam", None)):
        dim = int(fitting[f"numb_{key}"])
        if dim > 0:
            sums = cached(key, functools.partial(_param_sums, samples, key, dim, default))
            params[key] = avg_inv_std(np.asarray(sums, dtype=np.float64), protect)

    bias, std = _output_stat(samples, model_params, type_map, cache)
    observed = cached("observed_type", functools.partial(_observed, samples, type_map))
    return ModelStats(
        out_bias=bias[None],
        out_std=std[None],
        fparam_avg=params["fparam"][0],
        fparam_inv_std=params["fparam"][1],
        aparam_avg=params["aparam"][0],
        aparam_inv_std=params["aparam"][1],
        observed_type=[x.decode() if isinstance(x, bytes) else str(x) for x in observed.tolist()],
    )


def _param_sums(samples, key: str, dim: int, default) -> np.ndarray:
    return param_sums(samples(), key, dim, default)


def _observed(samples, type_map: list[str]) -> np.ndarray:
    return np.array(observed_types(samples(), type_map), dtype="S")


def _output_stat(samples, model_params: Mapping, type_map: list[str], cache: StatFile | None):
    """``(bias, std)`` ``(ntypes, dim)`` of the model's output, cached as a pair."""
    fitting = model_params["fitting_net"]
    is_property = fitting["type"] == "property"
    key = fitting["property_name"] if is_property else "energy"
    dim = int(fitting["task_dim"]) if is_property else 1
    names = (f"bias_atom_{key}", f"std_atom_{key}")
    stored = None if cache is None else cache.get_pair(*names)
    if stored is not None:
        return tuple(np.asarray(v, dtype=np.float64).reshape(len(type_map), dim) for v in stored)
    result = out_stat(
        samples(),
        key,
        len(type_map),
        **output_stat_mode(fitting),
        preset=preset_bias(model_params["preset_out_bias"], key, type_map, dim),
        exclude_types=model_params["atom_exclude_types"],
    )
    if cache is not None:
        cache.put_pair(*names, result)
    return result
