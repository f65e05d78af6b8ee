"""LAMMPS MD speed with each engine's `.pt2`: sezm's package vs DeePMD-kit 3.2's, same input.

    source /tmp/oracle/env.sh   # puts DeePMD-kit's lmp (pair_style deepmd) on PATH
    python benchmarks/bench_lammps.py --case tiny --replicate 1 27 --rounds 3

Freezes the parity checkpoint ``tests/data/parity/<case>/model.pt`` once with each engine into
``--work`` (``sezm freeze --no-with-comm`` with this interpreter, ``dp --pt freeze`` with the
oracle's ``dp``, both on one thread; an existing package there is reused), then runs the same
LAMMPS NVE input with each package under the same ``lmp``: the 192-atom periodic water frame of
the case, replicated
``n = k^3`` times (``--replicate``), ``units metal``, 0.5 fs, velocities drawn at 330 K,
``--warmup`` steps, then ``--steps`` timed steps. The speed is LAMMPS' own ``timesteps/s`` of the
timed run (the "Performance" line after its "Loop time"), also divided by LAMMPS' "% CPU use"
of that run (steps per CPU second, which other jobs on a shared machine disturb less); peak memory is the maximum resident set
size of the ``lmp`` process tree (``wait4``). Engines alternate for ``--rounds`` rounds, one MPI
rank and ``--threads`` OpenMP/intra-op threads each (default 1; same environment for both); the
median of the rounds is reported with the ratio sezm / DeePMD-kit and the 1-minute load average before each size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_large import PARITY, replicated

MASSES = {"O": 15.999, "H": 1.008}
ENGINES = ("sezm", "deepmd")

LAMMPS_INPUT = """units           metal
boundary        p p p
atom_style      atomic
atom_modify     map yes
read_data       {data}
replicate       {k} {k} {k}
mass            1 {mass_o}
mass            2 {mass_h}
pair_style      deepmd {model}
pair_coeff      * * O H
neighbor        2.0 bin
velocity        all create 330.0 4928459 loop geom
timestep        0.0005
fix             1 all nve
thermo_style    custom step pe ke etotal
thermo_modify   format float %.10g
thermo          {warmup}
run             {warmup}
thermo          {steps}
run             {steps}
"""

LOOP = re.compile(r"Loop time of ([\d.eE+-]+) on (\d+) procs for (\d+) steps with (\d+) atoms")
PERFORMANCE = re.compile(r"([\d.eE+-]+) timesteps/s")
CPU_USE = re.compile(r"([\d.]+)% CPU use with")
ALLOCATOR_ENV = re.compile(r"MALLOC_\w+_|THP_MEM_ALLOC_ENABLE")  # settings that change the speed


@dataclass
class Run:
    steps_per_s: float
    cpu_use: float  # CPU time / wall time of the timed run (LAMMPS' "% CPU use"), 0-1
    loop_s: float
    natoms: int
    peak_mb: float
    energy0: float  # potential energy at step 0 (eV): both engines must see the same system


def write_data(path: Path, case: str) -> None:
    """The case's 192-atom water frame as a LAMMPS data file (orthorhombic or lower-triangular
    box, LAMMPS types 1 = O, 2 = H as in the model's type map)."""
    coord, box, atype = replicated(case, [1, 1, 1])
    a, b, c = box
    if abs(a[1]) + abs(a[2]) + abs(b[2]) > 1e-8:
        sys.exit(f"{case}: the water frame's box is not lower triangular: {box.tolist()}")
    frac = coord @ np.linalg.inv(box)
    coord = (frac - np.floor(frac)) @ box  # every atom inside the box
    lines = ["water frame of the parity case " + case, "", f"{len(atype)} atoms", "2 atom types"]
    lines += [
        "",
        f"0.0 {a[0]:.10f} xlo xhi",
        f"0.0 {b[1]:.10f} ylo yhi",
        f"0.0 {c[2]:.10f} zlo zhi",
    ]
    if abs(b[0]) + abs(c[0]) + abs(c[1]) > 0:  # a triclinic box
        lines.append(f"{b[0]:.10f} {c[0]:.10f} {c[1]:.10f} xy xz yz")
    lines += ["", "Atoms # atomic", ""]
    lines += [
        f"{i + 1} {t + 1} {x:.10f} {y:.10f} {z:.10f}"
        for i, (t, (x, y, z)) in enumerate(zip(atype, coord))
    ]
    path.write_text("\n".join(lines) + "\n")


def freeze(engine: str, case: str, work: Path, dp: str) -> Path:
    """``work/<engine>_<case>.pt2``, frozen now unless it is already there."""
    out = work / f"{engine}_{case}.pt2"
    if out.is_file():
        return out
    checkpoint = str(PARITY / case / "model.pt")
    if engine == "sezm":
        command = [
            sys.executable,
            "-m",
            "sezm",
            "freeze",
            "-c",
            checkpoint,
            "-o",
            str(out.with_suffix("")),
            "--no-with-comm",
        ]
    else:
        command = [dp, "--pt", "freeze", "-c", checkpoint, "-o", str(out)]
    print("freezing:", " ".join(command), flush=True)
    # on one thread: DeePMD-kit's package builds its kernels for the freezing thread count, and
    # the one frozen on one thread is its faster one, on one thread and on two (sezm's kernels
    # take their threads from the running process)
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=thread_env())
    if done.returncode != 0 or not out.is_file():
        sys.exit(
            f"freezing {case} with {engine} failed (exit {done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return out


def allocator_settings() -> str:
    """The allocator variables of this environment, as ``NAME=value`` (or ``default``)."""
    names = sorted(n for n in os.environ if ALLOCATOR_ENV.fullmatch(n))
    return " ".join(f"{n}={os.environ[n]}" for n in names) or "default"


def thread_env(threads: int = 1) -> dict[str, str]:
    """``threads`` OpenMP and intra-op threads (one inter-op thread), for both engines alike."""
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        DP_INTRA_OP_PARALLELISM_THREADS=str(threads),
        DP_INTER_OP_PARALLELISM_THREADS="1",
    )


def run_lammps(
    lmp: str,
    model: Path,
    data: Path,
    k: int,
    warmup: int,
    steps: int,
    threads: int = 1,
    preload: str | None = None,
) -> Run:
    """One LAMMPS run; its timed part is the second ``run`` command."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "in.lammps").write_text(
            LAMMPS_INPUT.format(
                data=data,
                k=k,
                mass_o=MASSES["O"],
                mass_h=MASSES["H"],
                model=model.resolve(),
                warmup=warmup,
                steps=steps,
            )
        )
        proc = subprocess.Popen(
            [lmp, "-in", "in.lammps", "-screen", "none", "-log", "log.lammps"],
            cwd=folder,
            env=dict(thread_env(threads), **({"LD_PRELOAD": preload} if preload else {})),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        stderr = proc.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log = (folder / "log.lammps").read_text() if (folder / "log.lammps").is_file() else ""
    loops, speeds, cpu = LOOP.findall(log), PERFORMANCE.findall(log), CPU_USE.findall(log)
    if proc.returncode != 0 or len(loops) != 2 or len(speeds) != 2 or len(cpu) != 2:
        sys.exit(
            f"{lmp} with {model.name} failed (exit {proc.returncode}):\n"
            f"{log[-3000:]}\n{stderr[-3000:]}"
        )
    loop_s, _, timed_steps, natoms = loops[1]
    if int(timed_steps) != steps:
        sys.exit(f"{model.name}: LAMMPS timed {timed_steps} steps, expected {steps}")
    return Run(
        float(speeds[1]),
        float(cpu[1]) / 100,
        float(loop_s),
        int(natoms),
        usage.ru_maxrss / 1024,
        energy0(log),
    )


def energy0(log: str) -> float:
    """Potential energy of the first thermo row (step 0)."""
    lines = log.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["Step", "PotEng"])
    return float(lines[header + 1].split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="parity case (default: tiny)")
    ap.add_argument(
        "--replicate",
        type=int,
        nargs="+",
        default=[1, 27],
        help="supercell multipliers n = k^3 (1 -> 192 atoms, 27 -> 5,184)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed run")
    ap.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[100],
        help="timed steps, one per --replicate entry or one for all",
    )
    ap.add_argument("--threads", type=int, default=1, help="OpenMP/intra-op threads of LAMMPS")
    ap.add_argument("--work", default="bench_lammps_work", help="folder for the .pt2 packages")
    ap.add_argument(
        "--sezm-allocator",
        metavar="LIBRARY",
        help="LD_PRELOAD this library in sezm's runs only: sezm's caching CPU allocator, "
        "compiled against the lmp's libtorch (`python -m sezm.cpu_allocator` with its Python)",
    )
    ap.add_argument(
        "--lmp",
        default=os.environ.get("SEZM_LMP") or shutil.which("lmp"),
        help="LAMMPS with pair_style deepmd (default: $SEZM_LMP or lmp on PATH)",
    )
    ap.add_argument(
        "--dp",
        default=shutil.which("dp") or "/tmp/oracle/bin/dp",
        help="DeePMD-kit 3.2's dp, for its own freeze",
    )
    args = ap.parse_args()
    if args.lmp is None:
        ap.error("no LAMMPS: source /tmp/oracle/env.sh, set SEZM_LMP or pass --lmp")
    if len(args.steps) not in (1, len(args.replicate)):
        ap.error("--steps takes one value or one per --replicate entry")
    cells = []
    for mult in args.replicate:
        k = round(mult ** (1 / 3))
        if k**3 != mult:
            ap.error(f"--replicate {mult} is not a cube (1, 8, 27, 64, ...)")
        cells.append(k)
    steps = args.steps * len(cells) if len(args.steps) == 1 else args.steps
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for case in args.case or ["tiny"]:
        models = {engine: freeze(engine, case, work, args.dp) for engine in ENGINES}
        data = work / f"{case}.data"
        write_data(data, case)
        for k, n_steps in zip(cells, steps):
            load = os.getloadavg()[0]
            runs: dict[str, list[Run]] = {engine: [] for engine in ENGINES}
            for _ in range(args.rounds):
                for engine in ENGINES:
                    runs[engine].append(
                        run_lammps(
                            args.lmp,
                            models[engine],
                            data,
                            k,
                            args.warmup,
                            n_steps,
                            args.threads,
                            args.sezm_allocator if engine == "sezm" else None,
                        )
                    )
            speed = {e: statistics.median(r.steps_per_s for r in runs[e]) for e in ENGINES}
            # steps per second of CPU time: less sensitive to other jobs on a shared machine
            per_cpu = {
                e: statistics.median(r.steps_per_s / r.cpu_use for r in runs[e]) for e in ENGINES
            }
            peak = {e: max(r.peak_mb for r in runs[e]) for e in ENGINES}
            each = {e: ", ".join(f"{r.steps_per_s:.3f}" for r in runs[e]) for e in ENGINES}
            gap = abs(runs["sezm"][0].energy0 - runs["deepmd"][0].energy0)
            print(
                f"{case} natoms {runs['sezm'][0].natoms} ({n_steps} steps, {args.threads} "
                f"thread(s), load {load:.2f}, allocator {allocator_settings()}"
                f"{'; sezm preloads ' + args.sezm_allocator if args.sezm_allocator else ''}): "
                f"sezm {speed['sezm']:.3f} steps/s ({each['sezm']}; peak {peak['sezm']:.0f} MB), "
                f"deepmd-kit {speed['deepmd']:.3f} steps/s ({each['deepmd']}; peak "
                f"{peak['deepmd']:.0f} MB), ratio x{speed['sezm'] / speed['deepmd']:.2f}; "
                f"per CPU second sezm {per_cpu['sezm']:.3f}, deepmd-kit {per_cpu['deepmd']:.3f}, "
                f"ratio x{per_cpu['sezm'] / per_cpu['deepmd']:.2f}; "
                f"memory x{peak['sezm'] / peak['deepmd']:.2f}; |PE0 sezm - deepmd-kit| "
                f"{gap:.2e} eV (PE0 {runs['sezm'][0].energy0:.6f})",
                flush=True,
            )
            if not np.isfinite(gap) or gap > 1e-5 * runs["sezm"][0].natoms:
                print("  warning: the two packages disagree on the energy of step 0", flush=True)


if __name__ == "__main__":
    main()
