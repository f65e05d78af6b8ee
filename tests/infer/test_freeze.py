"""``sezm freeze``: the .pt2 package reproduces eager evaluation, carries the metadata DeePMD-kit's
C++ reader needs, and (when LAMMPS with the DeePMD-kit plugin is available) runs in LAMMPS.

One freeze of the tiny parity checkpoint (through the CLI) serves every test of this module;
it holds the multi-rank (with-comm) package too. Set ``SEZM_LMP`` to a LAMMPS executable with
the ``deepmd`` pair style (or put ``lmp`` on ``PATH``) to run the LAMMPS comparisons, and
``SEZM_MPIRUN`` (or ``mpirun`` on ``PATH``) for the two-rank one; they are skipped otherwise.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from parity_cases import PARITY, frames

import sezm
from sezm.cli import main
from sezm.infer import comm
from sezm.infer import freeze as fz
from sezm.infer.pt2 import OUTPUT_KEYS, outputs, read_metadata

TINY = PARITY / "tiny" / "model.pt"


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """The tiny checkpoint frozen on one thread (as under ``OMP_NUM_THREADS=1``)."""
    out = tmp_path_factory.mktemp("freeze") / "frozen_model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["freeze", "-c", str(TINY), "-o", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out.with_name("frozen_model.pt2")


def water(name: str = "water_pbc_0"):
    for frame in frames("tiny"):
        if frame[0] == name:
            return frame[1:4]
    raise KeyError(name)


def test_kernels_take_their_threads_from_the_running_process(frozen):
    """Frozen on one thread, the package's C++ kernels are still OpenMP-parallel: LAMMPS on
    several threads runs them on all of them (Inductor would otherwise build serial loops for
    the freezing process's single thread)."""
    with zipfile.ZipFile(frozen) as outer:
        comm_entry = next(n for n in outer.namelist() if n.endswith(fz.COMM_ENTRY))
        nested = io.BytesIO(outer.read(comm_entry))  # the multi-rank package
        for archive in (outer, zipfile.ZipFile(nested)):
            kernels = [n for n in archive.namelist() if n.endswith(".kernel.cpp")]
            assert len(kernels) == 1
            assert "#pragma omp parallel" in archive.read(kernels[0]).decode()


def test_metadata(frozen):
    meta = read_metadata(frozen)
    assert meta["lower_input_kind"] == "graph"
    assert meta["graph_edge_dtype"] == "float64"
    assert meta["type_map"] == ["O", "H"] and meta["ntypes"] == 2
    assert meta["rcut"] == pytest.approx(6.0)
    assert meta["output_keys"] == list(OUTPUT_KEYS)
    assert meta["dim_fparam"] == meta["dim_aparam"] == meta["dim_chg_spin"] == 0
    assert meta["has_message_passing"] and meta["has_comm_artifact"]
    assert meta["do_atomic_virial"] and meta["mixed_types"]
    own = meta["sezm"]
    assert own["torch_version"] == torch.__version__ and own["version"] == sezm.__version__
    assert own["dtype"] == "float32" and own["deterministic_scatter"]
    assert own["inference_settings"]["fused_kernels"] == "none"
    with zipfile.ZipFile(frozen) as zf:
        names = zf.namelist()
        script = [n for n in names if n.endswith("/extra/model_def_script.json")]
        assert json.loads(zf.read(script[0]))["type"] == "dpa4"
    assert any("/data/aotinductor/model/" in n and n.endswith(".so") for n in names)
    # DeePMD-kit's C++ reader finds the with-comm package by this suffix
    assert [n for n in names if n.endswith("/extra/forward_lower_with_comm.pt2")] == [
        "model/" + fz.COMM_ENTRY
    ]


def test_with_comm_package_matches_eager(frozen, tmp_path):
    """The multi-rank package on one rank's view of a water frame (owned atoms + ghost images,
    exchanged within this process) reproduces eager evaluation of the frame."""
    comm.register_border_ops()
    nested = tmp_path / "with_comm.pt2"
    with zipfile.ZipFile(frozen) as zf:
        nested.write_bytes(zf.read("model/" + fz.COMM_ENTRY))
    package = torch._inductor.aoti_load_package(str(nested))
    model, _ = fz.load_energy_model(TINY)
    model.requires_grad_(False)
    coord, box, atype = water("water_triclinic")
    frame = (coord.reshape(-1, 3), box.reshape(3, 3), atype)
    inputs, halo = fz.halo_inputs(model, frame)
    assert len(halo.owner) > len(atype)  # more ghosts than owned atoms
    got = fz.owned_outputs(outputs(package(*inputs)), halo)
    ref = fz.eager_reference(model, [frame], fz.lower_inputs(model, [frame]))
    fz.compare(nested, model, got, ref)


@pytest.mark.parametrize("name", ["water_triclinic", "small_cell"])
def test_deep_pot_pt2_matches_eager(frozen, name):
    coord, box, atype = water(name)
    coord = np.concatenate([coord, coord + 0.01])  # two frames, one cell
    box = box.reshape(9)
    eager = sezm.DeepPot(TINY).eval(coord, box, atype, atomic=True)
    frozen_pot = sezm.DeepPot(frozen)
    assert frozen_pot.get_type_map() == ["O", "H"] and frozen_pot.get_rcut() == pytest.approx(6.0)
    got = frozen_pot.eval(coord, box, atype, atomic=True)
    nat = len(atype)
    for key, a, b in zip(("energy", "force", "virial", "atom_energy", "atom_virial"), got, eager):
        assert a.shape == b.shape, key
        scale = 1e-4 * np.abs(b).max() + (1e-5 * nat if key == "energy" else 1e-5)
        assert np.abs(a - b).max() <= scale, (key, np.abs(a - b).max())


def test_owned_nodes_only_enter_energy(frozen):
    """Ghost nodes (beyond ``n_local``) add nothing to the energy, forces act on them too."""
    model, _ = fz.load_energy_model(TINY)
    model.requires_grad_(False)
    inputs = list(fz.lower_inputs(model, fz.sample_frames(2, (11, 13), seed=3)))
    inputs[2] = inputs[1] - torch.tensor([3, 4])  # n_local
    got = outputs(torch._inductor.aoti_load_package(str(frozen))(*inputs))
    ref = fz.GraphLower(model, ()).eval()(*inputs)
    for key in OUTPUT_KEYS:
        assert torch.allclose(got[key], ref[key], atol=1e-5, rtol=1e-4), key
    atom_energy, energy = got["atom_energy"].view(-1), got["energy"].view(-1)
    owned = [atom_energy[:8].sum(), atom_energy[11:20].sum()]
    assert torch.allclose(energy, torch.stack(owned).to(energy.dtype), atol=1e-4)


def test_rejects_property_model(tmp_path):
    with pytest.raises(fz.FreezeError, match="energy models"):
        fz.freeze(PARITY / "property" / "model.pt", tmp_path / "p")


def test_rejects_non_dpa4(tmp_path):
    params = {"type": "standard", "type_map": ["O"], "descriptor": {"type": "se_e2_a"}}
    state = {
        "_extra_state": {"model_params": params},
        "model.Default.atomic_model.descriptor.x": torch.zeros(1),
    }
    path = tmp_path / "se_e2_a.pt"
    torch.save({"model": state}, path)
    with pytest.raises(fz.FreezeError, match="not DPA4"):
        fz.freeze(path, tmp_path / "x")


def test_verify_catches_a_wrong_package(frozen):
    """The post-freeze check compares against eager: a different model must fail it."""
    model, _ = fz.load_energy_model(PARITY / "pretrained" / "model.pt")
    with pytest.raises(fz.FreezeError, match="does not reproduce"):
        fz.verify(frozen, model.requires_grad_(False))


# --- LAMMPS ------------------------------------------------------------------------------------
LAMMPS_INPUT = """units metal
boundary p p p
atom_style atomic
atom_modify map yes
{processors}
read_data water.data
mass 1 16
mass 2 2
pair_style deepmd {model}
pair_coeff * * O H
thermo_style custom step pe
thermo_modify format float %.15g
dump 1 all custom 1 forces.dump id fx fy fz
dump_modify 1 format float %.15g sort id
run 0
"""


def lammps_executable() -> str | None:
    return os.environ.get("SEZM_LMP") or shutil.which("lmp")


def mpirun_executable() -> str | None:
    return os.environ.get("SEZM_MPIRUN") or shutil.which("mpirun")


def write_data(path, coord, box, atype) -> None:
    """LAMMPS data file (atomic style) of one frame; ``box`` rows must be lower triangular."""
    a, b, c = box
    lines = ["sezm water", "", f"{len(atype)} atoms", "2 atom types", ""]
    lines += [f"0.0 {a[0]:.12f} xlo xhi", f"0.0 {b[1]:.12f} ylo yhi", f"0.0 {c[2]:.12f} zlo zhi"]
    lines += [f"{b[0]:.12f} {c[0]:.12f} {c[1]:.12f} xy xz yz", "", "Atoms # atomic", ""]
    for i, (t, (x, y, z)) in enumerate(zip(atype, coord)):
        lines.append(f"{i + 1} {t + 1} {x:.12f} {y:.12f} {z:.12f}")
    path.write_text("\n".join(lines) + "\n")


def run_lammps(frozen, tmp_path, name: str, ranks: int = 1, processors: str = ""):
    """Energy and forces of LAMMPS (``run 0``) on a tiny-model frame, and DeepPot's."""
    lmp = lammps_executable()
    if lmp is None:
        pytest.skip("no LAMMPS (set SEZM_LMP or put lmp on PATH)")
    command = [lmp, "-in", "in.lammps"]
    if ranks > 1:
        mpirun = mpirun_executable()
        if mpirun is None:
            pytest.skip("no mpirun (set SEZM_MPIRUN or put mpirun on PATH)")
        command = [mpirun, "-np", str(ranks), *command]
    coord, box, atype = water(name)
    coord, box = coord.reshape(-1, 3), box.reshape(3, 3)
    write_data(tmp_path / "water.data", coord, box, atype)
    (tmp_path / "in.lammps").write_text(LAMMPS_INPUT.format(model=frozen, processors=processors))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    if "Unrecognized pair style 'deepmd'" in run.stdout + run.stderr:
        pytest.skip(f"{lmp} has no deepmd pair style")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["Step", "PotEng"])
    energy = float(lines[header + 1].split()[1])
    dump = (tmp_path / "forces.dump").read_text().splitlines()
    start = next(i for i, ln in enumerate(dump) if ln.startswith("ITEM: ATOMS")) + 1
    force = np.array([[float(x) for x in ln.split()[1:]] for ln in dump[start:]])
    e, f, _ = sezm.DeepPot(TINY).eval(coord[None], box.reshape(1, 9), atype)
    return energy, force, e[0, 0], f[0]


def test_lammps_matches_deep_pot(frozen, tmp_path):
    energy, force, e, f = run_lammps(frozen, tmp_path, "water_triclinic")
    assert abs(energy - e) <= 1e-5 * len(f)
    assert np.abs(force - f).max() <= 1e-5 + 1e-4 * np.abs(f).max()


@pytest.mark.parametrize(
    ("name", "processors"),
    [("water_triclinic", "processors 2 1 1"), ("small_cell", "processors 1 2 1")],
)
def test_lammps_two_ranks_match_deep_pot(frozen, tmp_path, name, processors):
    """``mpirun -np 2``: the C++ reader runs the with-comm package on each rank; ghost
    features cross ranks through DeePMD-kit's border_op (small_cell: a cell narrower than
    the cutoff, so ghosts are forwarded through several swaps)."""
    energy, force, e, f = run_lammps(frozen, tmp_path, name, ranks=2, processors=processors)
    assert abs(energy - e) <= 1e-5 * len(f)
    assert np.abs(force - f).max() <= 1e-5 + 1e-4 * np.abs(f).max()


@pytest.mark.parametrize(("flag", "with_comm"), [([], True), (["--no-with-comm"], False)])
def test_cli_with_comm_switch(monkeypatch, tmp_path, flag, with_comm):
    """The multi-rank package is built by default; ``--no-with-comm`` skips it."""
    seen = {}

    def fake_freeze(checkpoint, output, head=None, with_comm=True, device=None):
        seen.update(checkpoint=checkpoint, with_comm=with_comm, device=device)
        return fz.FreezeReport(path=tmp_path / "x.pt2", seconds={"total": 0.0})

    monkeypatch.setattr(fz, "freeze", fake_freeze)
    main(["freeze", "-c", str(TINY), "-o", str(tmp_path / "x"), *flag])
    assert seen == {"checkpoint": str(TINY), "with_comm": with_comm, "device": "cpu"}


def test_inference_switches_are_recorded_at_freeze(monkeypatch):
    """DP_TF32_INFER / DP_TRITON_INFER set before freezing are read and recorded with what the
    CPU-exported package runs (full float32, no fused kernels)."""
    from sezm.infer.settings import InferenceSettings

    monkeypatch.setenv("DP_TF32_INFER", "2")
    monkeypatch.setenv("DP_TRITON_INFER", "1")
    model, _ = fz.load_energy_model(TINY)
    meta = fz.metadata(model, str(TINY), None, InferenceSettings.from_env())
    recorded = meta["sezm"]["inference_settings"]
    assert recorded["DP_TF32_INFER"] == 2 and recorded["DP_TRITON_INFER"] == 1
    assert recorded["float32_matmul_precision"] == "highest"
    assert recorded["fused_kernels"] == "none"
    monkeypatch.setenv("DP_TF32_INFER", "7")
    with pytest.raises(ValueError, match="DP_TF32_INFER"):
        InferenceSettings.from_env()


@pytest.mark.skipif(not os.environ.get("SEZM_SLOW_TESTS"), reason="set SEZM_SLOW_TESTS=1")
@pytest.mark.parametrize("case", ["mini", "so3_grids", "focus_heads"])
def test_larger_and_option_rich_models_freeze(case, tmp_path):
    """Mini-sized and option-rich models freeze (a few minutes each on one core): the package
    is checked against eager evaluation inside ``freeze``. Run under torch 2.11 as well
    (``PYTHONPATH=. /tmp/oracle/bin/python -m pytest ...``), the version DeePMD-kit's LAMMPS
    plugin links against."""
    report = fz.freeze(PARITY / case / "model.pt", tmp_path / "frozen", with_comm=False)
    assert report.path.is_file() and report.errors  # freeze raises when the check fails
