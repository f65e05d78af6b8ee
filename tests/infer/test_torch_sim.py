"""torch-sim interface: torch-sim's own model checks, DeepPot's numbers for batches of systems of
different sizes in one model call, stress = strain derivative, MD and FIRE through torch-sim's
runners, a frozen ``.pt2`` in place of the checkpoint, and clear errors.

The model is a small float64 DPA4 with perturbed weights and the type map O, H, Si, Fe (Si and
Fe for torch-sim's validator), so that the comparisons hold to float64 rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

import sezm
from sezm.config.normalize import normalize_model
from sezm.data.frames import InputError
from sezm.data.neighbors import device_search_available
from sezm.model.build import build_model
from sezm.train.checkpoint import model_state

ts = pytest.importorskip("torch_sim")
from torch_sim.models.interface import validate_model_outputs  # noqa: E402

from sezm.infer.torch_sim import batch_graph  # noqa: E402
from sezm.torch_sim import SeZMModel  # noqa: E402

TESTS = Path(__file__).parents[1]
WATER = TESTS / "data" / "systems" / "water" / "data_0"
PARITY = TESTS / "data" / "parity"
TYPE_MAP = ["O", "H", "Si", "Fe"]
CPU, F64 = torch.device("cpu"), torch.float64


def float64_checkpoint(path: Path, type_map: list[str]) -> Path:
    raw = {
        "type": "dpa4",
        "type_map": type_map,
        "descriptor": {
            "channels": 8,
            "n_radial": 4,
            "rcut": 4.0,
            "lmax": 1,
            "n_blocks": 1,
            "mixing_layers": 1,
            "precision": "float64",
            "use_amp": False,
            "seed": 1,
        },
        "fitting_net": {"neuron": [8], "precision": "float64", "seed": 1},
    }
    params = normalize_model(raw)
    net = build_model(params)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        net.out_bias.copy_(-torch.arange(1.0, len(type_map) + 1, dtype=F64).view(1, -1, 1))
    torch.save({"model": model_state(net, params, 1e-3, 0)}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return float64_checkpoint(tmp_path_factory.mktemp("ts") / "model.pt", TYPE_MAP)


@pytest.fixture(scope="module")
def dp(checkpoint) -> sezm.DeepPot:
    return sezm.DeepPot(checkpoint, device="cpu")


def water_frames(n: int = 2) -> list[Atoms]:
    """The first ``n`` frames of the bundled water system (192 atoms, cubic cell)."""
    coord = np.load(WATER / "set.000" / "coord.npy").reshape(-1, 192, 3)
    box = np.load(WATER / "set.000" / "box.npy").reshape(-1, 3, 3)
    symbols = [("O", "H")[t] for t in np.loadtxt(WATER / "type.raw", dtype=int)]
    return [Atoms(symbols, positions=coord[f], cell=box[f], pbc=True) for f in range(n)]


def mixed_batch() -> list[Atoms]:
    """Periodic systems of four sizes: water (192), Si (8, triclinic after shear), Fe (12), SiO."""
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.set_cell(si.cell.array @ np.array([[1, 0, 0], [0.1, 1, 0], [0, 0.05, 1]]), scale_atoms=True)
    fe = bulk("Fe", "fcc", a=3.6, cubic=True).repeat([3, 1, 1])
    sio = Atoms(
        "SiO2", positions=[[0, 0, 0], [1.6, 0, 0], [-1.6, 0.2, 0]], cell=[6, 6, 6], pbc=True
    )
    rng = np.random.default_rng(0)
    for atoms in (si, fe):
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    return [water_frames(1)[0], si, fe, sio]


def deep_pot_results(dp: sezm.DeepPot, atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
    """Energy, forces and stress ``-(W + W^T) / 2V`` of one system from ``DeepPot.eval``."""
    types = [TYPE_MAP.index(s) for s in atoms.get_chemical_symbols()]
    periodic = bool(atoms.pbc.all())
    cell = atoms.cell.array[None] if periodic else None
    e, f, v = dp.eval(atoms.positions[None], cell, types)
    w = v[0].reshape(3, 3)
    stress = -0.5 * (w + w.T) / atoms.get_volume() if periodic else None
    return float(e[0, 0]), f[0], stress


def test_torch_sim_validator(dp):
    validate_model_outputs(SeZMModel(dp), CPU, F64)


def test_batch_equals_deep_pot_in_one_call(dp):
    """Four periodic systems of different sizes in one state: one descriptor call, and per
    system the energy, forces and stress of DeepPot to float64 rounding."""
    systems = mixed_batch()
    state = ts.io.atoms_to_state(systems, CPU, F64)
    calls = []
    hook = dp.model.descriptor.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = SeZMModel(dp)(state)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert out["energy"].shape == (4,) and out["forces"].shape == (state.n_atoms, 3)
    assert out["stress"].shape == (4, 3, 3)
    assert out["energy"].dtype == out["forces"].dtype == out["stress"].dtype == F64
    start = 0
    for k, atoms in enumerate(systems):
        energy, forces, stress = deep_pot_results(dp, atoms)
        n = len(atoms)
        assert out["energy"][k].item() == pytest.approx(energy, rel=0, abs=1e-10 * n)
        np.testing.assert_allclose(out["forces"][start : start + n], forces, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out["stress"][k], stress, rtol=0, atol=1e-12)
        assert np.abs(forces).max() > 1e-2  # the comparison is not between zeros
        start += n


def test_state_dict(dp):
    """A dict of the state's fields gives the numbers of the state; atoms must come system by
    system in order."""
    state = ts.io.atoms_to_state(mixed_batch()[1:], CPU, F64)
    model = SeZMModel(dp)
    fields = ("positions", "cell", "pbc", "atomic_numbers", "system_idx")
    got = model({k: getattr(state, k) for k in fields})
    want = model(state)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    si = mixed_batch()[1]
    two = ts.io.atoms_to_state([si, si], CPU, F64)  # equal sizes: torch-sim accepts 1, 1, 0, 0
    swapped = {k: getattr(two, k) for k in fields} | {"system_idx": 1 - two.system_idx}
    with pytest.raises(InputError, match="system_idx must be sorted"):
        model(swapped)


def test_bundled_water_frames(dp):
    """The bundled water frames as one batch equal DeepPot's batch evaluation."""
    frames = water_frames(4)
    out = SeZMModel(dp)(ts.io.atoms_to_state(frames, CPU, F64))
    coord = np.stack([a.positions for a in frames])
    cells = np.stack([a.cell.array for a in frames]).reshape(-1, 9)
    e, f, v = dp.eval(coord, cells, [TYPE_MAP.index(s) for s in frames[0].get_chemical_symbols()])
    np.testing.assert_allclose(out["energy"], e[:, 0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(out["forces"], f.reshape(-1, 3), rtol=0, atol=1e-10)
    w = v.reshape(-1, 3, 3)
    volume = np.abs(np.linalg.det(cells.reshape(-1, 3, 3)))[:, None, None]
    np.testing.assert_allclose(
        out["stress"], -0.5 * (w + w.transpose(0, 2, 1)) / volume, rtol=0, atol=1e-12
    )


def test_frame_inputs_at_their_defaults():
    """A model with a frame [charge, spin] embedding runs at its default_chg_spin, as DeepPot
    does without charge_spin (float32 model: the parity tolerance, 1e-5 eV per atom)."""
    dp = sezm.DeepPot(PARITY / "chg_spin" / "model.pt", device="cpu")
    frames = water_frames(2)
    out = SeZMModel(dp)(ts.io.atoms_to_state(frames, CPU, F64))
    coord = np.stack([a.positions for a in frames])
    cells = np.stack([a.cell.array for a in frames]).reshape(-1, 9)
    e, f, _ = dp.eval(coord, cells, frames[0].numbers == 1)
    np.testing.assert_allclose(out["energy"], e[:, 0], rtol=0, atol=1e-5 * 192)
    np.testing.assert_allclose(out["forces"], f.reshape(-1, 3), rtol=0, atol=1e-5)


def test_open_boundaries(dp):
    """Molecules without a cell: energies and forces of DeepPot; stress is refused."""
    mols = [molecule("H2O"), molecule("SiH4"), molecule("H2O2")]
    mols[1].positions *= 1.02
    for m in mols:
        m.pbc = False
        m.cell = np.zeros((3, 3))
    state = ts.io.atoms_to_state(mols, CPU, F64)
    out = SeZMModel(dp, compute_stress=False)(state)
    assert "stress" not in out
    start = 0
    for k, atoms in enumerate(mols):
        energy, forces, _ = deep_pot_results(dp, atoms)
        n = len(atoms)
        assert out["energy"][k].item() == pytest.approx(energy, rel=0, abs=1e-10)
        np.testing.assert_allclose(out["forces"][start : start + n], forces, rtol=0, atol=1e-10)
        start += n
    with pytest.raises(InputError, match="compute_stress=False"):
        SeZMModel(dp)(state)


def test_stress_is_strain_derivative(dp):
    """sigma_ab = (1/V) dE/d eps_ab for a symmetric strain (central differences)."""
    si = mixed_batch()[1]
    model = SeZMModel(dp)
    stress = model(ts.io.atoms_to_state([si], CPU, F64))["stress"][0].numpy()
    eps, fd = 1e-5, np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energy = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[a, b] += sign * eps / 2
                strain[b, a] += sign * eps / 2
                strained = si.copy()
                strained.set_cell(si.cell.array @ strain, scale_atoms=True)
                state = ts.io.atoms_to_state([strained], CPU, F64)
                energy.append(model(state)["energy"].item())
            fd[a, b] = (energy[0] - energy[1]) / (2 * eps * si.get_volume())
    assert np.abs(stress).max() > 1e-3
    np.testing.assert_allclose(stress, fd, rtol=0, atol=1e-7 * np.abs(stress).max())


def test_nve_conserves_energy(dp):
    """20 velocity-Verlet steps of two systems at once: total energy drift < 1e-5 eV/atom
    (about 1e-6 at 0.5 fs; forces that are not -dE/dr drift by far more)."""
    systems = mixed_batch()[1:3]
    model = SeZMModel(dp, compute_stress=False)
    state = ts.io.atoms_to_state(systems, CPU, F64)
    kT = torch.tensor(300.0 * ts.units.MetalUnits.temperature, dtype=F64)
    dt = torch.tensor(0.5e-3 * ts.units.MetalUnits.time, dtype=F64)  # 0.5 fs
    init, update = ts.nve(model=model, dt=dt, kT=kT, seed=1)
    state = init(state)

    def total() -> torch.Tensor:
        kinetic = ts.calc_kinetic_energy(
            momenta=state.momenta, masses=state.masses, system_idx=state.system_idx
        )
        return state.energy + kinetic

    start = total()
    for _ in range(20):
        state = update(state)
    drift = (total() - start).abs() / state.n_atoms_per_system
    assert (drift < 1e-5).all(), drift
    assert (state.positions != ts.io.atoms_to_state(systems, CPU, F64).positions).any()


@pytest.mark.filterwarnings("ignore:Optimize has reached max steps")
def test_nvt_and_fire_through_runners(dp):
    """torch-sim's ``integrate`` (Langevin NVT) and ``optimize`` (FIRE with cell relaxation)
    on a batch of three systems: they run, and FIRE lowers every system's energy."""
    systems = mixed_batch()[1:]
    model = SeZMModel(dp)
    final = ts.integrate(
        system=systems,
        model=model,
        integrator=ts.nvt_langevin,
        n_steps=5,
        temperature=300.0,
        timestep=0.0005,
    )
    assert final.n_systems == 3 and torch.isfinite(final.positions).all()
    before = model(ts.io.atoms_to_state(systems, CPU, F64))["energy"]
    relaxed = ts.optimize(system=systems, model=model, optimizer=ts.frechet_cell_fire, max_steps=15)
    after = model(relaxed)["energy"]
    assert (after < before).all(), (before, after)


def test_errors(dp, tmp_path):
    model = SeZMModel(dp)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    with pytest.raises(InputError, match=r"\['Cu'\].*not in the model's type_map"):
        model(ts.io.atoms_to_state([mixed_batch()[1], cu], CPU, F64))
    with pytest.raises(TypeError, match=r"dtype=torch\.float32"):
        model(ts.io.atoms_to_state([cu], CPU, torch.float32))
    clash = mixed_batch()[3]
    clash.positions[2] = clash.positions[0] + 1e-4
    with pytest.raises(InputError, match="system 1: atoms 0 and 2 are"):
        model(ts.io.atoms_to_state([mixed_batch()[1], clash], CPU, F64))
    with pytest.raises(ValueError, match="device and head apply when loading"):
        SeZMModel(dp, device="cpu")
    for case, match in (
        ("fparam1", "fparam1/model.pt: the model reads per-atom aparam"),
        ("property", "holds a property model"),
        ("dens", "holds a dens model"),
        ("spin_native", "holds a spin model"),
    ):
        with pytest.raises(ValueError, match=match):
            SeZMModel(PARITY / case / "model.pt", device="cpu")


@pytest.mark.skipif(not os.environ.get("SEZM_SLOW_TESTS"), reason="freezes a .pt2 (~1 min)")
def test_frozen_model_in_one_call(checkpoint, dp, tmp_path):
    """A ``.pt2`` evaluates the whole batch in one package call, as the checkpoint does."""
    from sezm.cli import main

    main(["freeze", "-c", str(checkpoint), "-o", str(tmp_path / "m"), "--no-with-comm"])
    frozen = SeZMModel(tmp_path / "m.pt2")
    state = ts.io.atoms_to_state(mixed_batch(), CPU, F64)
    got, want = frozen(state), SeZMModel(dp)(state)
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-10, err_msg=key)
    validate_model_outputs(frozen, CPU, F64)


def test_missing_torch_sim_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "torch_sim", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "sezm.infer.torch_sim")
    with pytest.raises(ImportError, match=r'pip install "sezm\[torchsim\]"'):
        importlib.import_module("sezm.infer.torch_sim")


@pytest.mark.skipif(
    not device_search_available(),
    reason="vesin-torch (the gpu extra) is not installed",
)
def test_device_search_gives_the_host_graph():
    """The device neighbour search (what runs on CUDA) gives the host search's graph, system by
    system, periodic and open, and refuses overlapping atoms with the same message."""
    water = molecule("H2O")
    water.center(vacuum=3.0)
    crystal = bulk("Si", "diamond", a=5.43).repeat((2, 1, 1))
    frames = [water, crystal]
    positions = torch.tensor(np.concatenate([a.positions for a in frames]))
    n_node = torch.tensor([len(a) for a in frames])
    atype = torch.zeros(len(positions), dtype=torch.long)
    for cells in (None, torch.tensor(np.stack([a.cell.array for a in frames]))):
        if cells is not None:
            cells[0] = torch.eye(3, dtype=F64) * 9.0  # the water box, periodic too
        host = batch_graph(positions, cells, n_node, atype, 4.0)
        device = batch_graph(positions, cells, n_node, atype, 4.0, CPU)
        assert len(host.src) > 10

        def key(g):
            order = np.lexsort((g.edge_vec[:, 2], g.edge_vec[:, 1], g.edge_vec[:, 0], g.src, g.dst))
            return g.src[order], g.dst[order], g.edge_vec[order]

        for a, b in zip(key(host), key(device), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    positions[1] = positions[0] + 1e-5
    with pytest.raises(InputError, match="system 0") as host_err:
        batch_graph(positions, None, n_node, atype, 4.0)
    with pytest.raises(InputError, match="system 0") as device_err:
        batch_graph(positions, None, n_node, atype, 4.0, CPU)
    assert str(host_err.value) == str(device_err.value)
