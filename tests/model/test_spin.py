"""Spin models (``native``, ``deepspin``): parity with DeePMD-kit 3.2, derivatives, symmetry,
state migration, the ``ener_spin`` loss and a short training run.

Parity cases ``tests/data/parity/spin_*`` (see ``tests/data/parity_inputs/spin_recipe.py``) hold
upstream ``DeepPot.eval(..., spin=...)`` outputs, magnetic forces included; tolerances as in
``test_parity.py`` (float32 models), the magnetic force like the force.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from physics import accumulating_index_puts

import sezm
from sezm.cli import main
from sezm.config import normalize_model, normalize_section
from sezm.data.graph import build_graph
from sezm.model.build import build_model, load_model
from sezm.train.losses import build_loss

PARITY = Path(__file__).parents[1] / "data" / "parity"
SCHEMES = ("native", "deepspin")


def parity_frames(case: str):
    data = np.load(PARITY / case / "expected.npz")
    for name in sorted({k.split("/")[0] for k in data.files}):
        yield name, {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(name + "/")}


# --- parity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["spin_native", "spin_deepspin"])
def test_parity_with_magnetic_forces(case: str) -> None:
    dp = sezm.DeepPot(PARITY / case / "model.pt")
    assert dp.has_spin()
    failures = []
    for name, ref in parity_frames(case):
        nat = len(ref["atype"])
        box = ref["box"].reshape(1, 9) if "box" in ref else None
        e, f, v, ae, av, fm, mm = dp.eval(
            ref["coord"][None], box, ref["atype"], atomic=True, spin=ref["spin"][None]
        )
        assert mm.dtype == bool and mm.shape == (1, nat, 1)
        assert np.array_equal(mm.reshape(-1), ref["mask_mag"]), name
        checks = {
            "energy/atom": (abs(e.item() - ref["energy"].item()) / nat, 1e-5),
            "force": (np.abs(f[0] - ref["force"]).max(), 1e-5 + 1e-4 * np.abs(ref["force"]).max()),
            "force_mag": (
                np.abs(fm[0] - ref["force_mag"]).max(),
                1e-5 + 1e-4 * np.abs(ref["force_mag"]).max(),
            ),
            "virial/atom": (
                np.abs(v[0] - ref["virial"].reshape(9)).max() / nat,
                1e-5 + 1e-4 * np.abs(ref["virial"]).max() / nat,
            ),
            "atom_energy": (
                np.abs(ae[0, :, 0] - ref["atom_energy"]).max(),
                1e-5 + 3e-7 * np.abs(ref["atom_energy"]).max(),
            ),
            "atom_virial": (
                np.abs(av[0] - ref["atom_virial"]).max(),
                1e-5 + 1e-4 * np.abs(ref["atom_virial"]).max(),
            ),
        }
        failures += [f"{name}: {k} {a:.2e} > {t:.2e}" for k, (a, t) in checks.items() if a > t]
    assert not failures, "\n".join(failures)


def test_deepspin_caps_real_neighbours_at_sel() -> None:
    """The fixture's ``sel 16`` truncates (about 40 neighbours within rcut): without the cap,
    the energy moves far outside the parity tolerance."""
    dp = sezm.DeepPot(PARITY / "spin_deepspin" / "model.pt")
    ref = dict(parity_frames("spin_deepspin"))["spin_pbc_0"]
    args = (ref["coord"][None], ref["box"].reshape(1, 9), ref["atype"])
    dp.model.real_nsel = 10_000
    e = dp.eval(*args, spin=ref["spin"][None])[0]
    assert abs(e.item() - ref["energy"].item()) > 1e-2


@pytest.mark.parametrize("case", ["spin_native", "spin_deepspin"])
def test_batched_frames_match_single_frames(case: str) -> None:
    dp = sezm.DeepPot(PARITY / case / "model.pt")
    frames = dict(parity_frames(case))
    refs = [frames["spin_pbc_0"], frames["spin_pbc_1"]]
    stack = {k: np.stack([r[k] for r in refs]) for k in ("coord", "box", "spin")}
    e, f, v, fm, _mask = dp.eval(
        stack["coord"], stack["box"].reshape(2, 9), refs[0]["atype"], spin=stack["spin"]
    )
    for i, ref in enumerate(refs):
        assert abs(e[i, 0] - ref["energy"].item()) / len(ref["atype"]) < 1e-5
        assert np.abs(f[i] - ref["force"]).max() < 1e-5 + 1e-4 * np.abs(ref["force"]).max()
        assert np.abs(fm[i] - ref["force_mag"]).max() < 1e-5 + 1e-4 * np.abs(ref["force_mag"]).max()
        vr = ref["virial"].reshape(9)
        assert np.abs(v[i] - vr).max() / len(ref["atype"]) < 1e-5 + 1e-4 * np.abs(vr).max()


def test_spin_is_required() -> None:
    dp = sezm.DeepPot(PARITY / "spin_native" / "model.pt")
    ref = dict(parity_frames("spin_native"))["spin_pbc_0"]
    with pytest.raises(ValueError, match="spin"):
        dp.eval(ref["coord"][None], ref["box"].reshape(1, 9), ref["atype"])


# --- float64 models ---------------------------------------------------------------------------
RCUT = 3.5


@cache
def model_of(scheme: str):
    """Tiny float64 spin model (Ni magnetic, O not), every parameter perturbed."""
    spin = {"use_spin": ["Ni"], "scheme": scheme}
    if scheme == "deepspin":
        spin["virtual_scale"] = [0.3]
    raw = {
        "type": "dpa4",
        "type_map": ["Ni", "O"],
        "descriptor": {
            "rcut": RCUT,
            "sel": 60,
            "channels": 8,
            "n_radial": 4,
            "lmax": 2,
            "n_blocks": 1,
            "mixing_layers": 2,
            "precision": "float64",
            "seed": 1,
        },
        "fitting_net": {"neuron": [8], "precision": "float64", "seed": 1},
        "spin": spin,
    }
    net = build_model(normalize_model(raw))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net.eval()


def crystal(seed: int = 0):
    """Six atoms (3 Ni, 3 O) in a small triclinic cell, pairs >= 1.4 Å; random spins."""
    rng = np.random.default_rng(seed)
    cell = 3.6 * (np.eye(3) + 0.1 * rng.uniform(-1, 1, (3, 3)))
    shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    shifts = shifts @ cell
    coord: list[np.ndarray] = []
    while len(coord) < 6:
        p = rng.uniform(0, 1, 3) @ cell
        if all(np.linalg.norm(p - q - shifts, axis=1).min() >= 1.4 for q in coord):
            coord.append(p)
    spin = rng.normal(size=(6, 3))
    return np.array(coord), cell, np.array([0, 1, 0, 1, 0, 1]), spin


def run(model, coord, cell, atype, spin) -> dict[str, np.ndarray]:
    g = build_graph(coord[None], cell[None], atype[None], model.rcut, spin=spin[None])
    out = model(g, atomic_virial=True)
    return {k: v.detach().cpu().numpy()[0] for k, v in out.items()}


def close(a, b, tol: float) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.abs(a - b).max() <= tol * (1 + np.abs(b).max()), np.abs(a - b).max()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_passes_are_reproducible_on_threads(scheme: str) -> None:
    """No accumulating ``index_put`` (it races between CPU threads) in the forces, magnetic
    forces or a force loss's gradient: see ``tests/model/test_deterministic_gradients.py``."""
    model = model_of(scheme)
    coord, cell, atype, spin = crystal()
    graph = build_graph(coord[None], cell[None], atype[None], model.rcut, spin=spin[None])
    assert accumulating_index_puts(model, graph) == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_forces_magnetic_forces_and_virial_by_finite_differences(scheme: str) -> None:
    model = model_of(scheme)
    coord, cell, atype, spin = crystal()
    ref = run(model, coord, cell, atype, spin)
    h = 1e-5

    def energy(c=coord, b=cell, s=spin) -> float:
        return float(run(model, c, b, atype, s)["energy"])

    fd_force, fd_mag, fd_vir = np.zeros((6, 3)), np.zeros((6, 3)), np.zeros((3, 3))
    for i in range(6):
        for a in range(3):
            d = np.zeros((6, 3))
            d[i, a] = h
            fd_force[i, a] = -(energy(c=coord + d) - energy(c=coord - d)) / (2 * h)
            fd_mag[i, a] = -(energy(s=spin + d) - energy(s=spin - d)) / (2 * h)
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            plus, minus = np.eye(3) + eps, np.eye(3) - eps
            diff = energy(c=coord @ plus.T, b=cell @ plus.T) - energy(
                c=coord @ minus.T, b=cell @ minus.T
            )
            fd_vir[a, b] = -diff / (2 * h)
    close(ref["force"], fd_force, 1e-6)
    close(ref["force_mag"], fd_mag, 1e-6)
    close(ref["virial"].reshape(3, 3), fd_vir, 1e-6)
    close(ref["atom_virial"].sum(0), ref["virial"], 1e-10)
    close(ref["atom_energy"].sum(), ref["energy"], 1e-10)
    assert np.abs(ref["force_mag"][atype == 0]).max() > 1e-3  # the spin routes are live


@pytest.mark.parametrize("scheme", SCHEMES)
def test_joint_rotation_of_coordinates_and_spins(scheme: str) -> None:
    model = model_of(scheme)
    coord, cell, atype, spin = crystal(1)
    ref = run(model, coord, cell, atype, spin)
    q, r = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))
    rot = q * np.sign(np.diag(r))
    rot = rot if np.linalg.det(rot) > 0 else -rot
    out = run(model, coord @ rot.T, cell @ rot.T, atype, spin @ rot.T)
    close(out["energy"], ref["energy"], 1e-9)
    close(out["atom_energy"], ref["atom_energy"], 1e-9)
    close(out["force"], ref["force"] @ rot.T, 1e-9)
    close(out["force_mag"], ref["force_mag"] @ rot.T, 1e-9)
    close(out["virial"].reshape(3, 3), rot @ ref["virial"].reshape(3, 3) @ rot.T, 1e-9)
    # spins alone are not free to rotate: the energy couples them to the lattice
    turned = run(model, coord, cell, atype, spin @ rot.T)
    assert abs(turned["energy"] - ref["energy"]) > 1e-6


@pytest.mark.parametrize("scheme", SCHEMES)
def test_non_magnetic_types_ignore_their_spin(scheme: str) -> None:
    model = model_of(scheme)
    coord, cell, atype, spin = crystal(2)
    ref = run(model, coord, cell, atype, spin)
    other = spin.copy()
    other[atype == 1] = np.random.default_rng(0).normal(size=(3, 3))
    out = run(model, coord, cell, atype, other)
    close(out["energy"], ref["energy"], 1e-12)
    close(out["force"], ref["force"], 1e-12)
    assert np.all(out["force_mag"][atype == 1] == 0)
    assert out["mask_mag"].tolist() == (atype == 0).tolist()


def test_native_magnetic_force_is_continuous_at_zero_spin() -> None:
    model = model_of("native")
    coord, cell, atype, spin = crystal(3)
    at_zero, near = spin.copy(), spin.copy()
    at_zero[0] = 0.0
    near[0] = 1e-6 * np.array([0.3, -0.5, 0.8])
    a, b = run(model, coord, cell, atype, at_zero), run(model, coord, cell, atype, near)
    close(a["force_mag"], b["force_mag"], 1e-5)


# --- state migration 1.1 -> 1.2 ---------------------------------------------------------------
def test_version_1_1_spin_gate_is_squared(tmp_path) -> None:
    path = PARITY / "spin_native" / "model.pt"
    raw = torch.load(path, weights_only=True)
    state = raw["model"]
    prefix = "model.Default.atomic_model.descriptor."
    state[prefix + "version_tensor"] = torch.tensor(1.1, dtype=torch.float64)
    state[prefix + "env_seed_embedding.spin_scale"] = torch.tensor([-0.7])
    torch.save(raw, tmp_path / "v11.pt")
    model, _ = load_model(tmp_path / "v11.pt")
    desc = model.descriptor
    assert float(desc.version_tensor) == pytest.approx(1.2)
    assert desc.env_seed_embedding.spin_scale.item() == pytest.approx(0.49)
    assert desc.spin_embedding.adam_spin_vec_weight.abs().sum() > 0


def test_version_1_1_without_magnetic_types_zeroes_dormant_spin_routes(tmp_path) -> None:
    raw = torch.load(PARITY / "spin_native" / "model.pt", weights_only=True)
    state = raw["model"]
    state["_extra_state"]["model_params"]["spin"]["use_spin"] = [False, False]
    prefix = "model.Default.atomic_model.descriptor."
    state[prefix + "version_tensor"] = torch.tensor(1.1, dtype=torch.float64)
    torch.save(raw, tmp_path / "v11.pt")
    model, _ = load_model(tmp_path / "v11.pt")
    emb = model.descriptor.spin_embedding
    for t in (
        emb.mag_layer2.matrix,
        emb.adam_spin_vec_weight,
        emb.adam_spin_nbr_weight,
        model.descriptor.env_seed_embedding.spin_scale,
    ):
        assert torch.all(t == 0)
    assert emb.mag_layer1.matrix.abs().sum() > 0  # not an output-controlling route


# --- loss -------------------------------------------------------------------------------------
def test_ener_spin_loss_terms() -> None:
    raw = {
        "type": "ener_spin",
        "start_pref_e": 2.0,
        "limit_pref_e": 2.0,
        "start_pref_fr": 3.0,
        "limit_pref_fr": 3.0,
        "start_pref_fm": 5.0,
        "limit_pref_fm": 1.0,
        "start_pref_v": 0.0,
        "limit_pref_v": 0.0,
    }
    section = normalize_section("loss", raw)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    nf, n = 2, 4
    mask_mag = torch.tensor([[True, False, True, False], [False, False, True, False]])
    pred = {"energy": rand(nf), "force": rand(nf, n, 3), "force_mag": rand(nf, n, 3)}
    pred["mask_mag"] = mask_mag
    label = {"energy": rand(nf), "force": rand(nf, n, 3), "force_mag": rand(nf, n, 3)}
    find = dict.fromkeys(label, True)
    de = ((pred["energy"] - label["energy"]) ** 2 / n).mean()
    df = ((pred["force"] - label["force"]) ** 2).mean()
    dm = ((pred["force_mag"] - label["force_mag"])[mask_mag] ** 2).mean()
    for lr, pref_fm in ((1.0, 5.0), (0.5, 3.0)):
        loss, metrics = build_loss(section, 1.0)(pred, label, find, n, lr)
        assert float(loss) == pytest.approx(float(2 * de + 3 * df + pref_fm * dm))
        assert float(metrics["rmse_fm"]) == pytest.approx(float(dm.sqrt()))
        assert float(metrics["rmse_fr"]) == pytest.approx(float(df.sqrt()))
    _, metrics = build_loss({**section, "loss_func": "mae"}, 1.0)(pred, label, find, n, 1.0)
    am = (pred["force_mag"] - label["force_mag"])[mask_mag].abs().mean()
    assert float(metrics["mae_fm"]) == pytest.approx(float(am))
    # no magnetic atom in the batch: the term is zero, not NaN
    loss, metrics = build_loss(section, 1.0)(
        {**pred, "mask_mag": torch.zeros_like(mask_mag)}, label, find, n, 1.0
    )
    assert float(loss) == pytest.approx(float(2 * de + 3 * df))
    assert float(metrics["rmse_fm"]) == 0.0


# --- training ---------------------------------------------------------------------------------
def write_spin_system(root: Path, with_spin: bool = True) -> Path:
    """The periodic frames of the native parity case, with upstream's outputs as labels."""
    frames = [ref for _, ref in parity_frames("spin_native") if "box" in ref]
    sd = root / "set.000"
    sd.mkdir(parents=True)
    (root / "type.raw").write_text("\n".join(map(str, frames[0]["atype"])) + "\n")
    (root / "type_map.raw").write_text("Ni\nO\n")
    keys = {"coord": "coord", "box": "box", "energy": "energy", "force": "force"}
    keys.update({"force_mag": "force_mag", **({"spin": "spin"} if with_spin else {})})
    for key, name in keys.items():
        np.save(sd / f"{name}.npy", np.stack([f[key].reshape(-1) for f in frames]))
    return root


@pytest.mark.parametrize("scheme", SCHEMES)
def test_short_spin_training_run(tmp_path, monkeypatch, scheme: str) -> None:
    monkeypatch.chdir(tmp_path)
    config = json.loads((PARITY / f"spin_{scheme}" / "input.json").read_text())
    config["model"]["descriptor"].update(channels=8, n_radial=4, lmax=1, mmax=1)
    config["model"]["spin"]["allow_missing_label"] = True
    tr = config["training"]
    tr["training_data"]["systems"] = [str(write_spin_system(tmp_path / "train"))]
    tr["validation_data"]["systems"] = [str(write_spin_system(tmp_path / "valid", False))]
    tr.update(numb_steps=2, disp_freq=1, save_freq=2, seed=1)
    (tmp_path / "input.json").write_text(json.dumps(config))
    main(["train", "input.json", "--skip-neighbor-stat"])
    header = (tmp_path / "lcurve.out").read_text().splitlines()[0]
    assert "rmse_fm_trn" in header and "rmse_fr_val" in header
    dp = sezm.DeepPot(tmp_path / "model.ckpt.pt")
    ref = dict(parity_frames("spin_native"))["spin_pbc_0"]
    out = dp.eval(
        ref["coord"][None], ref["box"].reshape(1, 9), ref["atype"], spin=ref["spin"][None]
    )
    assert len(out) == 5 and np.isfinite(out[3]).all()
    # the energy bias came from the data (upstream's outputs here are ~ +14 eV/atom)
    assert abs(out[0].item() - ref["energy"].item()) / len(ref["atype"]) < 5.0
