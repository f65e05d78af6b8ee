"""The ``dens`` model and training path: parity with DeePMD-kit 3.2, neighbour cap, frame
convention, statistics and a short run.

Parity case ``tests/data/parity/dens`` (``tests/data/parity_inputs/dens_recipe.py``): its
``expected.npz`` holds upstream ``DeepPot`` outputs, which a checkpoint with a dens head gives
in the dens mode (direct forces, NaN virials); ``test_parity.py`` compares them. ``dens.npz``
holds the dens-mode outputs of the upstream model for a fixed corruption, one training-mode
``DeNSLoss`` evaluation (mae and mse) after a seeded corruption, and the force-RMSD statistic.
Tolerances as in ``test_parity.py`` (float32 models); loss values and metrics to 1e-5 relative.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

import sezm
from sezm.cli import main
from sezm.compat.deepmd import load_checkpoint, to_deepmd_state
from sezm.config import normalize_model, normalize_section
from sezm.data import System
from sezm.data.dataset import Batch
from sezm.data.graph import build_graph
from sezm.data.stats import force_rmsd
from sezm.model.build import build_model, load_model
from sezm.model.dens import DensModel
from sezm.train.losses import DensLoss
from sezm.train.steps import dens_inputs

DATA = Path(__file__).parents[1] / "data"
CASE = DATA / "parity" / "dens"
WATER = DATA / "systems" / "water"
NORM_KEYS = ("force", "force_norm", "clean_force_norm", "denoising_force_norm")


@cache
def reference() -> tuple[dict, dict, dict]:
    expected = dict(np.load(CASE / "expected.npz"))
    return expected, dict(np.load(CASE / "dens.npz")), json.loads((CASE / "meta.json").read_text())


@cache
def parity_model() -> DensModel:
    model, _ = load_model(CASE / "model.pt")
    return model


def within(failures: list, label: str, got, ref, atol: float, rtol: float) -> None:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    err, tol = np.abs(got.reshape(ref.shape) - ref).max(), atol + rtol * np.abs(ref).max()
    if not err <= tol:
        failures.append(f"{label}: {err:.2e} > {tol:.2e}")


# --- parity -----------------------------------------------------------------------------------
def test_dens_outputs_match_upstream() -> None:
    """Corrupted frames (force embedding on) through the capped neighbour list."""
    expected, dens, meta = reference()
    model = parity_model()
    assert isinstance(model, DensModel) and model.nsel == 40
    failures = []
    for name in meta["dens_frames"]:
        ref = {k.split("/", 2)[2]: v for k, v in dens.items() if k.startswith(f"{name}/dens/")}
        nat = len(expected[f"{name}/atype"])
        box = expected.get(f"{name}/box")
        g = build_graph(
            ref["noisy_coord"][None], None if box is None else box[None],
            expected[f"{name}/atype"][None], model.rcut,
        )  # fmt: skip
        g.force_input = torch.tensor(ref["force_input"][None])
        g.noise_mask = torch.tensor(ref["noise_mask"][None])
        with torch.no_grad():
            out = {k: v[0].numpy() for k, v in model(g).items()}
        for key in ("energy", "energy_norm"):
            within(failures, f"{name} {key}/atom", out[key] / nat, ref[key] / nat, 1e-5, 0.0)
        for key in ("atom_energy", "atom_energy_norm"):
            within(failures, f"{name} {key}", out[key], ref[key], 1e-5, 3e-7)
        for key in NORM_KEYS:
            within(failures, f"{name} {key}", out[key], ref[key], 1e-5, 1e-4)
    assert not failures, "\n".join(failures)


def test_deeppot_gives_direct_forces_without_virials() -> None:
    expected, _, _ = reference()
    dp = sezm.DeepPot(CASE / "model.pt")
    assert isinstance(dp.model, DensModel)
    coord, box, atype = (expected[f"water_pbc_0/{k}"] for k in ("coord", "box", "atype"))
    e, f, v, _ae, av = dp.eval(coord[None], box.reshape(1, 9), atype, atomic=True)
    assert np.isnan(v).all() and np.isnan(av).all()
    assert np.isnan(expected["water_pbc_0/virial"]).all()
    failures = []
    within(failures, "force", f[0], expected["water_pbc_0/force"], 1e-5, 1e-4)
    within(
        failures,
        "energy/atom",
        e / len(atype),
        expected["water_pbc_0/energy"] / len(atype),
        1e-5,
        0,
    )
    assert not failures, failures
    with pytest.raises(NotImplementedError, match="dens"):
        dp.eval_descriptor(coord[None], box.reshape(1, 9), atype)


def test_neighbours_are_capped_at_sum_sel() -> None:
    """Water has ~80-100 neighbours within 6 Å; the dens path keeps the 40 nearest."""
    expected, _, _ = reference()
    model = parity_model()
    coord, box, atype = (expected[f"water_pbc_0/{k}"] for k in ("coord", "box", "atype"))
    g = build_graph(coord[None], box[None], atype[None], model.rcut)
    assert np.bincount(g.dst.numpy()).min() > 40
    uncapped = DensModel(model.params)
    uncapped.load_state_dict(model.state_dict())
    uncapped.eval().nsel = 10**6
    with torch.no_grad():
        f_cap, f_all = (m(g)["force"][0].numpy() for m in (model, uncapped))
    ref = expected["water_pbc_0/force"]
    assert np.abs(f_cap - ref).max() < 1e-5 < np.abs(f_all - ref).max()


@pytest.mark.parametrize("loss_func", ["mae", "mse"])
def test_training_step_loss_matches_upstream(loss_func: str) -> None:
    """Seeded corruption (same draws as DeePMD-kit), noisy graph, training-mode model, loss."""
    _, dens, meta = reference()
    config = json.loads((CASE / "input.json").read_text())
    model = parity_model()
    section = normalize_section("loss", {**config["loss"], "loss_func": loss_func})
    loss = DensLoss(section, config["learning_rate"]["start_lr"])
    coord, box, atype = dens["loss/coord"], dens["loss/box"], dens["loss/atype"]
    labels = {
        "energy": torch.tensor(dens["loss/energy_label"]),
        "force": torch.tensor(dens["loss/force_label"]),
    }
    graph = build_graph(coord, box, atype, model.rcut)
    batch = Batch(graph, labels, {"energy": True, "force": True}, 0, np.arange(2), coord, box)
    torch.manual_seed(meta["loss_seed"])
    model.train()
    try:
        noisy_graph, drawn = dens_inputs(loss, batch, model.rcut, training=True)
        pred = model(noisy_graph, create_graph=True)
    finally:
        model.eval()
    key = f"loss_{loss_func}"
    assert drawn.use_dens
    assert np.array_equal(drawn.noise_mask.numpy(), dens[f"{key}/noise_mask"])
    assert np.array_equal(drawn.coord.numpy(), dens[f"{key}/noisy_coord"])
    value, metrics = loss(
        pred, labels, batch.find, 192, meta["loss_lr"], batch=drawn,
        energy_bias=model.energy_bias(graph.atype), energy_std=model.out_std[0, 0, 0],
        force_rmsd=model.dens_force_rmsd,
    )  # fmt: skip
    drawn_keys = ("noise_mask", "noisy_coord", "use_dens")
    ref = {k.split("/", 1)[1]: v for k, v in dens.items() if k.startswith(key + "/")}
    ref = {k: float(v) for k, v in ref.items() if k not in drawn_keys}
    assert set(metrics) == set(ref) - {"loss"}
    got = {"loss": float(value.detach()), **{k: float(v) for k, v in metrics.items()}}
    bad = {k: (got[k], v) for k, v in ref.items() if abs(got[k] - v) > 1e-5 * abs(v)}
    assert not bad, bad


def test_force_rmsd_statistic_matches_upstream() -> None:
    _, dens, _ = reference()
    system = System(WATER / "data_0", ["O", "H"])
    samples = [system.frames(dens["stat/frames"], ["force"])]
    assert force_rmsd(samples) == pytest.approx(float(dens["stat/force_rmsd"]), rel=1e-12)


def test_checkpoint_keys_round_trip() -> None:
    ckpt = load_checkpoint(CASE / "model.pt")
    raw = torch.load(CASE / "model.pt", weights_only=True)["model"]
    model = parity_model()
    ours = to_deepmd_state(model.state_dict())
    assert set(ours) == set(raw) - {"_extra_state"}
    assert all(torch.equal(ours[k].cpu(), raw[k]) for k in ours)
    assert "dens_fitting_net.force_embedding.sh_norm" in ckpt.state


# --- float64 model ----------------------------------------------------------------------------
@cache
def small_model() -> DensModel:
    raw = json.loads((CASE / "input.json").read_text())["model"]
    raw["descriptor"].update(channels=8, n_radial=4, precision="float64", seed=3)
    raw["fitting_net"].update(precision="float64")
    model = build_model(normalize_model(raw), dens=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def predict(coord, force=None, mask=None) -> dict[str, np.ndarray]:
    atype = np.array([[0, 1, 1] * 4])
    g = build_graph(coord[None], None, atype, small_model().rcut)
    if force is not None:
        g.force_input, g.noise_mask = torch.tensor(force[None]), torch.tensor(mask[None])
    with torch.no_grad():
        return {k: v[0].numpy() for k, v in small_model()(g).items()}


def rotation(axis, angle: float) -> np.ndarray:
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def test_vector_heads_read_the_latent_in_a_flipped_frame() -> None:
    """DeePMD-kit's heads decode the l=1 rows as (-y, z, -x) while the backbone's basis is
    (-y, -z, x): the direct force is ``R u`` of an equivariant ``u``, ``R = diag(-1, 1, -1)``,
    so ``F(Q r) = R Q R F(r)``; with corrupted atoms the force embedding (same convention)
    keeps rotations about y (which commute with R) exact. Reproduced, not corrected."""
    rng = np.random.default_rng(0)
    coord = rng.uniform(0, 6, (12, 3))
    flip = np.diag([-1.0, 1.0, -1.0])
    q = rotation([0.3, -0.5, 0.8], 1.1)
    a, b = predict(coord), predict(coord @ q.T)
    assert abs(a["energy"] - b["energy"]) < 1e-10
    assert np.abs(b["force"] - a["force"] @ (flip @ q @ flip).T).max() < 1e-10
    assert np.abs(b["force"] - a["force"] @ q.T).max() > 1e-2
    force, mask = rng.normal(size=(12, 3)), rng.random(12) < 0.5
    qy = rotation([0, 1, 0], 0.7)
    a, b = predict(coord, force, mask), predict(coord @ qy.T, force @ qy.T, mask)
    assert abs(a["energy"] - b["energy"]) < 1e-10
    for key in NORM_KEYS:
        assert np.abs(b[key] - a[key] @ qy.T).max() < 1e-10
    assert np.abs(a["denoising_force_norm"] - a["clean_force_norm"])[mask].min() > 0
    assert np.array_equal(a["force_norm"][~mask], a["clean_force_norm"][~mask])


def test_clean_atoms_ignore_the_force_input() -> None:
    rng = np.random.default_rng(1)
    coord = rng.uniform(0, 6, (12, 3))
    none = np.zeros(12, dtype=bool)
    a, b = predict(coord), predict(coord, rng.normal(size=(12, 3)), none)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "change, match",
    [({"lmax": 0, "mmax": 0, "kmax": 0}, "lmax >= 1"), ({"bridging": True}, "bridging")],
)
def test_unsupported_models_are_refused(change: dict, match: str) -> None:
    raw = json.loads((CASE / "input.json").read_text())["model"]
    if change.pop("bridging", False):
        raw["bridging_method"] = "ZBL"
    raw["descriptor"].update(change, so3_readout="none", grid_branch=0)
    with pytest.raises(ValueError, match=match):
        build_model(normalize_model(raw), dens=True)


# --- training ---------------------------------------------------------------------------------
def test_short_dens_training_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = json.loads((CASE / "input.json").read_text())
    config["model"]["descriptor"].update(channels=8, n_radial=4, mixing_layers=1)
    tr = config["training"]
    tr["training_data"]["systems"] = [str(WATER / "data_0")]
    tr["validation_data"]["systems"] = [str(WATER / "data_1")]
    tr.update(numb_steps=4, disp_freq=1, save_freq=2, seed=1, stat_file="stat.hdf5")
    (tmp_path / "input.json").write_text(json.dumps(config))
    main(["train", "input.json", "--skip-neighbor-stat"])
    curve = (tmp_path / "lcurve.out").read_text().splitlines()
    assert curve[0].split()[1:] == reference()[2]["lcurve_columns"]
    # the corruption draws from the saved random state: a restart continues exactly
    main(["train", "input.json", "--skip-neighbor-stat", "--restart", "model.ckpt-2.pt"])
    assert (tmp_path / "lcurve.out").read_text().splitlines() == curve
    raw = torch.load(tmp_path / "model.ckpt.pt", weights_only=True)["model"]
    prefix = "model.Default.atomic_model."
    assert any(k.startswith(prefix + "dens_fitting_net.direct_force_head") for k in raw)
    system = System(WATER / "data_0", ["O", "H"])
    rmsd = force_rmsd([system.frames(np.arange(system.nframes), ["force"])])
    assert float(raw[prefix + "dens_force_rmsd"]) == pytest.approx(rmsd)
    dp = sezm.DeepPot(tmp_path / "model.ckpt.pt")
    coord = np.load(WATER / "data_0" / "set.000" / "coord.npy")[:1]
    box = np.load(WATER / "data_0" / "set.000" / "box.npy")[:1]
    e, f, v = dp.eval(coord, box, system.atom_type)
    assert isinstance(dp.model, DensModel) and np.isfinite(f).all() and np.isnan(v).all()
    e_ref = np.load(WATER / "data_0" / "set.000" / "energy.npy")[0]
    assert abs(e.item() - e_ref) / 192 < 1.0  # the energy bias came from the data


def test_freeze_refuses_dens_models(tmp_path):
    from sezm.infer.freeze import FreezeError, freeze

    with pytest.raises(FreezeError, match="dens"):
        freeze(CASE / "model.pt", tmp_path / "frozen")
    assert not list(tmp_path.iterdir())
