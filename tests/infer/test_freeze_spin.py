"""``sezm freeze`` of spin models (``native`` and ``deepspin``): the ``.pt2`` follows DeePMD-kit's
graph-spin contract (``spin (N, 3)`` after the graph inputs; ``force_mag`` and ``mask_mag``
among the outputs), reproduces eager evaluation, and DeePMD-kit's own readers run it.

Two packages are frozen once for the module: the float32 native-spin parity checkpoint and a
float64 deepspin model trained 2 steps on NiO (``tests/module_fixtures/make_freeze_spin.py``;
its ``sel`` 16 caps the 32 real neighbours of NiO atoms, so the cap runs inside the package).
``tests/data/freeze_spin/deepmd_pt2.npz`` holds what DeePMD-kit 3.2's Python ``DeepPot`` returned
for such packages (``tests/module_fixtures/deepmd_eval_spin_pt2.py``); with the oracle installed
(``/tmp/oracle`` or ``SEZM_ORACLE_PYTHON``) the packages of this run are evaluated again. With
``lmp`` (``SEZM_LMP``) LAMMPS ``pair_style deepspin`` runs the deepspin package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import sezm
from sezm.cli import main
from sezm.data.neighbors import build_edges
from sezm.infer.pt2 import SPIN_OUTPUT_KEYS, read_metadata

TESTS = Path(__file__).parents[1]
CHECKPOINTS = {
    "native": TESTS / "data" / "parity" / "spin_native" / "model.pt",  # float32
    "deepspin": TESTS / "data" / "freeze_spin" / "nio_deepspin.pt",  # float64, sel 16
}
REFERENCE = TESTS / "data" / "freeze_spin" / "deepmd_pt2.npz"
EVAL_SCRIPT = TESTS / "module_fixtures" / "deepmd_eval_spin_pt2.py"
KEYS = ("energy", "force", "virial", "atom_energy", "atom_virial", "force_mag", "mask_mag")

sys.path.insert(0, str(EVAL_SCRIPT.parent))
from deepmd_eval_spin_pt2 import nio_frames  # noqa: E402  (numpy only, no DeePMD-kit)

# Freezing takes minutes on two cores: the float64 deepspin package always, the larger float32
# native-spin parity checkpoint only with SEZM_SLOW_TESTS=1.
FROZEN = list(CHECKPOINTS) if os.environ.get("SEZM_SLOW_TESTS") else ["deepspin"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("freeze_spin")
    for name in FROZEN:
        main(["freeze", "-c", str(CHECKPOINTS[name]), "-o", str(out / name)])
    return {name: out / f"{name}.pt2" for name in FROZEN}


def eager(name: str) -> dict[str, dict[str, np.ndarray]]:
    """sezm's eager outputs of checkpoint ``name`` on the NiO frames, as ``KEYS``."""
    dp = sezm.DeepPot(CHECKPOINTS[name])
    return {
        frame: dict(zip(KEYS, dp.eval(coord, cell, atype, atomic=True, spin=spin)))
        for frame, coord, cell, atype, spin in nio_frames()
    }


def assert_close(got: dict, ref: dict, name: str, nat: int) -> None:
    """float64 models as the freeze check (``1e-9 + 1e-9 max|ref|``), float32 ones as
    ``test_freeze.py`` (``1e-5 + 1e-4 max|ref|``, energies ``1e-5`` per atom)."""
    float64 = name == "deepspin"
    for key in KEYS:
        a, b = np.asarray(got[key]), np.asarray(ref[key])
        assert a.shape == b.shape, (key, a.shape, b.shape)
        if key == "mask_mag":
            assert (a.astype(bool) == b.astype(bool)).all()
            continue
        if float64:
            bound = 1e-9 + 1e-9 * np.abs(b).max()
        else:
            bound = 1e-4 * np.abs(b).max() + (1e-5 * nat if key == "energy" else 1e-5)
        assert np.abs(a - b).max() <= bound, (name, key, np.abs(a - b).max(), bound)


def test_nio_frames_exceed_the_deepspin_cap():
    _, coord, cell, _, _ = next(nio_frames())
    edges = build_edges(coord.reshape(1, -1, 3), cell.reshape(1, 3, 3), 4.5)
    assert np.bincount(edges.dst).max() > 16  # more real neighbours than sel


def test_metadata(packages):
    for name, path in packages.items():
        meta = read_metadata(path)
        assert meta["is_spin"] and meta["lower_input_kind"] == "graph"
        assert meta["output_keys"] == list(SPIN_OUTPUT_KEYS)
        assert meta["use_spin"] == [True, False] and meta["ntypes_spin"] == 1
        assert meta["type_map"] == ["Ni", "O"] and meta["ntypes"] == 2
        assert meta["fitting_output_defs"][0]["magnetic"]
        assert meta["do_atomic_virial"] and not meta["has_comm_artifact"]
        assert meta["sezm"]["spin"]["scheme"] == name
        with zipfile.ZipFile(path) as zf:  # single rank: no multi-rank package inside
            assert not [n for n in zf.namelist() if n.endswith("forward_lower_with_comm.pt2")]
    assert read_metadata(packages["deepspin"])["sel"] == [16]  # real neighbours, not doubled


@pytest.mark.parametrize("name", FROZEN)
def test_deep_pot_pt2_matches_eager(packages, name):
    dp = sezm.DeepPot(packages[name])
    assert dp.has_spin() and dp.get_type_map() == ["Ni", "O"]
    ref = eager(name)
    for frame, coord, cell, atype, spin in nio_frames():
        got = dict(zip(KEYS, dp.eval(coord, cell, atype, atomic=True, spin=spin)))
        assert_close(got, ref[frame], name, len(atype))
        assert np.abs(got["force_mag"][~got["mask_mag"][..., 0]]).max() == 0  # O: none
    with pytest.raises(ValueError, match="spin"):
        dp.eval(coord, cell, atype)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_deepmd_kit_reference(name):
    """DeePMD-kit's ``DeepPot`` on sezm's packages of these checkpoints (committed numbers)
    equals sezm's eager evaluation."""
    data = np.load(REFERENCE)
    ref = eager(name)
    for frame, *_, atype, _ in nio_frames():
        got = {k: data[f"{name}/{frame}/{k}"] for k in KEYS}
        assert_close(got, ref[frame], name, len(atype))


def oracle_python() -> str | None:
    path = os.environ.get("SEZM_ORACLE_PYTHON", "/tmp/oracle/bin/python")
    return path if Path(path).exists() else None


def test_deepmd_kit_evaluates_packages(packages, tmp_path):
    """DeePMD-kit 3.2's Python ``DeepPot`` loads this run's packages (metadata only, graph-spin
    route) and returns sezm's eager numbers."""
    python = oracle_python()
    if python is None:
        pytest.skip("no DeePMD-kit oracle (set SEZM_ORACLE_PYTHON)")
    out = tmp_path / "deepmd.npz"
    args = [f"{name}={path}" for name, path in packages.items()]
    run = subprocess.run(
        [python, str(EVAL_SCRIPT), str(out), *args], capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    data = np.load(out)
    for name in packages:
        ref = eager(name)
        for frame, *_, atype, _ in nio_frames():
            got = {k: data[f"{name}/{frame}/{k}"] for k in KEYS}
            assert_close(got, ref[frame], name, len(atype))


# --- LAMMPS ------------------------------------------------------------------------------------
LAMMPS_INPUT = """units metal
atom_style spin
boundary p p p
atom_modify map yes
read_data nio.data
mass 1 58.69
mass 2 16.00
pair_style deepspin {model}
pair_coeff * * Ni O
compute fmag all property/atom fmx fmy fmz
thermo_style custom step pe
thermo_modify format float %.15g
dump 1 all custom 1 spin.dump id fx fy fz c_fmag[1] c_fmag[2] c_fmag[3]
dump_modify 1 format float %.15g sort id
run 0
"""


HBAR = 4.135667403e-3 / (2 * np.pi)  # eV ps: LAMMPS's metal-units Planck constant / 2 pi


def nio_cell(seed: int = 0):
    """Rock-salt NiO, 2x2x2 conventional cells (64 atoms, 8.34 Å), jittered; spins of 1-2 on Ni
    and random directions on O (which the model must ignore)."""
    rng = np.random.default_rng(seed)
    a = 4.17
    base = [(0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)]
    coord, atype = [], []
    for shift in np.ndindex(2, 2, 2):
        for b in base:
            for t, off in ((0, (0, 0, 0)), (1, (0.5, 0, 0))):
                coord.append((np.add(shift, b) + off) * a)
                atype.append(t)
    coord = np.mod(np.array(coord) + rng.normal(0, 0.05, (64, 3)), 2 * a)
    direction = rng.normal(size=(64, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    size = np.where(np.array(atype) == 0, rng.uniform(1.0, 2.0, 64), 0.0)
    return coord, np.eye(3) * 2 * a, np.array(atype), direction, size


def test_lammps_deepspin(packages, tmp_path):
    lmp = os.environ.get("SEZM_LMP") or shutil.which("lmp")
    if lmp is None:
        pytest.skip("no LAMMPS (set SEZM_LMP or put lmp on PATH)")
    coord, box, atype, direction, size = nio_cell()
    lines = ["sezm NiO", "", "64 atoms", "2 atom types", ""]
    lines += [f"0.0 {box[i, i]:.12f} {x}lo {x}hi" for i, x in enumerate("xyz")]
    lines += ["", "Atoms # spin", ""]
    for i in range(64):
        values = [*coord[i], *direction[i], size[i]]
        lines.append(f"{i + 1} {atype[i] + 1} " + " ".join(f"{v:.12f}" for v in values))
    (tmp_path / "nio.data").write_text("\n".join(lines) + "\n")
    (tmp_path / "in.lammps").write_text(LAMMPS_INPUT.format(model=packages["deepspin"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [lmp, "-in", "in.lammps"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    thermo = run.stdout.split("Step")[1].splitlines()[1].split()
    energy = float(thermo[1])
    dump = np.loadtxt(tmp_path / "spin.dump", skiprows=9)
    spin = direction * size[:, None]
    e, f, _, fm, _ = sezm.DeepPot(CHECKPOINTS["deepspin"]).eval(
        coord[None], box.reshape(1, 9), atype, spin=spin[None]
    )
    assert abs(energy - e.item()) <= 1e-8 * 64
    assert np.abs(dump[:, 1:4] - f[0]).max() <= 1e-8
    # LAMMPS's fm is the torque-like ``sp * force_mag / hbar`` (rad/ps, metal units)
    magnetic = size > 0
    fm_lammps = dump[magnetic, 4:7] * HBAR / size[magnetic, None]
    assert np.abs(fm_lammps - fm[0][magnetic]).max() <= 1e-9
    assert np.abs(dump[~magnetic, 4:7]).max() == 0
