"""What ``sezm check`` evaluates: a model behind one call, and the tolerances of its precision.

A checkpoint is rebuilt in float64 (its float32 weights cast exactly), so that rounding does not
hide what the checks measure; a ``.pt2`` runs in the precision it was compiled in.

Tolerances (energies are compared per atom; ``rel(a, b) = max|a - b| / (1 + max|b|)``):

=======================  ==========  ==========  =============================================
check                    float64     float32     why
=======================  ==========  ==========  =============================================
symmetries (rel)         1e-9        1e-4        float64 rounding through a few layers stays
                                                 near 1e-13; float32 (eps 1.2e-7) summed over
                                                 ~100 neighbours and several blocks: ~1e-5
forces / virial vs FD    1e-6        5e-3        central differences with step h err by
(rel)                    (h 1e-5)    (h 3e-3)    ~h^2 |F''| / 6 + eps |E_i| sqrt(nat) / h
                                                 (energy differences summed atom by atom).
                                                 float64, water: 2e-8 + 1e-8 eV/Å, and below
                                                 1e-6 up to ~1e5 atoms; float32: the best h
                                                 (measured on water .pt2: 1e-3 and 1e-2 are
                                                 2x worse) leaves 2-4e-4
cutoff energy step (eV)  1e-6        1e-3        Richardson-cancelled to O(d^3) ~ 1e-10; what
                                                 remains is rounding of the atomic energies
cutoff force step (eV/Å) 1e-5        1e-2        Richardson-cancelled to O(d^3) ~ 1e-8 next to
                                                 a covalent bond; float32: rounding of F
NVE drift (meV/atom/ps)  5           5           see ``nve.py``
=======================  ==========  ==========  =============================================

Any sign, factor or broken symmetry of a real model is orders of magnitude above these (forces
are O(1) eV/Å); only rounding sits below them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ...data.graph import build_graph
from ...model.energy import EnergyModel
from .structure import Structure


class CheckError(ValueError):
    """A model or option that ``sezm check`` cannot test; the message says why."""


@dataclass(frozen=True)
class Tolerances:
    """Pass limits of the checks at one precision."""

    symmetry: float  # relative
    fd_step: float  # Å, and strain
    fd: float  # relative
    cutoff_energy: float  # eV
    cutoff_force: float  # eV/Å


TOLERANCES = {
    "float64": Tolerances(
        symmetry=1e-9, fd_step=1e-5, fd=1e-6, cutoff_energy=1e-6, cutoff_force=1e-5
    ),
    "float32": Tolerances(
        symmetry=1e-4, fd_step=3e-3, fd=5e-3, cutoff_energy=1e-3, cutoff_force=1e-2
    ),
}


class Outputs(NamedTuple):
    """``energy`` eV, ``atom_energy (nat,)`` eV, ``force (nat, 3)`` eV/Å, ``virial (3, 3)`` eV,
    all float64."""

    energy: float
    atom_energy: np.ndarray
    force: np.ndarray
    virial: np.ndarray


def energy_difference(a: Outputs, b: Outputs) -> float:
    """``E_a - E_b`` summed atom by atom: the rounding of each atomic energy (~eps |E_i|) adds
    up to ~eps |E_i| sqrt(nat), not eps |E| as in the difference of the totals, so finite
    differences of a 1e4-atom system stay as accurate as those of a molecule."""
    return float(np.sum(a.atom_energy - b.atom_energy))


class Evaluator:
    """Energy, forces and virial of one :class:`Structure` by an ``EnergyModel`` or a
    ``FrozenModel`` (the same ``model(graph)`` call); ``label`` names it in messages."""

    def __init__(self, model, precision: str, label: str) -> None:
        if precision not in TOLERANCES:
            raise CheckError(f"{label}: precision {precision!r}; sezm check tests float32/64")
        self.model = model
        self.precision = precision
        self.tol = TOLERANCES[precision]
        self.label = label
        self.rcut = float(model.rcut)
        self.type_map = list(model.type_map)
        self.calls = 0

    def __call__(self, s: Structure) -> Outputs:
        cell = None if s.cell is None else s.cell[None]
        graph = build_graph(s.coord[None], cell, s.atype[None], self.rcut)
        out = self.model(graph, virial=True)
        self.calls += 1

        def arr(key: str) -> np.ndarray:
            return out[key][0].detach().double().cpu().numpy()

        virial = arr("virial").reshape(3, 3)
        return Outputs(float(arr("energy")), arr("atom_energy"), arr("force"), virial)


@dataclass
class Subject:
    """The model under test, its eager/frozen counterpart (if given) and the data statistics."""

    evaluator: Evaluator
    min_nbor_dist: float | None  # Å, the training data's closest pair; None: not recorded
    counterpart: tuple[Evaluator, Evaluator] | None = None  # (frozen, eager native precision)


def load_subject(
    model: str, pt2: str | None = None, checkpoint: str | None = None, head: str | None = None
) -> Subject:
    """The subject of ``sezm check MODEL [--pt2 PT2 | --checkpoint CKPT]``."""
    frozen_model = _is_pt2(model)
    if pt2 is not None and frozen_model:
        raise CheckError(f"--pt2 {pt2}: MODEL {model} is already a .pt2; use --checkpoint CKPT")
    if checkpoint is not None and not frozen_model:
        raise CheckError(f"--checkpoint {checkpoint}: MODEL {model} is a checkpoint; use --pt2")
    if pt2 is not None and not _is_pt2(pt2):
        raise CheckError(f"--pt2 {pt2}: expected a frozen model file ending in .pt2")
    if checkpoint is not None and _is_pt2(checkpoint):
        raise CheckError(f"--checkpoint {checkpoint}: expected a .pt checkpoint, not a .pt2")
    ckpt_path = checkpoint if frozen_model else model
    frozen_path = model if frozen_model else pt2
    # --head selects the checkpoint's branch; a .pt2 alone has one
    frozen = (
        None if frozen_path is None else _frozen(frozen_path, head if ckpt_path is None else None)
    )
    if ckpt_path is None:  # a .pt2 alone
        return Subject(
            frozen, _recorded(frozen.model.metadata.get("sezm", {}).get("min_nbor_dist"))
        )
    eager64, min_dist = _checkpoint(ckpt_path, head, "float64")
    subject = Subject(frozen if frozen_model else eager64, min_dist)
    if frozen is not None:
        eager, _ = _checkpoint(ckpt_path, head, None)
        _same_model(frozen, eager)
        subject.counterpart = (frozen, eager)
    return subject


def _is_pt2(path: str) -> bool:
    return os.fspath(path).endswith(".pt2")


def _recorded(value) -> float | None:
    """A stored ``min_nbor_dist``; DeePMD-kit and sezm store -1 (or nothing) when the
    neighbour statistics were skipped."""
    return float(value) if value is not None and float(value) > 0 else None


def _checkpoint(path: str, head: str | None, precision: str | None) -> tuple[Evaluator, float]:
    from ...model.build import load_model

    model, _ = load_model(path, head, precision=precision)
    if type(model) is not EnergyModel:
        raise CheckError(
            f"{path}: a {type(model).__name__}; sezm check tests energy models (energy, "
            "forces, virial) without spin or dens heads"
        )
    model.requires_grad_(False)
    native = str(model.descriptor.opts.basics.dtype).removeprefix("torch.")
    label = f"{path} (float64)" if precision else f"{path} ({native})"
    return Evaluator(model, native, label), _recorded(model.min_nbor_dist.item())


def _frozen(path: str, head: str | None) -> Evaluator:
    from ..pt2 import FrozenModel

    if head is not None:
        raise CheckError(f"{path}: a frozen model has one head; --head applies to checkpoints")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"frozen model not found: {path}")
    model = FrozenModel(path)
    if model.metadata.get("is_spin"):
        raise CheckError(f"{path}: a spin model; sezm check tests energy models without spin")
    # packages from elsewhere do not say; float32 tolerances are the safe side
    precision = model.metadata.get("sezm", {}).get("dtype", "float32")
    return Evaluator(model, precision, f"{path} ({precision})")


def _same_model(frozen: Evaluator, eager: Evaluator) -> None:
    if frozen.type_map != eager.type_map or abs(frozen.rcut - eager.rcut) > 1e-12:
        raise CheckError(
            f"{frozen.label} and {eager.label} are different models (type_map "
            f"{frozen.type_map} vs {eager.type_map}, rcut {frozen.rcut:g} vs {eager.rcut:g})"
        )
