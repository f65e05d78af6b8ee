"""``sezm model-devi``: how much a committee of models disagrees, frame by frame, in the file
format of DeePMD-kit's ``dp model-devi`` (the selection criterion of DP-GEN's active learning).

Every model of the committee (``M`` models, checkpoints ``.pt`` or frozen ``.pt2``, one shared
``type_map``) evaluates every frame of every system; for a frame of ``N`` atoms, model ``m``
gives the energy ``E_m``, the forces ``F_m,i`` and the virial ``V_m`` (3x3). Deviations are
population standard deviations over the committee (divided by ``M``, not ``M - 1``):

* force of atom ``i``: ``s_i = sqrt(mean_m |F_m,i - <F_i>|^2)``, ``<F_i>`` the committee mean;
  the Euclidean norm of the three per-component deviations. With ``--relative R``:
  ``s_i / (|<F_i>| + R)``, so large forces may deviate more in absolute terms.
  ``max_devi_f``, ``min_devi_f``, ``avg_devi_f``: largest, smallest and mean ``s_i`` of the frame.
* virial per atom, ``W_m = V_m / N``: ``u_ab = sqrt(mean_m (W_m,ab - <W_ab>)^2)`` for each of
  the nine components. With ``--relative-v RV``: ``u_ab / (||<W>|| + RV)``, ``||.||`` the
  Frobenius norm of the mean per-atom virial of that frame. ``max_devi_v`` and ``min_devi_v``:
  largest and smallest ``u_ab``; ``avg_devi_v`` is **not** a mean but ``||u|| / 3``, the
  Frobenius norm of the nine deviations over three (as DeePMD-kit defines it).
* energy per atom: ``devi_e = sqrt(mean_m (E_m / N - <E / N>)^2)``.
* ``--atomic`` appends ``s_i`` of every atom (``N`` more columns).

Output, per system (systems in sorted order, each one a block)::

    # <system path>
    # step      max_devi_v         min_devi_v  ...  devi_e             [atm_devi_f(N)      ]
    <step %12d><value %19.6e> ...

``step`` is ``frame index * frequency``, frames numbered across the system's sets. The header
line is DeePMD-kit's, names padded to 10 (``step``) and 19 characters, so it does not line up
with the columns below it. Frames are evaluated and written a batch of ``batch_atoms`` atoms at a
time, so memory does not grow with the trajectory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import numpy as np

from ..compat.deepmd import CheckpointError
from ..data import (
    BaseSystem,
    DataError,
    FileOptions,
    expand_systems,
    fields_for_model,
    open_systems,
)
from .deep_pot import DeepPot

log = logging.getLogger("sezm.model_devi")

COLUMNS = (*(f"{k}_devi_{q}" for q in "vf" for k in ("max", "min", "avg")), "devi_e")
INPUTS = ("fparam", "aparam", "charge_spin")  # per-frame model inputs read from the systems


# -- deviations --------------------------------------------------------------------------------


def force_deviation(forces: np.ndarray, relative: float | None = None) -> np.ndarray:
    """Per-atom force deviation ``(nf, nat)`` of the committee's ``forces (M, nf, nat, 3)``."""
    devi = np.linalg.norm(forces.std(axis=0), axis=-1)  # (nf, nat)
    if relative is not None:
        magnitude = np.linalg.norm(forces.mean(axis=0), axis=-1)  # (nf, nat)
        devi = devi / (magnitude + relative)
    return devi


def virial_deviation(virials: np.ndarray, relative: float | None = None) -> np.ndarray:
    """Per-component deviation ``(nf, 9)`` of per-atom ``virials (M, nf, 9)``."""
    devi = virials.std(axis=0)  # (nf, 9)
    if relative is not None:
        magnitude = np.linalg.norm(virials.mean(axis=0), axis=-1)  # (nf,)
        devi = devi / (magnitude[:, None] + relative)
    return devi


def energy_deviation(energies: np.ndarray) -> np.ndarray:
    """Deviation ``(nf,)`` of per-atom ``energies (M, nf)``."""
    return energies.std(axis=0)


def deviation_table(
    energies: np.ndarray,
    forces: np.ndarray,
    virials: np.ndarray,
    relative: float | None = None,
    relative_v: float | None = None,
    atomic: bool = False,
) -> np.ndarray:
    """The value columns of :data:`COLUMNS` ``(nf, 7)`` [+ per-atom force deviations, ``(nf,
    7 + nat)`` with ``atomic``] from the committee's ``energies (M, nf)``, ``forces (M, nf, nat,
    3)`` and ``virials (M, nf, 9)`` (totals: divided by ``nat`` here)."""
    nat = forces.shape[2]
    dv = virial_deviation(virials / nat, relative_v)  # (nf, 9)
    df = force_deviation(forces, relative)  # (nf, nat)
    de = energy_deviation(energies / nat)  # (nf,)
    columns = [
        dv.max(axis=1),
        dv.min(axis=1),
        np.linalg.norm(dv, axis=1) / 3,
        df.max(axis=1),
        df.min(axis=1),
        df.mean(axis=1),
        de,
    ]
    table = np.stack(columns, axis=1)  # (nf, 7)
    return np.concatenate([table, df], axis=1) if atomic else table


# -- output ------------------------------------------------------------------------------------


def header(system: str, atomic: bool = False) -> str:
    """The two comment lines that open a system's block."""
    names = "step".ljust(10) + "".join(name.ljust(19) for name in COLUMNS)
    if atomic:
        names += "atm_devi_f(N)".ljust(19)
    return f"# {system}\n# {names}\n"


def format_rows(steps: np.ndarray, table: np.ndarray) -> str:
    """Rows of ``steps (nf,)`` and ``table (nf, ncol)``: ``%12d`` then ``%19.6e`` per value."""
    return "".join(
        f"{step:12d}" + "".join(f"{v:19.6e}" for v in row) + "\n"
        for step, row in zip(steps.tolist(), table.tolist())
    )


# -- models and systems ------------------------------------------------------------------------


def load_models(models: Sequence[str | os.PathLike | DeepPot]) -> list[DeepPot]:
    """The committee as :class:`DeepPot` objects (paths are loaded); every model must be an
    energy model without spins, and all must share the first one's ``type_map``."""
    from ..model.property_model import PropertyModel

    if not models:
        raise CheckpointError("model-devi needs at least one model")
    loaded: list[DeepPot] = []
    for item in models:
        if isinstance(item, DeepPot):
            dp, name = item, "model"
        else:
            name = os.fspath(item)
            if not Path(name).is_file():
                raise CheckpointError(f"model file not found: {name}")
            dp = DeepPot(name)
        if isinstance(dp.model, PropertyModel):
            raise CheckpointError(f"{name}: a property model; model-devi compares energy models")
        if dp.has_spin():
            raise CheckpointError(f"{name}: a spin model; model-devi supports no atomic spins")
        if loaded:
            _check_same(name, dp, loaded[0], models[0])
        loaded.append(dp)
    return loaded


def _check_same(
    name: str, dp: DeepPot, first: DeepPot, first_name: str | os.PathLike | DeepPot
) -> None:
    """``dp`` must read the systems as ``first`` does: same type_map and input sizes."""
    first_name = "the first model" if isinstance(first_name, DeepPot) else os.fspath(first_name)
    for what, get in (
        ("type_map", DeepPot.get_type_map),
        ("fparam size", DeepPot.get_dim_fparam),
        ("aparam size", DeepPot.get_dim_aparam),
    ):
        if get(dp) != get(first):
            raise CheckpointError(
                f"{name}: {what} {get(dp)} differs from {get(first)} of {first_name}; "
                f"the models of a committee must share one {what}"
            )


def _input_fields(models: Sequence[DeepPot]) -> dict:
    """The model inputs (``fparam``, ``aparam``, ``charge_spin``) any committee member reads;
    required if one member has no default for it."""
    fields: dict = {}
    for dp in models:
        for key, field in fields_for_model(dp.model_params).items():
            if key in INPUTS:
                known = fields.setdefault(key, field)
                fields[key] = replace(known, must=known.must or field.must)
    return fields


def _batches(system: BaseSystem, batch_atoms: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive frames of ``system``, about ``batch_atoms`` atoms at a time."""
    for start, frames in system.chunks(batch_atoms):
        padded = np.flatnonzero((frames["atype"] < 0).any(axis=1))
        if padded.size:
            raise DataError(
                f"{system.path}: frame {start + int(padded[0])} has padding atoms (type -1 in "
                "real_atom_types.npy); model-devi needs frames of real atoms only"
            )
        yield frames


def evaluate(
    models: Sequence[DeepPot], frames: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Energies ``(M, nf)``, forces ``(M, nf, nat, 3)`` and virials ``(M, nf, 9)`` (totals) of
    ``frames`` (``System.frames``) under each model."""
    energies, forces, virials = [], [], []
    for dp in models:
        inputs = {}
        if dp.get_dim_fparam() > 0:
            inputs["fparam"] = frames.get("fparam")  # absent: the model's default_fparam
        if dp.get_dim_aparam() > 0:
            inputs["aparam"] = frames.get("aparam")
        if "charge_spin" in frames and "charge_spin" in fields_for_model(dp.model_params):
            inputs["charge_spin"] = frames["charge_spin"]
        e, f, v = dp.eval(frames["coord"], frames.get("box"), frames["atype"], **inputs)[:3]
        energies.append(e[:, 0])  # (nf,)
        forces.append(f)  # (nf, nat, 3)
        virials.append(v)  # (nf, 9)
    return np.stack(energies), np.stack(forces), np.stack(virials)


def _system_devi(
    models: Sequence[DeepPot],
    system: BaseSystem,
    out: TextIO,
    frequency: int,
    relative: float | None,
    relative_v: float | None,
    atomic: bool,
    batch_atoms: int,
) -> np.ndarray:
    """Write one system's block to ``out``; return it as ``(nf, 8 [+ nat])`` (step first)."""
    out.write(header(str(system.path), atomic))
    blocks, done = [], 0
    for frames in _batches(system, batch_atoms):
        energies, forces, virials = evaluate(models, frames)
        table = deviation_table(energies, forces, virials, relative, relative_v, atomic)
        steps = (done + np.arange(len(table), dtype=np.int64)) * frequency  # (nf,)
        out.write(format_rows(steps, table))
        blocks.append(np.concatenate([steps[:, None].astype(np.float64), table], axis=1))
        done += len(table)
    return np.concatenate(blocks)


def model_devi(
    models: Sequence[str | os.PathLike | DeepPot],
    system: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike = "model_devi.out",
    *,
    frequency: int = 1,
    relative: float | None = None,
    relative_v: float | None = None,
    atomic: bool = False,
    batch_atoms: int = 1024,
    file_options: FileOptions | None = None,
) -> list[np.ndarray]:
    """Model deviation of the committee ``models`` on every system under ``system``, written
    to ``output`` (replaced if it exists); returns one ``(nf, 8 [+ nat])`` table per system,
    columns ``step`` and :data:`COLUMNS` [and the per-atom force deviations].
    ``file_options``: how files among the systems are read with ASE."""
    systems = expand_systems(system)  # DataError if none is found
    committee = load_models(models)
    type_map = committee[0].get_type_map()
    fields = _input_fields(committee)
    opened = [s for p in systems for s in open_systems(p, type_map, fields, file_options)]
    tables = []
    with open(output, "w") as out:
        for sys_ in opened:
            table = _system_devi(
                committee, sys_, out, frequency, relative, relative_v, atomic, batch_atoms
            )
            log.info(
                "%s: %d frames, max_devi_f %.3e .. %.3e, max_devi_v %.3e .. %.3e",
                sys_.path,
                len(table),
                table[:, 4].min(),
                table[:, 4].max(),
                table[:, 1].min(),
                table[:, 1].max(),
            )
            tables.append(table)
    log.info(
        "model deviation of %d model(s) on %d system(s) written to %s",
        len(committee),
        len(systems),
        output,
    )
    return tables
