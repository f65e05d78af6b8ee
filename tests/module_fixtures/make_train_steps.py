"""Same step: DeePMD-kit's training steps on fixed batches, for the loss and optimizer options.

Run with the oracle venv (DeePMD-kit 3.2): ``/tmp/oracle/bin/python <this file>``. Writes
``tests/data/train_steps/``:

* ``system/``: water ``data_0`` of the test systems (4 frames, 192 atoms) with virial and
  atomic-energy labels added (a fixed random draw), so that every ``ener`` term is active; the
  spin cases train on ``tests/data/spin/NiO`` (3 frames, 16 Ni + 16 O, spins and magnetic
  forces), the property case on ``tests/data/systems/property/data_0``;
* ``steps.npz``: per case ``<case>/config`` (the full input, JSON, with the system path
  relative to this folder), ``init/<key>`` (DeePMD-kit's initial state, the same for every case of
  the base model: the weights are the seeded ones, ``out_bias``/``out_std`` come from the data
  statistics; a case with its own model has ``<case>/init/<key>``, or names in
  ``<case>/init_of`` the group it shares with the other cases of its model: ``dens/init``),
  per step ``s`` of ``STEPS`` ``<case>/<s>/frame`` (the frame trained on), ``/lr``, ``/loss``,
  ``/metric/<name>``; ``<case>/grad/<param>`` the first step's gradients after clipping, as
  the optimizer sees them (cases in ``GRAD_CASES``, one per loss and clipping setting);
  ``<case>/param/<param>`` the weights after the last step; ``<case>/ema/<param>`` the EMA
  weights at the end; for the ``dens`` cases also ``<case>/<s>/torch_seed``, the seed of the
  global torch generator set before the step's forward pass (the corruption is drawn from it;
  the seeds are chosen so that the steps are denoising, clean, denoising batches), and
  ``<case>/<s>/noise_mask``, the corrupted atoms (``np.packbits`` of the ``(nloc,)`` mask);
* ``optimizer.npz``: DeePMD-kit's ``HybridMuonOptimizer`` alone, per mode in ``MUON_MODES``,
  on the model's parameters (names, shapes and initial values of ``init/``) fed the same
  full-rank random gradients ``grad/<s>/<param>`` for ``STEPS`` steps at learning rates ``lr``:
  ``<mode>/config`` (JSON keyword arguments) and ``<mode>/final/<param>`` the weights after
  the last step. Without the model in the loop, differences can only come from the optimizer.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from deepmd.pt.entrypoints.main import get_trainer
from deepmd.utils.argcheck import normalize
from torch.nn.utils import clip_grad_norm_

TESTS = Path(__file__).resolve().parents[1]
OUT = TESTS / "data" / "train_steps"
STEPS = 3
GRAD_CASES = (
    "adam_mse", "muon_mae_norm", "muon_mse_atom_ener", "muon_no_wd_no_clip", "property_adam",
    "dens_adam_mae", "dens_muon_mse_all", "spin_native_adam", "spin_deepspin_adam_mae",
)  # fmt: skip
# dens cases: per step, denoising batch (True) or clean batch (False); the generator seeds the
# global torch RNG before each step so that the corruption draws give this pattern
DENS_PATTERN = (True, False, True)

MODEL = {
    "type": "dpa4",
    "type_map": ["O", "H"],
    "descriptor": {
        "rcut": 4.0,
        "channels": 8,
        "n_radial": 4,
        "edge_norm": False,
        "lmax": 1,
        "mmax": 1,
        "n_blocks": 1,
        "mixing_layers": 2,
        "radial_so2_mode": "none",
        "ffn_so3_grid": False,
        "so3_readout": "none",
        "use_amp": False,
        "precision": "float32",
        "seed": 7,
    },
    "fitting_net": {"neuron": [0], "precision": "float32", "seed": 7},
}
LOSS_MSE = {
    "type": "ener",
    "start_pref_e": 0.2,
    "limit_pref_e": 1.0,
    "start_pref_f": 100.0,
    "limit_pref_f": 1.0,
    "start_pref_v": 0.5,
    "limit_pref_v": 0.1,
}
LOSS_MAE = {
    "type": "ener",
    "loss_func": "mae",
    "f_use_norm": True,
    "start_pref_e": 20,
    "limit_pref_e": 20,
    "start_pref_f": 20,
    "limit_pref_f": 20,
    "start_pref_v": 5,
    "limit_pref_v": 5,
}
MUON = {"type": "HybridMuon", "weight_decay": 0.001}
PROPERTY_MODEL = {
    "type": "dpa4",
    "type_map": ["H", "C", "N", "O"],
    "descriptor": {**MODEL["descriptor"], "n_focus": 2, "message_node_so3": True},
    "fitting_net": {
        "type": "property", "property_name": "band_prop", "task_dim": 3, "intensive": True,
        "neuron": [0], "precision": "float32", "seed": 7,
    },
}  # fmt: skip
DENS_MODEL = {
    **MODEL, "descriptor": {**MODEL["descriptor"], "sel": 30},  # the dens path caps at sum(sel)
}  # fmt: skip
LOSS_DENS = {
    "type": "dens", "loss_func": "mae", "start_pref_e": 20, "limit_pref_e": 10,
    "start_pref_f": 20, "limit_pref_f": 5, "dens_prob": 0.5, "dens_std": 0.025,
    "dens_corrupt_ratio": 0.5, "dens_denoising_pos_coefficient": 10.0,
}  # fmt: skip
SPIN_DESCRIPTOR = {**MODEL["descriptor"], "rcut": 4.5, "n_atten_head": 1}
SPIN_MODELS = {
    scheme: {
        "type": "dpa4", "type_map": ["Ni", "O"],
        "descriptor": {**SPIN_DESCRIPTOR, "sel": sel},
        "fitting_net": {"neuron": [0], "precision": "float32", "seed": 7},
        "spin": {"use_spin": [True, False], "scheme": scheme, **extra},
    }
    for scheme, sel, extra in (("native", 60, {}), ("deepspin", 16, {"virtual_scale": [0.314]}))
}  # fmt: skip
LOSS_SPIN = {
    "type": "ener_spin", "start_pref_e": 0.02, "limit_pref_e": 1.0, "start_pref_fr": 1000,
    "limit_pref_fr": 1.0, "start_pref_fm": 1000, "limit_pref_fm": 10.0,
}  # fmt: skip
SPIN_SYSTEMS = ["../spin/NiO"]
CASES = {
    "adam_mse": {"optimizer": {"type": "Adam"}, "loss": LOSS_MSE},
    "adamw_mse": {"optimizer": {"type": "AdamW", "weight_decay": 0.01}, "loss": LOSS_MSE},
    "muon_mae_norm": {"optimizer": MUON, "loss": LOSS_MAE},
    "muon_mse_atom_ener": {
        "optimizer": MUON,
        "loss": {**LOSS_MSE, "start_pref_ae": 1.0, "limit_pref_ae": 0.5},
    },
    "muon_2d": {"optimizer": {**MUON, "muon_mode": "2d"}, "loss": LOSS_MSE},
    "muon_flat": {"optimizer": {**MUON, "muon_mode": "flat"}, "loss": LOSS_MSE},
    "muon_no_gram": {"optimizer": {**MUON, "enable_gram": False}, "loss": LOSS_MSE},
    "muon_no_magma": {"optimizer": {**MUON, "magma_muon": False}, "loss": LOSS_MSE},
    "muon_lr_adjust": {"optimizer": {**MUON, "lr_adjust": 10.0}, "loss": LOSS_MSE},
    "muon_no_wd_no_clip": {
        "optimizer": {**MUON, "weight_decay": 0.0}, "loss": LOSS_MSE, "clip": 0.0,
    },
    "property_adam": {
        "model": PROPERTY_MODEL, "optimizer": {"type": "Adam"},
        "loss": {"type": "property", "metric": ["mae", "rmse"], "loss_func": "smooth_mae", "beta": 1.0},
        "systems": ["../systems/property/data_0"],
    },
    "dens_adam_mae": {
        "model": DENS_MODEL, "init": "dens", "optimizer": {"type": "Adam"}, "loss": LOSS_DENS,
    },
    "dens_muon_mse_all": {
        "model": DENS_MODEL, "init": "dens", "optimizer": MUON,
        "loss": {**LOSS_DENS, "loss_func": "mse", "dens_corrupt_ratio": None},
    },
    "spin_native_adam": {
        "model": SPIN_MODELS["native"], "optimizer": {"type": "Adam"}, "loss": LOSS_SPIN,
        "systems": SPIN_SYSTEMS,
    },
    "spin_deepspin_adam_mae": {
        "model": SPIN_MODELS["deepspin"], "optimizer": {"type": "Adam"},
        "loss": {**LOSS_SPIN, "loss_func": "mae"}, "systems": SPIN_SYSTEMS,
    },
    "muon_ema_wsd": {
        "optimizer": MUON, "loss": LOSS_MAE, "ema": True,
        "learning_rate": {
            "type": "wsd", "start_lr": 1e-3, "stop_lr": 1e-5, "warmup_ratio": 0.34,
            "warmup_start_factor": 0.2, "decay_phase_ratio": 0.34, "decay_type": "cosine",
        },
    },
}  # fmt: skip


MUON_MODES = {
    "default": {},
    "mode_2d": {"muon_mode": "2d"},
    "mode_flat": {"muon_mode": "flat"},
    "no_gram": {"enable_gram": False},
    "no_magma": {"magma_muon": False},
    "lr_adjust": {"lr_adjust": 10.0},
    "no_wd": {"weight_decay": 0.0},
}


def optimizer_only(init: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from deepmd.pt.optimizer import HybridMuonOptimizer

    names = [k for k in init if not k.endswith(("out_bias", "out_std"))]
    gen = torch.Generator().manual_seed(5)

    def draw(n: str) -> torch.Tensor:
        value = torch.randn(init[n].shape, generator=gen, dtype=torch.float64) * 1e-2
        return value.to(torch.as_tensor(init[n]).dtype)

    grads = [{n: draw(n) for n in names} for _ in range(STEPS)]
    lrs = [1e-3, 5e-4, 2e-4]
    out = {"lr": np.array(lrs)}
    for s, g in enumerate(grads):
        out.update({f"grad/{s}/{n}": v.numpy() for n, v in g.items()})
    for mode, extra in MUON_MODES.items():
        kwargs = {"lr": lrs[0], "weight_decay": 0.001, **extra}
        params = {n: torch.nn.Parameter(torch.as_tensor(init[n]).clone()) for n in names}
        opt = HybridMuonOptimizer(
            list(params.values()), named_parameters=list(params.items()), flash_muon=False, **kwargs
        )
        out[f"{mode}/config"] = np.array(json.dumps(kwargs))
        for s in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = lrs[s]
            for n, p in params.items():
                p.grad = grads[s][n].clone()
            opt.step()
        out.update({f"{mode}/final/{n}": p.detach().numpy().copy() for n, p in params.items()})
    return out


def make_system() -> Path:
    system = OUT / "system"
    if system.exists():
        shutil.rmtree(system)
    shutil.copytree(TESTS / "data" / "systems" / "water" / "data_0", system)
    gen = np.random.default_rng(11)
    frames = np.load(system / "set.000" / "energy.npy").shape[0]
    np.save(system / "set.000" / "virial.npy", gen.normal(0.0, 2.0, (frames, 9)))
    atom_e = np.load(system / "set.000" / "energy.npy")[:, None] / 192 + gen.normal(
        0, 0.05, (frames, 192)
    )
    np.save(system / "set.000" / "atom_ener.npy", atom_e)
    return system


def config_of(case: dict) -> dict:
    lr = case.get(
        "learning_rate", {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 1}
    )
    return {
        "model": copy.deepcopy(case.get("model", MODEL)),
        "learning_rate": lr,
        "loss": case["loss"],
        "optimizer": case["optimizer"],
        "training": {
            "training_data": {"systems": case.get("systems", ["system"]), "batch_size": 1},
            "numb_steps": STEPS, "seed": 1, "disp_freq": 100, "save_freq": 100,
            "gradient_max_norm": case.get("clip", 5.0), "enable_ema": bool(case.get("ema")),
            "ema_decay": 0.9,
        },
    }  # fmt: skip


def dens_seeds(prob: float) -> list[int]:
    """Global torch seeds, one per step, whose first uniform gives ``DENS_PATTERN`` (the
    dens loss draws its denoising-batch uniform first)."""

    def denoising(seed: int) -> bool:
        gen = torch.Generator().manual_seed(seed)
        return bool(torch.rand((), dtype=torch.float64, generator=gen) < prob)

    seeds, seed = [], 0
    for want in DENS_PATTERN:
        while denoising(seed) != want:
            seed += 1
        seeds.append(seed)
        seed += 1
    return seeds


def capture_noise_mask(trainer, masks: list) -> None:
    """Record the corrupted-atom mask of each dens forward pass."""
    loss = trainer.loss
    prepare = loss._prepare_dens_inputs

    def prepared(*args, **kwargs):
        result = prepare(*args, **kwargs)
        masks.append(result[3].detach().numpy().copy())  # (nf, nloc) bool
        return result

    loss._prepare_dens_inputs = prepared


def init_group(name: str, case: dict) -> str:
    """Where a case's initial state is stored: the base model's start is shared (``init``),
    a case with its own model has ``<case>/init`` or the group named by its ``init`` key."""
    if "model" not in case:
        return "init"
    return f"{case.get('init', name)}/init"


def record(name: str, case: dict) -> dict[str, np.ndarray]:
    config = config_of(case)
    trainer = get_trainer(normalize(copy.deepcopy(config)))
    wrapper, out = trainer.wrapper, {}
    out[f"{name}/config"] = np.array(json.dumps(config))
    init = init_group(name, case)
    if init != f"{name}/init" and init != "init":
        out[f"{name}/init_of"] = np.array(init)
    dens = case["loss"]["type"] == "dens"
    seeds = dens_seeds(case["loss"]["dens_prob"]) if dens else []
    masks: list[np.ndarray] = []
    if dens:
        capture_noise_mask(trainer, masks)
    for key, value in wrapper.state_dict().items():
        if torch.is_tensor(value) and value.dtype.is_floating_point:
            out[f"{init}/{key}"] = value.detach().numpy().copy()
    for step in range(STEPS):
        lr = trainer.scheduler.get_last_lr()[0]
        trainer.optimizer.zero_grad(set_to_none=True)
        inputs, labels, log = trainer._next_training_batch("Default")
        if dens:  # the corruption draws come from the global RNG: a known state per step
            torch.manual_seed(seeds[step])
        _, loss, more = wrapper(**inputs, cur_lr=lr, label=labels, task_key="Default")
        loss.backward()
        if trainer.gradient_max_norm > 0:
            clip_grad_norm_(wrapper.parameters(), trainer.gradient_max_norm)
        trainer.optimizer.step()
        trainer.scheduler.step()
        if trainer.model_ema is not None:
            trainer.model_ema.update(trainer.model)
        p = f"{name}/{step}"
        out[f"{p}/frame"] = np.array(int(np.asarray(log["fid"]).reshape(-1)[0]))
        out[f"{p}/lr"], out[f"{p}/loss"] = np.array(lr), np.array(loss.item())
        if dens:
            out[f"{p}/torch_seed"] = np.array(seeds[step])
            out[f"{p}/noise_mask"] = np.packbits(masks[-1].reshape(-1))
            assert bool(masks[-1].any()) == DENS_PATTERN[step], (name, step)
        for k, v in more.items():
            out[f"{p}/metric/{k}"] = np.array(float(v))
        for k, prm in wrapper.named_parameters():
            if step == 0 and name in GRAD_CASES and prm.grad is not None:
                out[f"{name}/grad/{k}"] = prm.grad.detach().numpy().copy()
            if step == STEPS - 1:
                out[f"{name}/param/{k}"] = prm.detach().numpy().copy()
        print(name, step, lr, float(loss), flush=True)
    if trainer.model_ema is not None:
        for k, v in trainer.model_ema.shadow_params.items():
            out[f"{name}/ema/{k}"] = v.detach().numpy().copy()
    return out


def main() -> None:
    make_system()
    os.chdir(OUT)
    arrays: dict[str, np.ndarray] = {}
    for name, case in CASES.items():
        out = record(name, case)
        group = init_group(name, case) + "/"
        for key in [k for k in out if k.startswith(group)]:
            value = out.pop(key)
            assert key not in arrays or np.array_equal(arrays[key], value), key
            arrays[key] = value
        arrays.update(out)
    np.savez_compressed(OUT / "steps.npz", **arrays)
    init = {k[len("init/") :]: v for k, v in arrays.items() if k.startswith("init/")}
    np.savez_compressed(OUT / "optimizer.npz", **optimizer_only(init))
    print(f"wrote {OUT / 'steps.npz'} ({(OUT / 'steps.npz').stat().st_size // 1024} kB)")


if __name__ == "__main__":
    main()
