"""Exact symmetries: rotation, translation and permutation of atoms of one type.

Each check compares the energy per atom, the forces and the virial of the moved structure with
what the symmetry predicts from the reference outputs ``ref``; the measured value is the
largest relative error :func:`~.result.relative_error` of the three.
"""

from __future__ import annotations

import numpy as np

from .result import Result, relative_error, skipped, worst
from .structure import Structure
from .subject import Evaluator, Outputs


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn proper rotation matrix ``(3, 3)`` (det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _errors(got: Outputs, want: Outputs, nat: int) -> dict[str, float]:
    return {
        "energy/atom": relative_error(got.energy / nat, want.energy / nat),
        "forces": relative_error(got.force, want.force),
        "virial": relative_error(got.virial, want.virial),
    }


def _result(name: str, errors: dict[str, float], ev: Evaluator) -> Result:
    err, which = worst(errors)
    return Result(name, err, ev.tol.symmetry, "(rel)", note=f"worst: {which}")


def check_rotation(ev: Evaluator, s: Structure, ref: Outputs, rng: np.random.Generator) -> Result:
    """``E(R r) = E(r)``, ``F(R r) = R F``, ``W(R r) = R W R^T`` for two random rotations
    (the cell rotates with the atoms)."""
    errors: dict[str, float] = {}
    for k in range(2):
        rot = random_rotation(rng)
        cell = None if s.cell is None else s.cell @ rot.T
        out = ev(s.moved(s.coord @ rot.T, cell))
        want = ref._replace(force=ref.force @ rot.T, virial=rot @ ref.virial @ rot.T)
        errors.update({f"{key} (rotation {k})": v for key, v in _errors(out, want, s.nat).items()})
    return _result("rotation: E invariant, F, virial covariant", errors, ev)


def check_translation(
    ev: Evaluator, s: Structure, ref: Outputs, rng: np.random.Generator
) -> Result:
    """Everything unchanged by a rigid shift of all atoms (not wrapped back into the cell)."""
    out = ev(s.moved(s.coord + rng.uniform(-3.0, 3.0, 3)))
    return _result("translation invariance", _errors(out, ref, s.nat), ev)


def same_type_permutation(atype: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A permutation ``(nat,)`` that shuffles atoms within each type and moves at least two;
    ``None`` when no two atoms share a type."""
    perm = np.arange(len(atype))
    groups = [np.flatnonzero(atype == t) for t in np.unique(atype)]
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        return None
    for g in groups:
        shuffled = rng.permutation(g)
        if np.array_equal(shuffled, g):
            shuffled = np.roll(g, 1)
        perm[g] = shuffled
    return perm


def check_permutation(
    ev: Evaluator, s: Structure, ref: Outputs, rng: np.random.Generator
) -> Result:
    """Relabelling atoms of the same type permutes the forces and leaves E, virial unchanged."""
    name = "permutation of same-type atoms"
    perm = same_type_permutation(s.atype, rng)
    if perm is None:
        return skipped(name, "no two atoms share a type")
    out = ev(s.moved(s.coord[perm]))
    want = ref._replace(atom_energy=ref.atom_energy[perm], force=ref.force[perm])
    return _result(name, _errors(out, want, s.nat), ev)
