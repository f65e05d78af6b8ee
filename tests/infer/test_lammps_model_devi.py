"""Committee deviation in LAMMPS: ``pair_style deepmd a.pt2 b.pt2 out_freq 1 out_file md.out``
(DeePMD-kit's plugin) with two sezm-frozen models writes, step by step, the deviations that
``sezm model-devi`` computes on the frames LAMMPS dumped.

The committee is the ``tiny`` parity checkpoint and its perturbed copy
``tests/data/model_devi/model_1.pt`` (``tests/module_fixtures/make_model_devi.py``), each frozen
for one rank (``--no-with-comm``). LAMMPS runs a few NVE steps of the bundled water box
(``examples/water/lammps/water.lmp``, 192 atoms) and dumps the positions at every step;
``sezm model-devi`` reads that dump (ASE's ``lammps-dump-text`` format) and evaluates the two
checkpoints eagerly, so the comparison covers freezing, the C++ reader and the deviation
formulas at once.

Needs LAMMPS with the ``deepmd`` pair style (``SEZM_LMP``, or ``lmp`` on ``PATH``, e.g. from
``pip install "deepmd-kit[lmp]"``) and, because the two freezes take minutes (4 on a shared
2-core CPU), ``SEZM_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_freeze import lammps_executable

from sezm.cli import main

DATA = Path(__file__).parents[1] / "data"
COMMITTEE = [DATA / "parity" / "tiny" / "model.pt", DATA / "model_devi" / "model_1.pt"]
WATER = Path(__file__).parents[2] / "examples" / "water" / "lammps" / "water.lmp"
STEPS = 4
# float32 models: each value within this fraction of the largest value of its kind in its row
RTOL = 2e-5
LAMMPS_COLUMNS = ["step"] + [f"{k}_devi_{q}" for q in "vf" for k in ("max", "min", "avg")]

LAMMPS_INPUT = """\
units           metal
boundary        p p p
atom_style      atomic
atom_modify     map yes
neighbor        2.0 bin
neigh_modify    every 1 delay 0 check no
read_data       {data}
pair_style      deepmd a.pt2 b.pt2 out_freq 1 out_file md.out
pair_coeff      * * O H
velocity        all create 600.0 4928459
fix             1 all nve
timestep        0.001
dump            1 all custom 1 traj.dump id element x y z
dump_modify     1 element O H sort id format float %.15g
run             {steps}
"""

pytestmark = pytest.mark.skipif(
    not os.environ.get("SEZM_SLOW_TESTS"), reason="freezes two .pt2 (~4 min): SEZM_SLOW_TESTS=1"
)


def read_devi(path: Path) -> tuple[list[str], np.ndarray]:
    """Column names and rows of a one-block model deviation file (system lines skipped)."""
    lines = path.read_text().splitlines()
    (header,) = [ln for ln in lines if ln.startswith("#") and "step" in ln]
    rows = [ln.split() for ln in lines if ln.strip() and not ln.startswith("#")]
    return header[1:].split(), np.array(rows, dtype=float)


@pytest.fixture(scope="module")
def lammps_run(tmp_path_factory) -> Path:
    """Folder of a LAMMPS run with the frozen committee: ``md.out`` and ``traj.dump``."""
    lmp = lammps_executable()
    if lmp is None:
        pytest.skip("no LAMMPS (set SEZM_LMP or put lmp on PATH)")
    folder = tmp_path_factory.mktemp("lammps_devi")
    for name, checkpoint in zip("ab", COMMITTEE):
        main(["freeze", "-c", str(checkpoint), "-o", str(folder / name), "--no-with-comm"])
    (folder / "in.lammps").write_text(LAMMPS_INPUT.format(data=WATER, steps=STEPS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [lmp, "-in", "in.lammps"], cwd=folder, capture_output=True, text=True, timeout=600, env=env
    )
    if "Unrecognized pair style 'deepmd'" in run.stdout + run.stderr:
        pytest.skip(f"{lmp} has no deepmd pair style")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return folder


def test_lammps_deviation_matches_model_devi(lammps_run):
    columns, lammps = read_devi(lammps_run / "md.out")
    out = lammps_run / "sezm.out"
    models = [str(m) for m in COMMITTEE]
    main(["model-devi", "-m", *models, "-s", str(lammps_run / "traj.dump"), "-o", str(out)])
    sezm_columns, sezm = read_devi(out)
    assert columns == LAMMPS_COLUMNS and sezm_columns[:7] == LAMMPS_COLUMNS  # sezm adds devi_e
    np.testing.assert_array_equal(lammps[:, 0], np.arange(STEPS + 1))
    np.testing.assert_array_equal(sezm[:, 0], lammps[:, 0])
    assert np.all(lammps[:, 1:7] > 0)  # the two models disagree: nothing compared is zero
    assert len(np.unique(lammps[:, 4])) == STEPS + 1  # the atoms moved: a new frame each step
    for kind in (slice(1, 4), slice(4, 7)):  # virial, force deviations
        scale = np.abs(lammps[:, kind]).max(axis=1, keepdims=True)
        np.testing.assert_array_less(np.abs(sezm[:, kind] - lammps[:, kind]) / scale, RTOL)
