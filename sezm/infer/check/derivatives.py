"""Forces and virial against central finite differences of the energy.

    F_ia  = -dE/dr_ia        ~ -(E(r + h e_ia) - E(r - h e_ia)) / 2h
    W_ab  = -dE/d eps_ab     ~ -(E((I + h e_ab) r) - E((I - h e_ab) r)) / 2h

where the strain ``r -> (I + eps) r`` moves atoms and cell vectors alike. Forces are
differenced for a few atoms only (each costs six evaluations): the one with the largest force
and others drawn at random. Energy differences are summed atom by atom
(:func:`~.subject.energy_difference`). The measured value is
``max|autograd - FD| / (1 + max|FD|)``.
"""

from __future__ import annotations

import numpy as np

from .result import Result, relative_error
from .structure import Structure
from .subject import Evaluator, Outputs, energy_difference


def probe_atoms(force: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` atom indices: the largest force first, then random others (sorted)."""
    nat = len(force)
    first = int(np.argmax(np.linalg.norm(force, axis=1)))
    others = rng.permutation(np.delete(np.arange(nat), first))[: max(count - 1, 0)]
    return np.sort(np.concatenate([[first], others]).astype(np.int64))


def fd_forces(ev: Evaluator, s: Structure, atoms: np.ndarray, h: float) -> np.ndarray:
    """``-dE/dr`` of ``atoms`` by central differences, ``(len(atoms), 3)``."""
    out = np.zeros((len(atoms), 3))
    for n, i in enumerate(atoms):
        for a in range(3):
            plus, minus = s.coord.copy(), s.coord.copy()
            plus[i, a] += h
            minus[i, a] -= h
            diff = energy_difference(ev(s.moved(plus)), ev(s.moved(minus)))
            out[n, a] = -diff / (2.0 * h)
    return out


def strained(s: Structure, eps: np.ndarray) -> Structure:
    """``r -> (I + eps) r`` for atoms and cell vectors."""
    deform = np.eye(3) + eps
    cell = None if s.cell is None else s.cell @ deform.T
    return s.moved(s.coord @ deform.T, cell)


def fd_virial(ev: Evaluator, s: Structure, h: float) -> np.ndarray:
    """``-dE/d eps`` by central differences, ``(3, 3)``."""
    out = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            diff = energy_difference(ev(strained(s, eps)), ev(strained(s, -eps)))
            out[a, b] = -diff / (2.0 * h)
    return out


def check_forces(
    ev: Evaluator, s: Structure, ref: Outputs, rng: np.random.Generator, count: int
) -> Result:
    """Forces of ``count`` probe atoms against central finite differences of the energy."""
    atoms = probe_atoms(ref.force, count, rng)
    fd = fd_forces(ev, s, atoms, ev.tol.fd_step)
    return Result(
        "forces = -dE/dr (finite differences)",
        relative_error(ref.force[atoms], fd),
        ev.tol.fd,
        "(rel)",
        note=f"atoms {', '.join(map(str, atoms))}, step {ev.tol.fd_step:g} Å",
    )


def check_virial(ev: Evaluator, s: Structure, ref: Outputs) -> Result:
    """The virial against central finite differences of the energy under a small strain."""
    fd = fd_virial(ev, s, ev.tol.fd_step)
    return Result(
        "virial = -dE/d strain (finite differences)",
        relative_error(ref.virial, fd),
        ev.tol.fd,
        "(rel)",
        note=f"strain step {ev.tol.fd_step:g}",
    )
