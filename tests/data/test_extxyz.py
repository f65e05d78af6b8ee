"""Files read with ASE (extxyz, ...) as training and test data, against the same frames in npy.

The water frames of ``tests/data/systems/water/data_0`` are written to extxyz with ASE, read
back with ASE, and those values written again as an npy system, so both forms hold the same
float64 numbers: reading, ``sezm test`` and a short training run must then agree exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from sezm.calculator import SeZMCalculator
from sezm.cli import main, run
from sezm.config import normalize_section
from sezm.data import LABEL_FIELDS, DataError, DataSystem, FileOptions, FrameFile, System
from sezm.data.ase_frames import xyz_frame_texts
from sezm.infer.change_bias import change_bias
from sezm.infer.deep_pot import DeepPot
from sezm.infer.embed import embed
from sezm.infer.model_devi import model_devi
from sezm.infer.test import run_test

DATA = Path(__file__).parents[1] / "data"
WATER = DATA / "systems" / "water" / "data_0"
TINY = DATA / "parity" / "tiny" / "model.pt"  # type_map [O, H]
TYPE_MAP = ["O", "H"]


def water_atoms(nframes: int = 4) -> list[Atoms]:
    """The water frames with energy, forces and a made-up symmetric virial (eV)."""
    data = System(WATER, TYPE_MAP).frames(np.arange(nframes))
    rng = np.random.default_rng(0)
    frames = []
    for k in range(nframes):
        atoms = Atoms(
            symbols=[TYPE_MAP[t] for t in data["atype"][k]],
            positions=data["coord"][k],
            cell=data["box"][k],
            pbc=True,
        )
        atoms.calc = SinglePointCalculator(atoms, energy=data["energy"][k], forces=data["force"][k])
        virial = rng.normal(size=(3, 3))
        atoms.info["virial"] = virial + virial.T
        frames.append(atoms)
    return frames


def write_npy(folder: Path, frames: list[Atoms], type_map: list[str]) -> Path:
    """``frames`` (one formula, read back by ASE) as an npy system."""
    folder.mkdir(parents=True)
    (folder / "type_map.raw").write_text("\n".join(type_map) + "\n")
    types = [type_map.index(s) for s in frames[0].get_chemical_symbols()]
    (folder / "type.raw").write_text("\n".join(map(str, types)) + "\n")
    sets = folder / "set.000"
    sets.mkdir()
    np.save(sets / "coord.npy", np.stack([a.positions.reshape(-1) for a in frames]))
    if frames[0].pbc.all():
        np.save(sets / "box.npy", np.stack([a.cell.array.reshape(-1) for a in frames]))
    else:
        (folder / "nopbc").touch()
    np.save(sets / "energy.npy", np.array([a.get_potential_energy() for a in frames]))
    np.save(sets / "force.npy", np.stack([a.get_forces().reshape(-1) for a in frames]))
    if "virial" in frames[0].info:
        np.save(sets / "virial.npy", np.stack([a.info["virial"].reshape(-1) for a in frames]))
    return folder


@pytest.fixture(scope="module")
def water(tmp_path_factory) -> tuple[Path, Path]:
    """``(extxyz file, npy system)`` of the same four water frames."""
    root = tmp_path_factory.mktemp("water")
    xyz = root / "water.extxyz"
    write(xyz, water_atoms(), format="extxyz")
    return xyz, write_npy(root / "npy", read(xyz, index=":"), TYPE_MAP)


def one_system(path: Path, **options) -> object:
    (system,) = FrameFile(path, TYPE_MAP, LABEL_FIELDS, FileOptions(**options)).systems
    return system


# ---------------------------------------------------------------------------------------------
# (1) frames read back equal the npy arrays


def test_frames_equal_the_npy_arrays(water):
    xyz, npy = water
    got = one_system(xyz)
    want = System(npy, TYPE_MAP)
    assert (got.nat, got.nframes, got.pbc, got.mixed_type) == (192, 4, True, False)
    assert got.present == want.present
    assert got.present["energy"] and got.present["force"] and got.present["virial"]
    index = [3, 0, 2]
    a, b = got.frames(index), want.frames(index)
    assert sorted(a) == sorted(b) == ["atype", "box", "coord", "energy", "force", "virial"]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # and the original float32 data, to the 8 decimals extxyz writes
    original = System(WATER, TYPE_MAP).frames(index)
    for key in ("coord", "box", "atype", "energy", "force"):
        np.testing.assert_allclose(a[key], original[key], rtol=0, atol=1e-8, err_msg=key)


def test_frames_are_read_by_byte_offset(water, tmp_path):
    """Each frame is read on its own: a frame stays readable when another one is corrupted
    after the file was opened (same length, so the offsets hold)."""
    xyz = tmp_path / "w.xyz"
    xyz.write_bytes(water[0].read_bytes())
    system = one_system(xyz)
    starts = [start for start, _ in xyz_frame_texts(xyz)]
    text = xyz.read_bytes()
    assert starts[0] == 0 and all(text[s : s + 4] == b"192\n" for s in starts)
    corrupt = bytearray(text)
    corrupt[starts[0] + 4 : starts[0] + 12] = b"garbage!"  # in frame 0's comment line
    xyz.write_bytes(bytes(corrupt))
    frame = system.frames([3])
    np.testing.assert_array_equal(frame["coord"], one_system(water[0]).frames([3])["coord"])
    with pytest.raises(DataError, match=r"w\.xyz: frame 0"):
        system.frames([0])


# ---------------------------------------------------------------------------------------------
# (2) sezm test, (3) training: the same numbers as npy


def test_sezm_test_equals_npy(water, tmp_path):
    xyz, npy = water
    got = run_test(str(TINY), str(xyz), detail_file=str(tmp_path / "xyz"))
    want = run_test(str(TINY), str(npy), detail_file=str(tmp_path / "npy"))
    assert set(got) == set(want) and {"rmse_f", "rmse_v", "mae_e"} <= set(got)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    for kind in ("e", "f", "v"):
        a, b = np.loadtxt(tmp_path / f"xyz.{kind}.out"), np.loadtxt(tmp_path / f"npy.{kind}.out")
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def train_curve(tmp_path: Path, name: str, system: Path, monkeypatch) -> list[str]:
    config = json.loads((DATA / "parity" / "tiny" / "input.json").read_text())
    config["model"]["descriptor"].update(channels=8, n_radial=4, sel="auto")
    tr = config["training"]
    tr["training_data"] = {"systems": [str(system)], "batch_size": 1}
    tr["validation_data"] = {"systems": [str(system)], "batch_size": 2}
    tr.update(numb_steps=3, disp_freq=1, save_freq=3, seed=1)
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "input.json").write_text(json.dumps(config))
    monkeypatch.chdir(run_dir)
    main(["train", "input.json"])
    rows = (run_dir / "lcurve.out").read_text().splitlines()
    return [r for r in rows if not r.startswith("#")]


def test_training_curve_equals_npy(water, tmp_path, monkeypatch):
    xyz, npy = water
    from_xyz = train_curve(tmp_path, "xyz", xyz, monkeypatch)
    assert len(from_xyz) == 3
    assert from_xyz == train_curve(tmp_path, "npy", npy, monkeypatch)


# ---------------------------------------------------------------------------------------------
# (4) open boundaries, several element sets, stress, label names


def molecule(symbols: str, seed: int, **labels) -> Atoms:
    rng = np.random.default_rng(seed)
    atoms = Atoms(symbols, positions=rng.uniform(0.0, 4.0, size=(len(Atoms(symbols)), 3)))
    atoms.calc = SinglePointCalculator(
        atoms, energy=float(rng.normal()), forces=rng.normal(size=(len(atoms), 3)), **labels
    )
    return atoms


def test_open_boundaries_and_mixed_elements(water, tmp_path):
    frames = [
        molecule("H2O", 0),
        molecule("CH4", 1),
        molecule("OH2", 2),
        read(water[0], index=0),
        molecule("HOH", 3),
    ]
    path = tmp_path / "mixed.xyz"
    write(path, frames, format="extxyz")
    file = FrameFile(path, ["O", "H", "C"], LABEL_FIELDS)
    small, methane, bulk = file.systems
    assert [str(s.path) for s in file.systems] == [
        f"{path}[3 atoms, open]",
        f"{path}[5 atoms, open]",
        f"{path}[192 atoms]",
    ]
    assert small.file_frames.tolist() == [0, 2, 4] and small.mixed_type and not small.pbc
    assert not methane.mixed_type and methane.atom_type.tolist() == [2, 1, 1, 1, 1]
    assert bulk.pbc and bulk.present["virial"] and not small.present["virial"]
    got = small.frames([0, 1, 2])
    assert "box" not in got
    assert got["atype"].tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    for j, k in enumerate([0, 2, 4]):
        np.testing.assert_allclose(got["coord"][j], frames[k].positions, atol=1e-8)
        np.testing.assert_allclose(got["force"][j], frames[k].get_forces(), atol=1e-8)
        assert got["energy"][j] == pytest.approx(frames[k].get_potential_energy(), abs=1e-12)
    # training batches and sezm test run on every group (the tiny model knows O and H only)
    data = DataSystem(str(path), ["O", "H", "C"], batch_size=2, seed=0)
    assert len(data) == 3
    batch = data.batch(0, np.array([0, 2]), rcut=4.0)
    assert batch.box is None and batch.graph.atype.tolist() == [[1, 1, 0], [1, 0, 1]]
    no_carbon = tmp_path / "water_molecules.xyz"
    write(no_carbon, [frames[0], frames[2], frames[4]], format="extxyz")
    errors = run_test(str(TINY), str(no_carbon))
    assert np.isfinite(errors["rmse_f"]) and "rmse_v" not in errors


def test_open_boundaries_equal_npy(tmp_path):
    frames = [molecule("OH2OH2", k) for k in range(3)]
    path = tmp_path / "dimers.xyz"
    write(path, frames, format="extxyz")
    npy = write_npy(tmp_path / "npy", read(path, index=":"), TYPE_MAP)
    a = one_system(path).frames([0, 1, 2])
    b = System(npy, TYPE_MAP).frames([0, 1, 2])
    assert sorted(a) == sorted(b) == ["atype", "coord", "energy", "force"]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    got, want = run_test(str(TINY), str(path)), run_test(str(TINY), str(npy))
    assert got == pytest.approx(want, rel=1e-12)


def test_stress_is_minus_virial_per_volume_like_ase():
    """ASE's stress is (1/V) dE/d(strain); the virial read from it is -dE/d(strain) (EMT,
    finite differences of a strained copper cell)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=1)
    atoms.calc = EMT()
    stress = atoms.get_stress()  # (6,) Voigt, eV/Å^3
    dedstrain = np.zeros((3, 3))
    h = 1e-5
    for i in range(3):
        for j in range(3):
            e = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[i, j] += sign * h / 2
                strain[j, i] += sign * h / 2
                strained = atoms.copy()
                strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
                strained.calc = EMT()
                e.append(strained.get_potential_energy())
            dedstrain[i, j] = (e[0] - e[1]) / (2 * h)
    file = FrameFile.__new__(FrameFile)  # only the label conversion, no file
    file.options, file.path = FileOptions(), Path("mem")
    frame = Atoms(atoms)
    frame.calc = SinglePointCalculator(frame, stress=stress)
    virial = file._virial_from_stress(frame, atoms.cell.array, "mem").reshape(3, 3)
    np.testing.assert_allclose(virial, -dedstrain, atol=2e-5)
    assert np.abs(dedstrain).max() > 0.1  # a real test: the cell is under stress


def test_stress_gives_sezms_own_virial(tmp_path):
    """A stress written by sezm's ASE calculator reads back as the virial DeepPot gives."""
    dp = DeepPot(TINY)
    atoms = water_atoms(1)[0]
    del atoms.info["virial"]  # a virial would be read instead of the stress
    atoms.calc = SeZMCalculator(TINY)
    atoms.get_potential_energy()
    atoms.calc = SinglePointCalculator(atoms, **atoms.calc.results)
    path = tmp_path / "stress.extxyz"
    write(path, atoms, format="extxyz")
    read_back = one_system(path).frames([0])
    order = [TYPE_MAP.index(s) for s in atoms.get_chemical_symbols()]
    _, _, virial = dp.eval(atoms.positions[None], atoms.cell.array.reshape(1, 9), order)
    want = virial.reshape(3, 3)
    np.testing.assert_allclose(
        read_back["virial"][0].reshape(3, 3), 0.5 * (want + want.T), rtol=0, atol=1e-5
    )
    assert np.abs(want).max() > 1e-2


def test_label_keys_rename(tmp_path):
    atoms = molecule("H2O", 5)
    atoms.info["REF_energy"] = 1.5
    atoms.arrays["REF_forces"] = np.full((3, 3), 0.25)
    path = tmp_path / "ref.xyz"
    write(path, atoms, format="extxyz")
    keys = {"energy": "REF_energy", "force": "REF_forces"}
    got = one_system(path, keys=keys).frames([0])
    assert got["energy"].tolist() == [1.5] and np.all(got["force"] == 0.25)
    # through the input schema, in the training data section
    params = {"systems": [str(path)], "label_keys": keys, "file_format": "extxyz"}
    section = normalize_section("training", {"training_data": params})["training_data"]
    data = DataSystem.from_config(section, TYPE_MAP)
    assert data.systems[0].frames([0])["energy"].tolist() == [1.5]


# ---------------------------------------------------------------------------------------------
# (5) bad frames: the message names the file and the frame


def frames_with(k: int, change) -> list[Atoms]:
    frames = [molecule("H2O", seed) for seed in range(3)]
    frames[k] = change(frames[k])
    return frames


def no_energy(atoms: Atoms) -> Atoms:
    bare = Atoms(atoms)
    bare.calc = SinglePointCalculator(bare, forces=atoms.get_forces())
    return bare


def nan_force(atoms: Atoms) -> Atoms:
    forces = atoms.get_forces()
    forces[1, 2] = np.nan
    atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=forces)
    return atoms


def carbon(atoms: Atoms) -> Atoms:
    atoms.symbols[2] = "C"
    return atoms


def short_virial(atoms: Atoms) -> Atoms:
    atoms.info["virial"] = np.arange(4.0)
    return atoms


def wide_atom_energies(atoms: Atoms) -> Atoms:
    atoms.arrays["energies"] = np.zeros((3, 2))
    return atoms


def slab(atoms: Atoms) -> Atoms:
    atoms.cell, atoms.pbc = np.eye(3) * 5.0, [True, True, False]
    return atoms


def flat_cell(atoms: Atoms) -> Atoms:
    atoms.cell, atoms.pbc = [[5, 0, 0], [0, 5, 0], [5, 5, 0]], True
    return atoms


def open_stress(atoms: Atoms) -> Atoms:
    atoms.info["stress"] = np.zeros(6)
    return atoms


BAD = {
    "missing label": (no_energy, r"frame 1 has the labels \['force'\] but frame 0"),
    "NaN": (nan_force, r"frame 1: 'forces' holds NaN or inf \(nan at index \[1, 2\]\)"),
    "unknown element": (carbon, r"frame 1: element 'C' \(atom 2\) is not in the model type_map"),
    "wrong shape": (
        wide_atom_energies,
        r"frame 1: 'energies' \(atom_ener\) has shape \(3, 2\), expected \(3,\) for 3 atoms",
    ),
    "unreadable": (short_virial, r"frame 1: ASE cannot read it \(.*virial"),
    "partly periodic": (slab, r"frame 1: pbc \[True, True, False\] is periodic along some"),
    "flat cell": (flat_cell, r"frame 1: periodic \(pbc True\) but the cell .* is degenerate"),
    "stress without volume": (open_stress, r"frame 1: 'stress' \(stress\) on a frame with open"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_frame_names_file_and_frame(case, tmp_path):
    change, message = BAD[case]
    path = tmp_path / "bad.extxyz"
    write(path, frames_with(1, change), format="extxyz")
    with pytest.raises(DataError, match=rf"bad\.extxyz: {message}"):
        DataSystem(str(path), TYPE_MAP)


def test_bad_files(tmp_path):
    good = tmp_path / "good.xyz"
    write(good, frames_with(0, lambda a: a), format="extxyz")
    lines = good.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.xyz"
    cut.write_text("".join(lines[:-1]))
    with pytest.raises(DataError, match=r"cut\.xyz: frame 2 is cut short: 3 atoms announced, 2"):
        DataSystem(str(cut), TYPE_MAP)
    words = tmp_path / "words.xyz"
    words.write_text("".join(lines[:5]) + "three\n")
    with pytest.raises(DataError, match=r"words\.xyz: frame 1: expected the atom count, found"):
        DataSystem(str(words), TYPE_MAP)
    unknown = tmp_path / "frames.unknown"
    unknown.write_text("hello\n")
    with pytest.raises(DataError, match=r"frames\.unknown: not a system folder .* file_format"):
        DataSystem(str(unknown), TYPE_MAP)
    with pytest.raises(DataError, match=r"label_keys: 'forces' is not .* did you mean `force`"):
        DataSystem(str(good), TYPE_MAP, file_options=FileOptions(keys={"forces": "F"}))
    with pytest.raises(DataError, match=r"file_format 'extxzy' is not a format ASE reads"):
        DataSystem(str(good), TYPE_MAP, file_options=FileOptions(format="extxzy"))
    empty = tmp_path / "empty.xyz"
    empty.write_text("\n")
    with pytest.raises(
        DataError, match=r"empty\.xyz: holds no frame \(read as ASE format 'extxyz'"
    ):
        DataSystem(str(empty), TYPE_MAP)


def test_command_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.extxyz"
    write(path, frames_with(2, carbon), format="extxyz")
    assert run(["test", "-m", str(TINY), "-s", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sezm: error: ") and "bad.extxyz: frame 2: element 'C'" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# the other commands


def test_change_bias_model_devi_embed_read_files(water, tmp_path):
    xyz, npy = water
    a = change_bias(TINY, str(xyz), output=tmp_path / "a.pt", seed=1)
    b = change_bias(TINY, str(npy), output=tmp_path / "b.pt", seed=1)
    np.testing.assert_array_equal(a.after, b.after)
    assert not np.array_equal(a.after, a.before)
    committee = [TINY, DATA / "model_devi" / "model_1.pt"]
    (got,) = model_devi(committee, str(xyz), tmp_path / "xyz.out")
    (want,) = model_devi(committee, str(npy), tmp_path / "npy.out")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got.shape == (4, 8) and got[:, 4].max() > 0
    mixed = tmp_path / "mixed.xyz"
    write(mixed, [molecule("H2O", 0), molecule("H3O", 1), molecule("OH2", 2)], format="extxyz")
    embed(TINY, [str(mixed)], tmp_path / "e.h5")
    with h5py.File(tmp_path / "e.h5") as h5:
        assert sorted(h5) == ["mixed.xyz[3 atoms, open]", "mixed.xyz[4 atoms, open]"]
        group = h5["mixed.xyz[3 atoms, open]"]
        assert group.attrs["nframes"] == 2 and group["descriptor"].shape[:2] == (2, 3)
        assert group["atom_types"][:].tolist() == [[1, 1, 0], [0, 1, 1]]


def test_command_label_keys_and_format(tmp_path, capsys):
    frames = [molecule("H2O", k) for k in range(2)]
    for k, atoms in enumerate(frames):
        atoms.info["REF_energy"] = float(k)
        atoms.arrays["REF_forces"] = np.full((3, 3), 0.5)
        atoms.calc = None
    path = tmp_path / "frames.txt"  # a name that does not tell the format
    write(path, frames, format="extxyz")
    detail = str(tmp_path / "d")
    args = ["test", "-m", str(TINY), "-s", str(path), "-d", detail]
    assert run(args) == 2
    assert "name the format with file_format" in capsys.readouterr().err
    keys = ["--label-key", "energy=REF_energy", "--label-key", "force=REF_forces"]
    assert run([*args, "--file-format", "extxyz", *keys]) == 0
    assert np.loadtxt(detail + ".e.out")[:, 0].tolist() == [0.0, 1.0]
    assert np.all(np.loadtxt(detail + ".f.out")[:, :3] == 0.5)
    assert run([*args, "--file-format", "extxyz", "--label-key", "energy"]) == 2
    assert "expected LABEL=NAME" in capsys.readouterr().err
