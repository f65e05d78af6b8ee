"""Same step: sezm's training step reproduces DeePMD-kit 3.2's on fixed batches.

``data/train_steps/steps.npz`` (``module_fixtures/make_train_steps.py``) holds, for the ``ener``
loss in ``mse`` and ``mae`` (with ``f_use_norm``, virial and atomic-energy terms), the
``property``, ``dens`` and ``ener_spin`` losses (native and deepspin models) and for Adam,
AdamW and HybridMuon in each of its modes, three steps of DeePMD-kit's trainer from one
initial state: the learning rate, loss and metrics of every step, the first step's clipped
gradients, the weights after the last step, and the EMA weights. sezm's own trainer runs the
same frames from the same state. The ``dens`` corruption (which batches denoise, which atoms,
the noise) is drawn from the global torch generator in DeePMD-kit's order, shapes and dtypes:
seeded the same before each step, sezm corrupts the same atoms by the same noise.

Tolerances. Loss, metrics and gradients: float32 rounding of the same model (relative 2e-5).
Weights: Adam and AdamW updates are float32 arithmetic: relative 1e-5 of the weight, or 1e-3
of the update (Adam's normalised step turns gradient rounding into ~1e-4 of the update, which
is the whole weight of a zero-initialised layer).
HybridMuon orthogonalises the momentum, and for a nearly rank-deficient momentum (the
gradient of a zero-initialised or narrow layer) Newton-Schulz lifts directions that are
float32 noise in the gradient to unit singular values: two implementations whose gradients
agree to 1e-6 can then differ by ten per cent in such a matrix's update. The worst are the
matrices behind a zero-initialised layer, whose first gradient is exactly zero and whose later
ones are tiny and of low rank. So in HybridMuon runs the weights after three steps are held
to a quarter of their update, those behind zero-initialised layers only to the size of their
update (which still catches a wrong scale, sign, rate or decay), and the losses after the
first step to 1e-3; the optimizer alone, fed the
same full-rank gradients, is held to its rounding in ``test_hybrid_muon_matches_deepmd_on_the_
same_gradients`` (measured: bitwise without the Gram iteration, 1.5e-3 with it, where
DeePMD-kit runs the float16 Gram iteration through ``torch.compile``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.compat.deepmd import from_deepmd_state
from sezm.config.normalize import normalize_input
from sezm.model import forces
from sezm.train.ema import EMA
from sezm.train.muon import HybridMuon
from sezm.train.optim import set_lr
from sezm.train.trainer import Resume, Trainer

HERE = Path(__file__).parents[1] / "data" / "train_steps"
STEPS = np.load(HERE / "steps.npz")
CASES = sorted({k.split("/")[0] for k in STEPS.files if k.endswith("/config")})
N_STEPS = 3


def upstream(key: str) -> torch.Tensor:
    return torch.as_tensor(STEPS[key])


def deepmd_arrays(prefix: str) -> dict[str, torch.Tensor]:
    """``<prefix>/<DeePMD-kit key>`` arrays -> sezm names."""
    n = len(prefix) + 1
    return from_deepmd_state(
        {k[n:]: upstream(k) for k in STEPS.files if k.startswith(prefix + "/")}
    )


def init_prefix(case: str) -> str:
    """Where the case's initial state is: a group shared with other cases of its model, its
    own, or the base model's."""
    if f"{case}/init_of" in STEPS.files:
        return str(STEPS[f"{case}/init_of"])
    return f"{case}/init" if any(k.startswith(f"{case}/init/") for k in STEPS.files) else "init"


def run_case(case: str, workdir: Path, monkeypatch) -> dict:
    """sezm's trainer over the recorded frames from DeePMD-kit's initial state."""
    config = json.loads(str(STEPS[f"{case}/config"]))
    data = config["training"]["training_data"]
    data["systems"] = [str((HERE / path).resolve()) for path in data["systems"]]
    monkeypatch.chdir(workdir)
    trainer = Trainer(normalize_input(config), Resume(skip_neighbor_stat=True))
    task = trainer.tasks["Default"]
    task.model.load_state_dict(deepmd_arrays(init_prefix(case)), strict=False)
    if trainer.setup.ema is not None:  # shadow of the loaded state
        trainer.setup.ema = EMA(trainer.setup.ema_models, trainer.setup.ema.decay)
    frames = iter(int(STEPS[f"{case}/{s}/frame"]) for s in range(N_STEPS))
    monkeypatch.setattr(
        task.train_data,
        "next_batch",
        lambda rcut, device: task.train_data.batch(0, [next(frames)], rcut, device),
    )
    out = {"steps": [], "noise_masks": []}
    if hasattr(task.loss, "corrupt"):  # dens: record the corrupted atoms of every step
        corrupt = task.loss.corrupt

        def recorded(*args, **kwargs):
            batch = corrupt(*args, **kwargs)
            out["noise_masks"].append(batch.noise_mask.detach().clone())
            return batch

        monkeypatch.setattr(task.loss, "corrupt", recorded)
    for step in range(N_STEPS):
        lr = trainer.setup.lr.value(step)
        set_lr(trainer.setup.optimizer, lr)
        if f"{case}/{step}/torch_seed" in STEPS.files:  # DeePMD-kit's RNG state of the step
            torch.manual_seed(int(STEPS[f"{case}/{step}/torch_seed"]))
        _, loss, metrics, _ = trainer.steps.train_step(step, lr, False)
        out["steps"].append((lr, float(loss), metrics))
        if step == 0:
            out["grad"] = {
                n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None
            }
    out["param"] = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    out["ema"] = None if trainer.setup.ema is None else dict(trainer.setup.ema.shadow)
    out["muon"] = isinstance(trainer.setup.optimizer, HybridMuon)
    return out


@pytest.mark.parametrize("case", CASES)
def test_training_steps_match_deepmd(case, tmp_path, monkeypatch) -> None:
    got = run_case(case, tmp_path, monkeypatch)
    for step, (lr, loss, metrics) in enumerate(got["steps"]):
        p = f"{case}/{step}"
        if f"{p}/noise_mask" in STEPS.files:  # the same corruption from the same RNG state
            mask = got["noise_masks"][step].reshape(-1).numpy()
            want = np.unpackbits(STEPS[f"{p}/noise_mask"], count=mask.size).astype(bool)
            assert np.array_equal(mask, want), f"step {step}: corrupted atoms differ"
        assert lr == pytest.approx(float(STEPS[f"{p}/lr"]), rel=1e-12), f"step {step} lr"
        rel = 1e-3 if got["muon"] and step > 0 else 2e-5
        assert loss == pytest.approx(float(STEPS[f"{p}/loss"]), rel=rel), f"step {step} loss"
        for name in [k.rsplit("/", 1)[1] for k in STEPS.files if k.startswith(f"{p}/metric/")]:
            want = float(STEPS[f"{p}/metric/{name}"])
            assert metrics[name] == pytest.approx(want, rel=rel, abs=1e-9), f"step {step} {name}"
    grads = deepmd_arrays(f"{case}/grad")
    for name, want in grads.items():
        scale = want.abs().max().item()
        err = (got["grad"][name] - want).abs().max().item()
        assert err <= 2e-5 * scale + 1e-9, f"gradient {name}: {err:.2e} of {scale:.2e}"
    init = deepmd_arrays(init_prefix(case))
    # same state and frame in every case of the base model
    first_grad = grads or deepmd_arrays("adam_mse/grad")
    for name, want in deepmd_arrays(f"{case}/param").items():
        update = (want.double() - init[name].double()).abs().max().item()
        err = (got["param"][name].double() - want.double()).abs().max().item()
        grad = first_grad.get(name)  # none: a parameter outside the loss (dens' fitting_net)
        # Muon's bfloat16 Newton-Schulz step rounds by the CPU's vector kernels: measured 0.27x
        # the update (AVX2 kernels on an Intel CPU) and, for a weight whose first gradient is
        # zero, 1.08x (AVX-512)
        share = (0.35 if grad is not None and grad.any() else 1.5) if got["muon"] else 1e-3
        bound = share * update + 1e-5 * want.abs().max().item() + 1e-9
        assert err <= bound, f"weight {name}: {err:.2e} (update {update:.2e})"
    if got["ema"] is not None:
        for name, want in deepmd_arrays(f"{case}/ema").items():
            err = (got["ema"][name].double() - want.double()).abs().max().item()
            assert err <= (want.double() - init[name].double()).abs().max().item() + 1e-6


OPTIMIZER = np.load(HERE / "optimizer.npz")
MODES = sorted({k.split("/")[0] for k in OPTIMIZER.files if k.endswith("/config")})


@pytest.mark.parametrize("mode", MODES)
def test_hybrid_muon_matches_deepmd_on_the_same_gradients(mode: str) -> None:
    """Three HybridMuon steps on the model's parameters fed the same full-rank gradients:
    Adam-routed tensors to float32 rounding, Muon-routed matrices to the rounding of the
    bfloat16 / float16 iteration (relative 1e-2 of their update)."""
    kwargs = json.loads(str(OPTIMIZER[f"{mode}/config"]))
    init = {k[len("init/") :]: upstream(k) for k in STEPS.files if k.startswith("init/")}
    names = sorted({k.split("/", 2)[2] for k in OPTIMIZER.files if k.startswith("grad/0/")})
    params = {n: torch.nn.Parameter(init[n].clone()) for n in names}
    opt = HybridMuon(list(params.items()), **kwargs)
    for step, lr in enumerate(OPTIMIZER["lr"]):
        set_lr(opt, float(lr))
        for n, p in params.items():
            p.grad = torch.as_tensor(OPTIMIZER[f"grad/{step}/{n}"]).clone()
        opt.step()
    for n, p in params.items():
        if not p.numel():
            continue
        want = torch.as_tensor(OPTIMIZER[f"{mode}/final/{n}"]).double()
        update = (want - init[n].double()).abs().max().item()
        err = (p.detach().double() - want).abs().max().item()
        muon = opt.routes[p].kind == "muon"
        bound = (1e-2 * update if muon else 1e-6 * update) + 1e-7 * want.abs().max().item()
        assert err <= bound, (
            f"{mode}: {n} ({opt.routes[p].kind}) differs by {err:.2e}, update {update:.2e}"
        )


@pytest.mark.parametrize("case", ["adam_mse", "spin_native_adam"])
def test_the_backward_pass_differentiates_only_the_weights(case, tmp_path, monkeypatch) -> None:
    """The edge vectors (and spins) take a gradient for the forces, not for the optimizer: the
    step's backward pass leaves them without one, and the weights still get theirs."""
    leaves = []

    def recording(energy, of, create_graph=False):
        leaves.extend(of)
        return real(energy, of, create_graph)

    real = forces.energy_gradients
    monkeypatch.setattr(forces, "energy_gradients", recording)
    got = run_case(case, tmp_path, monkeypatch)
    assert len(leaves) == N_STEPS * (2 if case.startswith("spin") else 1)
    assert all(leaf.requires_grad and leaf.grad is None for leaf in leaves)
    assert got["grad"] and all(g.isfinite().all() for g in got["grad"].values())
