"""Energy drift of NVE molecular dynamics with a sezm model: ASE (``SeZMCalculator``) and
LAMMPS (``pair_style deepmd`` with a sezm ``.pt2``), on the bundled 192-atom water box.

Both engines start from the same positions and the same Maxwell-Boltzmann velocities (drawn
once, written into the LAMMPS data file), integrate with velocity Verlet at ``--dt`` fs and
record the total energy every ``--every`` steps. The drift is the slope of a least-squares line
through ``E_tot(t)``, per atom (meV/atom/ps); the spread is ``max - min`` of ``E_tot`` per atom.

    python benchmarks/nve_drift.py --checkpoint model.ckpt.pt --steps 4000 --engine ase
    PYTHONPATH=. /tmp/oracle/bin/python -m sezm freeze -c model.ckpt.pt -o water --no-with-comm
    source /tmp/oracle/env.sh && python benchmarks/nve_drift.py --pt2 water.pt2 --engine lammps

``--float64`` also runs ASE with the checkpoint rebuilt in float64 (a copy written next to it).
The LAMMPS executable is ``--lmp`` (default: ``$SEZM_LMP`` or ``lmp`` on ``PATH``); it runs on
one MPI rank with ``OMP_NUM_THREADS`` threads as set by the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sezm.infer.check import read_structure
from sezm.infer.check.nve import NVETrace

MASSES = {"O": 15.999, "H": 1.008}


@dataclass
class Run:
    engine: str
    precision: str
    steps: int
    dt_fs: float
    drift: float  # meV/atom/ps
    spread: float  # meV/atom
    seconds: float
    closest: float | None = None  # Å, the closest pair over the recorded frames (ASE only)


def initial_atoms(temperature: float, seed: int):
    """The bundled water frame with Maxwell-Boltzmann velocities (no net momentum)."""
    from ase import Atoms, units
    from ase.md.velocitydistribution import Stationary

    s = read_structure(None, 0, ["O", "H"])
    atoms = Atoms(
        symbols=[("O", "H")[t] for t in s.atype], positions=s.coord, cell=s.cell, pbc=True
    )
    atoms.set_masses([MASSES[x] for x in atoms.get_chemical_symbols()])
    rng = np.random.default_rng(seed)
    width = np.sqrt(atoms.get_masses() * units.kB * temperature)[:, None]
    atoms.set_momenta(width * rng.normal(size=(len(atoms), 3)))
    Stationary(atoms)
    return atoms


def run_ase(atoms, model: str, steps: int, dt: float, every: int) -> tuple[NVETrace, float]:
    """The trace and the closest pair (Å) met on the recorded frames: a model that lets atoms
    collapse makes the drift meaningless, however small."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from sezm.calculator import SeZMCalculator

    atoms = atoms.copy()
    atoms.calc = SeZMCalculator(model, device="cpu")
    totals, closest = [], [np.inf]

    def record() -> None:
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        dist = atoms.get_all_distances(mic=True)
        closest[0] = min(closest[0], float(dist[np.triu_indices(len(atoms), 1)].min()))

    dyn = VelocityVerlet(atoms, timestep=dt * units.fs)
    dyn.attach(record, interval=every)  # observers also run before the first step
    dyn.run(steps)
    time = 1e-3 * dt * every * np.arange(len(totals))
    return NVETrace(time, np.array(totals), len(atoms)), closest[0]


def float64_copy(checkpoint: str) -> str:
    """The checkpoint rebuilt in float64 (``<name>.float64.pt`` next to it)."""
    import torch

    from sezm.model.build import load_model, with_precision
    from sezm.train.checkpoint import model_state

    model, ckpt = load_model(checkpoint, precision="float64")
    path = Path(checkpoint).with_suffix(".float64.pt")
    params = with_precision(ckpt.model_params, "float64")
    torch.save({"model": model_state(model, params, 0.0, ckpt.train_infos.get("step", 0))}, path)
    return str(path)


LAMMPS_INPUT = """units metal
boundary p p p
atom_style atomic
atom_modify map yes
read_data water.data
mass 1 {mass_o}
mass 2 {mass_h}
pair_style deepmd {model}
pair_coeff * * O H
timestep {dt_ps}
fix 1 all nve
thermo_style custom step pe ke etotal
thermo_modify format float %.15g
thermo {every}
run {steps}
"""


def write_data(path: Path, atoms) -> None:
    """LAMMPS data file (atomic style) with velocities in Å/ps; the box must be orthorhombic
    or lower triangular, as the bundled one is."""
    from ase import units

    a, b, c = atoms.cell.array
    types = [1 if x == "O" else 2 for x in atoms.get_chemical_symbols()]
    lines = ["sezm water", "", f"{len(atoms)} atoms", "2 atom types", ""]
    lines += [f"0.0 {a[0]:.12f} xlo xhi", f"0.0 {b[1]:.12f} ylo yhi", f"0.0 {c[2]:.12f} zlo zhi"]
    lines += [f"{b[0]:.12f} {c[0]:.12f} {c[1]:.12f} xy xz yz", "", "Atoms # atomic", ""]
    for i, (t, (x, y, z)) in enumerate(zip(types, atoms.positions)):
        lines.append(f"{i + 1} {t} {x:.12f} {y:.12f} {z:.12f}")
    lines += ["", "Velocities", ""]
    velocities = atoms.get_velocities() * (1000.0 * units.fs)  # ASE units -> Å/ps
    for i, (vx, vy, vz) in enumerate(velocities):
        lines.append(f"{i + 1} {vx:.12f} {vy:.12f} {vz:.12f}")
    path.write_text("\n".join(lines) + "\n")


def run_lammps(atoms, pt2: str, steps: int, dt: float, every: int, lmp: str) -> NVETrace:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_data(work / "water.data", atoms)
        (work / "in.lammps").write_text(
            LAMMPS_INPUT.format(
                mass_o=MASSES["O"],
                mass_h=MASSES["H"],
                model=Path(pt2).resolve(),
                dt_ps=1e-3 * dt,
                every=every,
                steps=steps,
            )
        )
        done = subprocess.run(
            [lmp, "-in", "in.lammps"], cwd=work, capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        sys.exit(f"{lmp} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["Step", "PotEng"]) + 1
    rows = []
    for ln in lines[start:]:
        parts = ln.split()
        if len(parts) != 4 or not parts[0].isdigit():
            break
        rows.append([float(x) for x in parts])
    table = np.array(rows)
    return NVETrace(1e-3 * dt * table[:, 0], table[:, 3], len(atoms))


def measured(
    engine: str, precision: str, steps: int, dt: float, trace, seconds: float, closest=None
) -> Run:
    run = Run(engine, precision, steps, dt, trace.drift, trace.spread, seconds, closest)
    where = "" if closest is None else f", closest pair {closest:.3f} Å"
    print(
        f"{engine:7s} {precision:8s} {steps} x {dt:g} fs ({steps * dt / 1000:g} ps): "
        f"drift {run.drift:+.4f} meV/atom/ps, spread {run.spread:.4f} meV/atom{where}, "
        f"{seconds:.0f} s",
        flush=True,
    )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint for the ASE runs")
    parser.add_argument("--pt2", help="frozen model for the LAMMPS run")
    parser.add_argument("--engine", choices=["ase", "lammps", "both"], default="both")
    parser.add_argument("--float64", action="store_true", help="also ASE in float64")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--dt", type=float, default=0.5, help="time step (fs)")
    parser.add_argument("--every", type=int, default=10, help="steps between energy records")
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lmp", default=os.environ.get("SEZM_LMP") or shutil.which("lmp"))
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    atoms = initial_atoms(args.temperature, args.seed)
    runs = []
    if args.engine in ("ase", "both"):
        if args.checkpoint is None:
            parser.error("--engine ase needs --checkpoint")
        models = [("native", args.checkpoint)]
        if args.float64:
            models.append(("float64", float64_copy(args.checkpoint)))
        for precision, model in models:
            start = time.perf_counter()
            trace, closest = run_ase(atoms, model, args.steps, args.dt, args.every)
            seconds = time.perf_counter() - start
            runs.append(measured("ase", precision, args.steps, args.dt, trace, seconds, closest))
    if args.engine in ("lammps", "both"):
        if args.pt2 is None or args.lmp is None:
            parser.error("--engine lammps needs --pt2 and a LAMMPS executable (--lmp)")
        start = time.perf_counter()
        trace = run_lammps(atoms, args.pt2, args.steps, args.dt, args.every, args.lmp)
        runs.append(
            measured("lammps", "pt2", args.steps, args.dt, trace, time.perf_counter() - start)
        )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
