"""Smoothness as a neighbour crosses the cutoff.

One atom ``i`` is moved along the unit vector ``u`` pointing from a neighbour ``j`` to it, so
that the distance ``d_ij`` grows by exactly the offset ``s``; the pair closest to ``rcut``
(fewest other changes) is chosen and ``s_0 = rcut - d_ij`` puts it on the cutoff sphere.
With ``E_k``, ``F_k`` the outputs at ``s_0 + k d`` (``d = 2.5e-4`` Å) and the trapezoid
residual ``T(k) = E_k - E_-k + k d (F_k + F_-k)[i] . u`` of ``dE/ds = -F[i] . u``:

    energy step  S = |4 T(1) - T(2)| / 3
    force step   K = max |2 (F_1 - F_-1) - (F_2 - F_-2)|     (all atoms and components)

Both are Richardson combinations: for a smooth energy ``T(k) = O(d^3)`` and the forces change
linearly, so ``S`` and ``K`` are ``O(d^3)``: ~1e-8 eV/Å for ``K`` even next to a
covalent bond (``|F'''|`` ~ 1e3 eV/Å^4), ~1e-10 eV for ``S``. A jump ``J`` of the energy at the
cutoff gives ``T(1) = T(2) = J``, so ``S = J``; a kink (a jump of the forces) makes
``T = O(d^2)``, which ``S`` cancels, and ``K`` equals the jump of the forces.
"""

from __future__ import annotations

import numpy as np

from ...data.neighbors import build_edges
from .result import Result, skipped
from .structure import Structure
from .subject import Evaluator, energy_difference

STEP = 2.5e-4  # Å
SEARCH = 1.5  # look for pairs up to this factor times rcut


def crossing_pair(s: Structure, rcut: float) -> tuple[int, np.ndarray, float] | None:
    """``(i, u, s_0)``: the atom to move, its direction ``(3,)`` and the offset that puts the
    pair nearest to ``rcut`` on it; ``None`` when no two distinct atoms are within reach."""
    cell = None if s.cell is None else s.cell[None]
    edges = build_edges(s.coord[None], cell, SEARCH * rcut)
    distinct = edges.src != edges.dst
    if not distinct.any():
        return None
    vec = edges.vec[distinct]  # r_j - r_i (+ image shift), j = src, i = dst
    dist = np.linalg.norm(vec, axis=1)
    e = int(np.argmin(np.abs(dist - rcut)))
    i = int(edges.dst[distinct][e])
    return i, -vec[e] / dist[e], float(rcut - dist[e])


def check_cutoff(ev: Evaluator, s: Structure) -> list[Result]:
    """Energy (eV) and force (eV/Å) jumps at ``rcut``: an atom of the pair nearest the cutoff is
    moved onto it, then ``±STEP`` and ``±2 STEP`` across; both jumps are extrapolated to zero
    step (energy: its difference less the trapezoid integral of the force), ~0 when smooth."""
    names = ("cutoff crossing: energy continuous", "cutoff crossing: forces continuous")
    pair = crossing_pair(s, ev.rcut)
    if pair is None:
        return [skipped(n, "no two atoms within 1.5 rcut") for n in names]
    i, u, s0 = pair

    def at(k: int):
        coord = s.coord.copy()
        coord[i] += (s0 + k * STEP) * u
        return ev(s.moved(coord))

    out = {k: at(k) for k in (-2, -1, 1, 2)}

    def trapezoid(k: int) -> float:
        slope = float((out[k].force[i] + out[-k].force[i]) @ u)
        return energy_difference(out[k], out[-k]) + k * STEP * slope

    energy_step = abs(4.0 * trapezoid(1) - trapezoid(2)) / 3.0
    d1, d2 = out[1].force - out[-1].force, out[2].force - out[-2].force
    force_step = float(np.max(np.abs(2.0 * d1 - d2)))
    note = f"atom {i} moved {s0:+.2g} Å onto rcut, then +-{STEP:g} and +-{2 * STEP:g} Å"
    return [
        Result(names[0], energy_step, ev.tol.cutoff_energy, "eV", note=note),
        Result(names[1], force_step, ev.tol.cutoff_force, "eV/Å", note=note),
    ]
