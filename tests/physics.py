"""Reusable float64 physics checks for energy models (cf. NequIP's model test mixins).

Every ``check_*`` function takes a model (an ``EnergyModel``, built in float64) and a small
:class:`System`, evaluates the model through the public path ``build_graph -> model(graph)``,
and raises :class:`PhysicsCheckError` (an ``AssertionError``) naming the quantity, the error
and the tolerance when a property does not hold. On success it returns the measured errors,
so tests can log them. A check that cannot fail is worthless: ``tests/model/test_physics.py`` breaks
the model on purpose and asserts that the matching check raises.

Checks: proper rotations (and mirrors of planar systems, which are rotations in disguise),
inversion (only for achiral models; DPA4 with directional features is chiral), translation,
permutation, periodic images, locality, forces and virials by finite differences, atomic
virials/energies summing to totals, 2x2x2 supercells, smoothness across ``rcut`` and along any
line scan, batched frames (periodic, open and mixed in one graph), train-mode random edge-frame
rolls. Each compares energy, atomic energies, forces, virial and atomic virials.

Tolerances (float64 models, energies O(1-10) eV, forces O(1) eV/Å):

* exact symmetries (rotation, translation, permutation, periodic images, locality, supercells,
  batching, random edge-frame roll): ``max|a - b| <= 1e-9 (1 + max|b|)``;
* finite differences (forces, virial): central differences with step ``1e-5`` Å (or strain),
  ``max|a - b| <= 1e-6 (1 + max|b|)``; truncation ~ h^2 |E'''| ~ 1e-10 and rounding
  ~ 1e-16 |E| / h ~ 1e-10, so 1e-6 leaves a wide margin and still catches any factor or sign;
* cutoff smoothness: a pair crossing ``rcut`` changes the energy by ``O(d^4)`` and the forces by
  ``O(d^3)`` at distance ``d`` from ``rcut`` (C^3 envelopes); required: jumps at
  ``d = 0.02, 0.005`` Å no larger than the jump at ``d = 0.08`` Å scaled by ``(d/0.08)^2.5``
  (energy) / ``^1.5`` (forces), below ``1e-6`` eV / ``1e-4`` eV/Å at ``d = 0.005`` Å, and no
  hidden step on a scan through ``rcut`` (autograd force = FD of the scan to ``1e-3``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sezm.data.graph import build_graph
from sezm.geometry import edge_frame
from sezm.infer.check.symmetry import random_rotation
from sezm.model.graph import Graph

EXACT = 1e-9
FD = 1e-6
FD_STEP = 1e-5


class PhysicsCheckError(AssertionError):
    """A physical property of the model does not hold."""


@dataclass(frozen=True)
class System:
    """One frame: ``coord (nat, 3)`` Å, ``atype (nat,)``, ``cell (3, 3)`` rows or ``None``."""

    coord: np.ndarray
    atype: np.ndarray
    cell: np.ndarray | None = None

    @property
    def nat(self) -> int:
        return len(self.atype)

    def moved(self, coord: np.ndarray, cell: np.ndarray | None = None) -> System:
        return replace(self, coord=coord, cell=self.cell if cell is None else cell)


# --- systems -----------------------------------------------------------------------------------
def random_cluster(
    nat: int, ntypes: int, seed: int, *, size: float = 3.0, min_dist: float = 1.0
) -> System:
    """Non-periodic cluster of ``nat`` atoms in a cube of side ``size``, pairs >= ``min_dist``."""
    rng = np.random.default_rng(seed)
    coord: list[np.ndarray] = []
    while len(coord) < nat:
        p = rng.uniform(0.0, size, 3)
        if all(np.linalg.norm(p - q) >= min_dist for q in coord):
            coord.append(p)
    atype = np.arange(nat) % ntypes
    rng.shuffle(atype)
    return System(np.array(coord), atype)


def random_crystal(nat: int, ntypes: int, seed: int, *, length: float = 3.2) -> System:
    """Periodic triclinic cell of side ~``length`` holding ``nat`` atoms (pairs >= 0.9 Å, images
    included), small enough that atoms see periodic images of themselves within a few Å."""
    rng = np.random.default_rng(seed)
    cell = length * (np.eye(3) + 0.15 * rng.uniform(-1, 1, (3, 3)))
    images = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    shifts = images @ cell
    coord: list[np.ndarray] = []
    while len(coord) < nat:
        p = rng.uniform(0.0, 1.0, 3) @ cell
        if all(np.min(np.linalg.norm(p - q - shifts, axis=1)) >= 0.9 for q in coord):
            coord.append(p)
    atype = np.arange(nat) % ntypes
    rng.shuffle(atype)
    return System(np.array(coord), atype, cell)


# --- evaluation --------------------------------------------------------------------------------
def graph_of(model, frames: list[System]) -> Graph:
    """One graph of frames that share ``nat`` and are all periodic or all open."""
    coord = np.stack([f.coord for f in frames])
    cells = [f.cell for f in frames]
    cell = None if cells[0] is None else np.stack(cells)
    atype = np.stack([f.atype for f in frames])
    return build_graph(coord, cell, atype, model.rcut)


def merge_graphs(graphs: list[Graph]) -> Graph:
    """Concatenate graphs with the same atoms per frame (periodic and open frames may mix)."""
    nloc = graphs[0].atype.shape[1]
    src, dst, offset = [], [], 0
    for g in graphs:
        if g.atype.shape[1] != nloc:
            raise ValueError("merge_graphs needs the same number of atoms in every frame")
        src.append(g.src + offset)
        dst.append(g.dst + offset)
        offset += g.atype.numel()
    return Graph(
        atype=torch.cat([g.atype for g in graphs]),
        src=torch.cat(src),
        dst=torch.cat(dst),
        edge_vec=torch.cat([g.edge_vec for g in graphs]),
    )


def run_graph(model, graph: Graph) -> dict[str, np.ndarray]:
    out = model(graph, virial=True, atomic_virial=True)
    return {k: v.detach().double().cpu().numpy() for k, v in out.items()}


def evaluate(model, system: System) -> dict[str, np.ndarray]:
    """``energy ()``, ``atom_energy (nat,)``, ``force (nat, 3)``, ``virial (3, 3)``,
    ``atom_virial (nat, 3, 3)`` of one frame, as float64 arrays."""
    out = run_graph(model, graph_of(model, [system]))
    return frame_outputs(out, 0)


def frame_outputs(out: dict[str, np.ndarray], f: int) -> dict[str, np.ndarray]:
    nat = out["force"].shape[1]
    return {
        "energy": out["energy"][f],
        "atom_energy": out["atom_energy"][f],
        "force": out["force"][f],
        "virial": out["virial"][f].reshape(3, 3),
        "atom_virial": out["atom_virial"][f].reshape(nat, 3, 3),
    }


def energy(model, system: System) -> float:
    """Total energy only (no backward pass): what the finite differences differentiate."""
    with torch.no_grad():
        g = graph_of(model, [system])
        return float(model.atomic_energy(g, g.edge_vec).sum())


# --- comparison --------------------------------------------------------------------------------
def compare(what: str, got, want, tol: float, errors: dict[str, float]) -> None:
    """Record ``max|got - want|`` and raise if it exceeds ``tol (1 + max|want|)``."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise PhysicsCheckError(f"{what}: shape {got.shape} vs {want.shape}")
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    bound = tol * (1.0 + (float(np.max(np.abs(want))) if want.size else 0.0))
    errors[what] = err
    if not err <= bound:
        raise PhysicsCheckError(f"{what}: max|error| {err:.3e} > tolerance {bound:.3e}")


def compare_outputs(
    tag: str,
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    tol: float,
    errors: dict[str, float],
    keys=("energy", "atom_energy", "force", "virial", "atom_virial"),
) -> None:
    for key in keys:
        compare(f"{tag}: {key}", got[key], want[key], tol, errors)


# --- (a) rotations and reflections -------------------------------------------------------------
def check_rotation(model, system: System, *, n: int = 2, seed: int = 0, tol: float = EXACT):
    """``E(Rr) = E(r)``, ``E_i`` invariant, ``F(Rr) = R F``, ``W(Rr) = R W R^T`` (also per atom),
    for ``n`` random proper rotations (cell rows rotated with the atoms)."""
    rng = np.random.default_rng(seed)
    ref, errors = evaluate(model, system), {}
    for k in range(n):
        rot = random_rotation(rng)
        cell = None if system.cell is None else system.cell @ rot.T
        out = evaluate(model, system.moved(system.coord @ rot.T, cell))
        want = {
            "energy": ref["energy"],
            "atom_energy": ref["atom_energy"],
            "force": ref["force"] @ rot.T,
            "virial": rot @ ref["virial"] @ rot.T,
            "atom_virial": rot @ ref["atom_virial"] @ rot.T,
        }
        compare_outputs(f"rotation {k}", out, want, tol, errors)
    return errors


def reflection_error(model, system: System) -> float:
    """``|E(-r) - E(r)|``: how far the model is from parity invariance (no assertion; a model
    built from SO(3) tensor products with m-mixing weights is generally chiral)."""
    cell = None if system.cell is None else -system.cell
    return abs(energy(model, system.moved(-system.coord, cell)) - energy(model, system))


def check_inversion(model, system: System, *, tol: float = EXACT):
    """``E(-r) = E(r)``, ``F(-r) = -F(r)``: holds only for parity-invariant (achiral) models."""
    cell = None if system.cell is None else -system.cell
    ref, errors = evaluate(model, system), {}
    out = evaluate(model, system.moved(-system.coord, cell))
    want = dict(ref, force=-ref["force"])
    compare_outputs("inversion", out, want, tol, errors)
    return errors


def check_planar_reflection(model, system: System, *, seed: int = 0, tol: float = EXACT):
    """A mirror ``M`` of a planar system equals a proper rotation ``R = M S`` of it (``S``, the
    mirror through the plane, fixes every atom), so even a chiral model must give the same
    energies and ``F -> R F``, ``W -> R W R^T``. ``system`` must be open; it is flattened onto
    a randomly oriented plane first."""
    if system.cell is not None:
        raise ValueError("check_planar_reflection needs an open system")
    rng = np.random.default_rng(seed)
    flat = system.coord.copy()
    flat[:, 2] = 0.0
    rot = random_rotation(rng)
    planar = system.moved(flat @ rot.T)
    through = np.eye(3) - 2.0 * np.outer(rot[:, 2], rot[:, 2])
    ref, errors = evaluate(model, planar), {}
    for k in range(2):
        axis = rot[:, 0] if k == 0 else rng.normal(size=3)
        axis = axis / np.linalg.norm(axis)
        mirror = np.eye(3) - 2.0 * np.outer(axis, axis)
        proper = mirror @ through
        out = evaluate(model, planar.moved(planar.coord @ mirror.T))
        want = {
            "energy": ref["energy"],
            "atom_energy": ref["atom_energy"],
            "force": ref["force"] @ proper.T,
            "virial": proper @ ref["virial"] @ proper.T,
            "atom_virial": proper @ ref["atom_virial"] @ proper.T,
        }
        compare_outputs(f"planar mirror {k}", out, want, tol, errors)
    return errors


def out_of_plane_force(model, system: System) -> float:
    """Largest force component normal to a planar (z = 0) copy of an open ``system``: zero for a
    parity-invariant model, generally not for a chiral one (no assertion)."""
    flat = system.coord.copy()
    flat[:, 2] = 0.0
    return float(np.abs(evaluate(model, system.moved(flat))["force"][:, 2]).max())


# --- (b) translation, (c) permutation, (d) periodic images -----------------------------------
def check_translation(model, system: System, *, seed: int = 0, tol: float = EXACT):
    """Everything invariant under a rigid shift (not wrapped back into the cell); net force 0."""
    rng = np.random.default_rng(seed)
    ref, errors = evaluate(model, system), {}
    out = evaluate(model, system.moved(system.coord + rng.uniform(-7.0, 7.0, 3)))
    compare_outputs("translation", out, ref, tol, errors)
    compare("net force", ref["force"].sum(0), np.zeros(3), tol, errors)
    return errors


def check_permutation(model, system: System, *, seed: int = 0, tol: float = EXACT):
    """Relabelling atoms permutes per-atom outputs and leaves totals unchanged."""
    perm = np.random.default_rng(seed).permutation(system.nat)
    ref, errors = evaluate(model, system), {}
    out = evaluate(model, replace(system, coord=system.coord[perm], atype=system.atype[perm]))
    want = {k: (v[perm] if k.startswith("atom_") or k == "force" else v) for k, v in ref.items()}
    compare_outputs("permutation", out, want, tol, errors)
    return errors


def check_periodic_images(model, system: System, *, seed: int = 0, tol: float = EXACT):
    """Moving atoms by lattice vectors (and wrapping them into the cell) changes nothing."""
    if system.cell is None:
        raise ValueError("check_periodic_images needs a periodic system")
    rng = np.random.default_rng(seed)
    ref, errors = evaluate(model, system), {}
    shifts = rng.integers(-2, 3, (system.nat, 3))
    moved = system.coord + shifts @ system.cell
    compare_outputs("image shift", evaluate(model, system.moved(moved)), ref, tol, errors)
    frac = np.linalg.solve(system.cell.T, moved.T).T
    wrapped = (frac - np.floor(frac)) @ system.cell
    compare_outputs("wrapped", evaluate(model, system.moved(wrapped)), ref, tol, errors)
    return errors


def check_locality(model, a: System, b: System, *, tol: float = EXACT):
    """Two open fragments farther apart than ``rcut`` do not interact: the energy of the pair
    is the sum of the fragments' and per-atom outputs are the fragments' own."""
    if a.cell is not None or b.cell is not None:
        raise ValueError("check_locality needs open fragments")
    shift = a.coord.max(0) - b.coord.min(0) + model.rcut + 0.5
    both = System(np.vstack([a.coord, b.coord + shift]), np.concatenate([a.atype, b.atype]))
    out, errors = evaluate(model, both), {}
    ra, rb = evaluate(model, a), evaluate(model, b)
    want = {k: np.concatenate([ra[k], rb[k]]) for k in ("atom_energy", "force", "atom_virial")}
    want["energy"] = ra["energy"] + rb["energy"]
    want["virial"] = ra["virial"] + rb["virial"]
    compare_outputs("locality", out, want, tol, errors)
    return errors


# --- (e) forces and (f) virials by finite differences ------------------------------------------
def fd_forces(model, system: System, h: float = FD_STEP) -> np.ndarray:
    """``-dE/dr`` by central differences ``(nat, 3)``."""
    out = np.zeros((system.nat, 3))
    for i in range(system.nat):
        for a in range(3):
            plus, minus = system.coord.copy(), system.coord.copy()
            plus[i, a] += h
            minus[i, a] -= h
            diff = energy(model, system.moved(plus)) - energy(model, system.moved(minus))
            out[i, a] = -diff / (2.0 * h)
    return out


def check_forces_fd(model, system: System, *, h: float = FD_STEP, tol: float = FD):
    """Autograd forces equal central finite differences of the energy."""
    errors: dict[str, float] = {}
    compare(
        "force vs -dE/dr",
        evaluate(model, system)["force"],
        fd_forces(model, system, h),
        tol,
        errors,
    )
    return errors


def strained(system: System, eps: np.ndarray) -> System:
    """``r -> (I + eps) r`` for atoms and cell vectors."""
    deform = np.eye(3) + eps
    cell = None if system.cell is None else system.cell @ deform.T
    return system.moved(system.coord @ deform.T, cell)


def fd_virial(model, system: System, h: float = FD_STEP) -> np.ndarray:
    """``W_ab = -dE/d eps_ab`` for the homogeneous deformation ``r -> (I + eps) r``."""
    out = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            diff = energy(model, strained(system, eps)) - energy(model, strained(system, -eps))
            out[a, b] = -diff / (2.0 * h)
    return out


def check_virial_fd(model, system: System, *, h: float = FD_STEP, tol: float = FD):
    """Virial equals ``-dE/d eps`` by central differences; atomic virials sum to the virial and
    atomic energies to the energy (open systems too: the strain then moves only the atoms)."""
    ref, errors = evaluate(model, system), {}
    compare("virial vs -dE/d eps", ref["virial"], fd_virial(model, system, h), tol, errors)
    compare("sum atom_virial", ref["atom_virial"].sum(0), ref["virial"], EXACT, errors)
    compare("sum atom_energy", ref["atom_energy"].sum(), ref["energy"], EXACT, errors)
    return errors


# --- (g) supercells ----------------------------------------------------------------------------
def supercell(system: System, reps=(2, 2, 2)) -> System:
    cells = np.array(
        [[i, j, k] for i in range(reps[0]) for j in range(reps[1]) for k in range(reps[2])]
    )
    shifts = cells @ system.cell
    coord = (system.coord[None] + shifts[:, None]).reshape(-1, 3)
    return System(coord, np.tile(system.atype, len(cells)), np.diag(reps) @ system.cell)


def check_supercell(model, system: System, *, reps=(2, 2, 2), tol: float = EXACT):
    """``E(n1 x n2 x n3) = n E``; forces, atomic energies and atomic virials replicate."""
    if system.cell is None:
        raise ValueError("check_supercell needs a periodic system")
    n = int(np.prod(reps))
    ref, errors = evaluate(model, system), {}
    out = evaluate(model, supercell(system, reps))
    want = {
        "energy": n * ref["energy"],
        "virial": n * ref["virial"],
        **{
            k: np.tile(ref[k], (n,) + (1,) * (ref[k].ndim - 1))
            for k in ("atom_energy", "force", "atom_virial")
        },
    }
    compare_outputs("supercell", out, want, tol, errors)
    return errors


# --- (h) smoothness across the cutoff ----------------------------------------------------------
def crossing_system(model, system: System, *, seed: int = 0) -> tuple[System, np.ndarray]:
    """``system`` (open) with its last atom moved so that exactly one pair sits at ``rcut``:
    the probe is put at ``r_k + rcut u`` beyond the atom ``k`` most advanced along a direction
    ``u`` chosen so that every other atom stays clearly outside the cutoff of the probe.
    Returns the system and ``u`` (the probe then moves along ``u``)."""
    if system.cell is not None:
        raise ValueError("crossing_system needs an open cluster")
    rng = np.random.default_rng(seed)
    rest = system.coord[:-1]
    best = None
    for _ in range(64):
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        proj = rest @ u
        order = np.argsort(proj)[::-1]
        margin = proj[order[0]] - proj[order[1]] if len(rest) > 1 else np.inf
        if best is None or margin > best[0]:
            best = (margin, u, order[0])
    margin, u, atom = best
    if margin < 0.1:
        raise ValueError("crossing_system: no direction isolates a single pair")
    coord = system.coord.copy()
    coord[-1] = rest[atom] + model.rcut * u
    return system.moved(coord), u


def check_cutoff_smoothness(
    model,
    system: System,
    *,
    distances=(8e-2, 2e-2, 5e-3),
    e_order: float = 2.5,
    f_order: float = 1.5,
    e_tol: float = 1e-6,
    f_tol: float = 1e-4,
):
    """A pair crossing ``rcut`` (``crossing_system``), compared at ``rcut - d`` and ``rcut + d``.
    C^3 envelopes make the energy jump ``O(d^4)`` and the force jump ``O(d^3)``; required:
    relative to the first (largest) ``d_0``, ``jump(d) <= jump(d_0) (d/d_0)^order`` with orders
    2.5 (energy) and 1.5 (forces), and at the smallest ``d`` the jumps are below ``e_tol`` eV /
    ``f_tol`` eV/Å. A scan over ``rcut +- 1.25 d_0`` must be free of hidden steps: the
    autograd force along the line matches finite differences of the scanned energies."""
    base, direction = crossing_system(model, system)
    probe = system.nat - 1

    def at(offset: float) -> dict[str, np.ndarray]:
        coord = base.coord.copy()
        coord[probe] = coord[probe] + offset * direction
        return evaluate(model, base.moved(coord))

    errors: dict[str, float] = {}
    jumps = []
    for d in distances:
        inside, outside = at(-d), at(+d)
        de = abs(float(inside["energy"] - outside["energy"]))
        df = float(np.max(np.abs(inside["force"] - outside["force"])))
        errors[f"dE at d={d:g}"], errors[f"dF at d={d:g}"] = de, df
        jumps.append((d, de, df))
    d0, e0, f0 = jumps[0]
    for d, de, df in jumps[1:]:
        e_max = max(e0 * (d / d0) ** e_order, 1e-12)
        f_max = max(f0 * (d / d0) ** f_order, 1e-10)
        if not (de <= e_max and df <= f_max):
            raise PhysicsCheckError(
                f"cutoff crossing: jumps at rcut +- {d:g} (energy {de:.3e}, force {df:.3e}) "
                f"do not decay from those at +- {d0:g} (energy {e0:.3e}, force {f0:.3e}) at "
                f"orders {e_order} / {f_order}: energy or force jump at rcut"
            )
    d, de, df = jumps[-1]
    if not (de <= e_tol and df <= f_tol):
        raise PhysicsCheckError(
            f"cutoff crossing at rcut +- {d:g}: energy jump {de:.3e} (tol {e_tol:.1e}), "
            f"force jump {df:.3e} (tol {f_tol:.1e})"
        )
    step = distances[0] / 8.0
    errors.update(check_line_scan(model, base, probe, direction, np.arange(-10, 11) * step))
    return errors


def check_line_scan(
    model, system: System, atom: int, direction: np.ndarray, offsets: np.ndarray, *, tol=1e-3
):
    """Move ``atom`` along ``direction`` by equally spaced ``offsets``: the autograd force along
    the line must match fourth-order central differences of the scanned energies to
    ``tol max(1, |F|)`` (a step or kink anywhere on the path shows up as a mismatch)."""
    step = float(offsets[1] - offsets[0])
    e, f_line = [], []
    for offset in offsets:
        coord = system.coord.copy()
        coord[atom] = coord[atom] + offset * direction
        out = evaluate(model, system.moved(coord))
        e.append(float(out["energy"]))
        f_line.append(float(out["force"][atom] @ direction))
    e, f_line = np.array(e), np.array(f_line)
    fd = -(e[:-4] - 8.0 * e[1:-3] + 8.0 * e[3:-1] - e[4:]) / (12.0 * step)
    err = float(np.max(np.abs(fd - f_line[2:-2])))
    if not err <= tol * max(1.0, float(np.abs(f_line).max())):
        raise PhysicsCheckError(
            f"line scan of atom {atom}: force along the line differs from finite differences "
            f"of the energy by {err:.3e} (max|F| {np.abs(f_line).max():.3e})"
        )
    return {"scan force vs FD": err}


# --- (i) batching -------------------------------------------------------------------------------
def check_batching(model, periodic: list[System], open_: list[System], *, tol: float = EXACT):
    """A batch of periodic frames (different cells), a batch of open frames and one merged graph
    of both kinds each equal the frame-by-frame results. An open frame is also evaluated in a
    vacuum box wider than its extent + rcut, which must equal the open result."""
    errors: dict[str, float] = {}
    singles = [evaluate(model, s) for s in periodic + open_]
    graphs = []
    for group in (periodic, open_):
        if not group:
            continue
        g = graph_of(model, group)
        graphs.append(g)
        out = run_graph(model, g)
        offset = 0 if group is periodic else len(periodic)
        for f in range(len(group)):
            compare_outputs(
                f"batched frame {offset + f}",
                frame_outputs(out, f),
                singles[offset + f],
                tol,
                errors,
            )
    if len(graphs) == 2:
        out = run_graph(model, merge_graphs(graphs))
        for f, single in enumerate(singles):
            compare_outputs(f"merged frame {f}", frame_outputs(out, f), single, tol, errors)
    if open_:
        s = open_[0]
        width = np.ptp(s.coord, axis=0) + 2.0 * model.rcut + 1.0
        boxed = evaluate(model, System(s.coord - s.coord.min(0), s.atype, np.diag(width)))
        compare_outputs("open frame in vacuum box", boxed, singles[len(periodic)], tol, errors)
    return errors


# --- (j) random edge-frame roll ----------------------------------------------------------------
@contextlib.contextmanager
def train_mode(model) -> Iterator[None]:
    was = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def count_calls(module, name: str) -> Iterator[list[int]]:
    """Count the calls of ``module.name`` inside the block."""
    original = getattr(module, name)
    calls = [0]

    def spy(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(module, name, spy)
    try:
        yield calls
    finally:
        setattr(module, name, original)


def check_random_roll(model, system: System, *, tol: float = EXACT):
    """In train mode with ``random_gamma`` every edge frame gets a random roll about its local z;
    outputs must equal eval mode up to rounding, and the roll must really have been applied."""
    if not model.descriptor.opts.geometry.random_gamma:
        raise ValueError("check_random_roll needs descriptor.random_gamma = true")
    ref, errors = evaluate(model, system), {}
    with train_mode(model), count_calls(edge_frame, "random_roll") as calls:
        outs = [evaluate(model, system) for _ in range(2)]
    if calls[0] < 2:
        raise PhysicsCheckError("train mode did not apply the random edge-frame roll")
    for k, out in enumerate(outs):
        compare_outputs(f"random roll {k}", out, ref, tol, errors)
    return errors


# --- determinism -------------------------------------------------------------------------------
class _AccumulatingIndexPut(TorchDispatchMode):
    """Records the target shape of every floating ``index_put`` that accumulates."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in (
            torch.ops.aten.index_put,
            torch.ops.aten.index_put_,
            torch.ops.aten._index_put_impl_,
        ):
            accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
            if accumulate and args[0].is_floating_point():
                self.shapes.append(tuple(args[0].shape))
        return func(*args, **kwargs)


def accumulating_index_puts(model, graph: Graph) -> list[tuple]:
    """Targets of the accumulating ``index_put`` calls of a training step's passes on ``graph``:
    forces (and magnetic forces) with ``create_graph``, then a force loss's parameter gradient.
    On the CPU such a call adds rows that share a target in the order the threads reach them,
    so a model that makes one is not reproducible on several threads."""
    model.train()
    try:
        with _AccumulatingIndexPut() as mode:
            out = model(graph, create_graph=True)
            loss = out["energy"].square().sum() + out["force"].square().sum()
            if "force_mag" in out:
                loss = loss + out["force_mag"].square().sum()
            loss.backward(inputs=[p for p in model.parameters() if p.requires_grad])
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return mode.shapes


# --- all of them ---------------------------------------------------------------------------------
CHECKS: dict[str, Callable] = {
    "rotation": check_rotation,
    "translation": check_translation,
    "permutation": check_permutation,
    "periodic_images": check_periodic_images,
    "forces_fd": check_forces_fd,
    "virial_fd": check_virial_fd,
    "supercell": check_supercell,
    "locality": check_locality,
    "cutoff": check_cutoff_smoothness,
    "random_roll": check_random_roll,
}
