"""Energy drift of a short NVE run (ASE velocity Verlet).

Velocities are drawn from the Maxwell-Boltzmann distribution at ``temperature`` (fixed seed,
no net momentum) and the total energy ``E_tot = E_pot + E_kin`` is recorded at every step. The
drift is the slope of a least-squares line through ``E_tot(t)``, per atom, in meV/atom/ps.

Velocity Verlet conserves a shadow energy: for a smooth conservative force field ``E_tot``
only oscillates (amplitude ~ dt^2) around a constant, so the slope fitted to a run of 100 fs
is mostly these oscillations over the run's length, not a secular drift: 1.6 meV/atom/ps for
the trained water example on its 192-atom box in float64 (spread 0.33 meV/atom), 0.2 for
its ``.pt2`` on five molecules. A force that is not ``-dE/dr`` (a sign error drifts at ~1e3)
or a time step too long for the fastest vibration make it grow steadily. The limit, 5
meV/atom/ps, sits between the two; a run of a few ps (``benchmarks/nve_drift.py``) measures
the drift itself (``docs/check.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .result import Result, skipped
from .structure import Structure
from .subject import Evaluator

DRIFT_LIMIT = 5.0  # meV/atom/ps


@dataclass(frozen=True)
class NVETrace:
    """``time (n,)`` ps and ``total (n,)`` eV of ``natoms`` atoms."""

    time: np.ndarray
    total: np.ndarray
    natoms: int

    @property
    def drift(self) -> float:
        """Slope of the least-squares line through the total energy, meV/atom/ps."""
        slope = np.polyfit(self.time, self.total, 1)[0]
        return float(1e3 * slope / self.natoms)

    @property
    def spread(self) -> float:
        """``max - min`` of the total energy, meV/atom."""
        return float(1e3 * np.ptp(self.total) / self.natoms)


def run_nve(atoms, steps: int, dt_fs: float, temperature: float, seed: int = 0) -> NVETrace:
    """``steps`` velocity-Verlet steps of ``atoms`` (with a calculator attached) from
    Maxwell-Boltzmann velocities at ``temperature`` K."""
    from ase import units
    from ase.md.velocitydistribution import Stationary
    from ase.md.verlet import VelocityVerlet

    # Maxwell-Boltzmann momenta p ~ N(0, m kT) per component (drawn here: the ASE helper
    # changed its name between the versions sezm supports)
    rng = np.random.default_rng(seed)
    width = np.sqrt(atoms.get_masses() * units.kB * temperature)[:, None]
    atoms.set_momenta(width * rng.normal(size=(len(atoms), 3)))
    Stationary(atoms)
    totals = []

    def record() -> None:
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())

    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    dyn.attach(record, interval=1)  # observers also run before the first step
    dyn.run(steps)
    time = 1e-3 * dt_fs * np.arange(len(totals))
    return NVETrace(time, np.asarray(totals), len(atoms))


def _calculator(ev: Evaluator, s: Structure):
    """An ASE calculator of energy and forces by ``ev`` (atom types of ``s``)."""
    from ase.calculators.calculator import Calculator, all_changes

    class EvaluatorCalculator(Calculator):
        implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces"]

        def calculate(self, atoms=None, properties=None, system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            cell = self.atoms.cell.array if s.cell is not None else None
            out = ev(s.moved(self.atoms.positions.copy(), cell))
            self.results = {"energy": out.energy, "free_energy": out.energy, "forces": out.force}

    return EvaluatorCalculator()


def atoms_of(s: Structure, type_map: list[str]):
    """``ase.Atoms`` of ``s`` (element names from ``type_map``)."""
    from ase import Atoms

    symbols = [type_map[t] for t in s.atype]
    if s.cell is None:
        return Atoms(symbols=symbols, positions=s.coord)
    return Atoms(symbols=symbols, positions=s.coord, cell=s.cell, pbc=True)


def check_nve(
    ev: Evaluator, s: Structure, steps: int, dt_fs: float, temperature: float, seed: int
) -> Result:
    """Total-energy drift (meV/atom/ps) of ``steps`` velocity-Verlet steps of ``dt_fs`` fs from
    ``temperature`` K; skipped without steps or where a type is not an element."""
    name = "NVE energy drift"
    if steps <= 0:
        return skipped(name, "--nve-steps 0")
    from ase.data import atomic_numbers

    unknown = sorted({ev.type_map[t] for t in s.atype} - set(atomic_numbers))
    if unknown:
        return skipped(name, f"types {unknown} are not elements (no masses)")
    atoms = atoms_of(s, ev.type_map)
    atoms.calc = _calculator(ev, s)
    trace = run_nve(atoms, steps, dt_fs, temperature, seed)
    note = (
        f"{steps} steps of {dt_fs:g} fs from {temperature:g} K; "
        f"E_tot spread {trace.spread:.3g} meV/atom"
    )
    return Result(name, abs(trace.drift), DRIFT_LIMIT, "meV/atom/ps", note=note)
