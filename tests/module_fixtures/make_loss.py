"""Reference data for the training losses (``ener``, ``property``, ``dens``).

Run with the DeePMD-kit venv: ``/tmp/oracle/bin/python tests/module_fixtures/make_loss.py``.
Writes ``tests/data/modules/loss_{ener,property,dens}.npz``, float64 throughout. Per case:

* ``"<case>/config"``: JSON with the loss ``section`` (the normalized ``loss`` input), ``lr0``,
  ``lr``, ``natoms``, ``masked`` (whether the batch carries a real-atom mask), ``find`` and, for
  ``property``, ``task_dim``/``var_name``/``intensive``; for ``dens`` ``seed``/``training``.
* ``"<case>/pred/<key>"``, ``"<case>/label/<key>"`` in sezm's layout (energy ``(nf,)``, atomic
  energies ``(nf, nloc)``, ``atom_pref (nf, nloc)``), ``"<case>/in/<key>"`` for extra inputs
  (``mask``, ``out_bias``, ``out_std``, dens statistics and clean coordinates).
* ``"<case>/out/loss"``, ``"<case>/metric/<name>"`` (NaN where upstream shows NaN),
  ``"<case>/grad/<key>"`` (d loss / d pred, only for predictions the loss depends on); for
  ``dens`` also ``"<case>/out/coord"`` and ``"<case>/out/noise_mask"`` (the corrupted model input).

The predictions are handed to the upstream loss through a stand-in model that returns them; the
upstream layouts (energy ``(nf, 1)``, ``atom_pref`` repeated three times per atom) are produced
here from the stored arrays.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from deepmd.pt.loss.dens import DeNSLoss
from deepmd.pt.loss.ener import EnergyStdLoss
from deepmd.pt.loss.property import PropertyLoss

OUT = Path(__file__).resolve().parents[1] / "data" / "modules"
F64 = torch.float64
NF, NLOC = 3, 6
ATYPE = [[0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 0, 1], [0, 0, 1, 1, 0, 1]]
# a mixed-size batch: frames with 6, 4 and 3 real atoms, phantoms (type -1) at the end
ATYPE_PHANTOM = [[0, 1, 0, 1, 1, 0], [1, 0, 0, 1, -1, -1], [0, 1, 1, -1, -1, -1]]

ENER_DEFAULTS = {
    "type": "ener",
    **{f"start_pref_{k}": 0.0 for k in ("e", "f", "v", "h", "ae", "pf", "gf")},
    **{f"limit_pref_{k}": 0.0 for k in ("e", "f", "v", "h", "ae", "pf", "gf")},
    "use_default_pf": False,
    "enable_atom_ener_coeff": False,
    "numb_generalized_coord": 0,
    "use_huber": False,
    "loss_func": "mse",
    "f_use_norm": False,
    "huber_delta": 0.01,
    "intensive_ener_virial": False,
}
EF = dict(start_pref_e=0.02, limit_pref_e=1.0, start_pref_f=1000.0, limit_pref_f=1.0)
ALL = dict(
    EF,
    start_pref_v=0.5,
    limit_pref_v=2.0,
    start_pref_ae=3.0,
    limit_pref_ae=0.1,
    start_pref_pf=7.0,
    limit_pref_pf=0.4,
)
V = dict(start_pref_v=0.5, limit_pref_v=2.0)
AE = dict(start_pref_ae=3.0, limit_pref_ae=0.1)
FOUND = {k: True for k in ("energy", "force", "virial", "atom_ener", "atom_pref", "drdq")}

# name: (section overrides, lr / lr0, phantom atoms, mask given, find overrides)
ENER_CASES = {
    "default_start": (EF, 1.0, False, True, {}),
    "default_nomask": (EF, 0.37, False, False, {}),
    "mse_all_lr": (ALL, 0.3, False, True, {}),
    "mse_all_phantom": (ALL, 0.05, True, True, {}),
    "mse_all_scaled_lr": (ALL, 2.0, False, False, {}),
    "mae_all": (dict(ALL, loss_func="mae"), 0.5, False, True, {}),
    "mae_all_phantom": (dict(ALL, loss_func="mae"), 0.2, True, True, {}),
    "mae_norm": (dict(EF, **V, loss_func="mae", f_use_norm=True), 0.1, True, True, {}),
    "mae_norm_nomask": (dict(EF, loss_func="mae", f_use_norm=True), 0.7, False, False, {}),
    "relative_f": (dict(ALL, relative_f=0.5), 0.4, True, True, {}),
    "relative_f_mae": (dict(ALL, relative_f=1.5, loss_func="mae"), 0.4, False, True, {}),
    "huber": (dict(EF, **V, **AE, use_huber=True, huber_delta=0.3), 0.6, True, True, {}),
    "huber_norm": (
        dict(EF, **V, **AE, use_huber=True, f_use_norm=True, huber_delta=[0.05, 0.4, 0.2]),
        0.25,
        False,
        True,
        {},
    ),
    "intensive": (dict(EF, **V, intensive_ener_virial=True), 0.8, True, True, {}),
    "intensive_mae": (
        dict(EF, **V, intensive_ener_virial=True, loss_func="mae"),
        0.8,
        False,
        True,
        {},
    ),
    "atom_ener_coeff": (dict(EF, enable_atom_ener_coeff=True), 0.5, True, True, {}),
    "missing_labels": (ALL, 0.3, False, True, {"virial": False, "atom_pref": False}),
    "missing_force": (ALL, 0.3, True, True, {"force": False}),
    "missing_mae": (
        dict(ALL, loss_func="mae"),
        0.3,
        False,
        True,
        {"energy": False, "atom_ener": False},
    ),
    "default_pf": (dict(ALL, use_default_pf=True), 0.3, False, True, {"atom_pref": False}),
    "gen_force": (
        dict(EF, start_pref_gf=2.0, limit_pref_gf=5.0, numb_generalized_coord=2),
        0.45,
        True,
        True,
        {},
    ),
    "gen_force_nomask": (
        dict(EF, start_pref_gf=2.0, limit_pref_gf=5.0, numb_generalized_coord=3),
        0.45,
        False,
        False,
        {},
    ),
    # a term needs both prefactors non-zero: virial (limit 0) and atomic energy (start 0) are off
    "half_zero_prefs": (dict(EF, start_pref_v=1.0, limit_pref_ae=1.0), 0.5, False, True, {}),
    "only_pf": (dict(start_pref_pf=1.0, limit_pref_pf=2.0), 0.5, False, True, {}),
}


def rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=gen, dtype=F64)


def np_dict(prefix: str, tensors: dict) -> dict:
    return {
        f"{prefix}/{k}": np.asarray(v.detach().cpu().numpy() if torch.is_tensor(v) else v)
        for k, v in tensors.items()
    }


class StandIn(torch.nn.Module):
    """Returns fixed predictions; records the inputs the loss feeds it."""

    def __init__(self, pred: dict, atomic_model=None) -> None:
        super().__init__()
        self.pred = pred
        self.atomic_model = atomic_model
        self.seen: dict = {}

    def forward(self, **inputs):
        self.seen = inputs
        return dict(self.pred)


def grads(loss: torch.Tensor, pred: dict) -> dict:
    keys = [k for k, v in pred.items() if v.requires_grad]
    gs = torch.autograd.grad(loss, [pred[k] for k in keys], allow_unused=True)
    return {k: g for k, g in zip(keys, gs) if g is not None}


def metrics_out(more: dict) -> dict:
    return {k: float(v) for k, v in more.items()}


def ener_case(name: str, seed: int) -> dict:
    over, lr_ratio, phantom, masked, find_over = ENER_CASES[name]
    section = dict(ENER_DEFAULTS, **over)
    gen = torch.Generator().manual_seed(seed)
    atype = torch.tensor(ATYPE_PHANTOM if phantom else ATYPE)
    ngc = section["numb_generalized_coord"]
    pred = {
        "energy": rand(gen, NF, scale=3.0),
        "force": rand(gen, NF, NLOC, 3),
        "virial": rand(gen, NF, 9, scale=2.0),
        "atom_energy": rand(gen, NF, NLOC),
    }
    label = {
        "energy": rand(gen, NF, scale=3.0),
        "force": rand(gen, NF, NLOC, 3),
        "virial": rand(gen, NF, 9, scale=2.0),
        "atom_ener": rand(gen, NF, NLOC),
        "atom_pref": torch.rand((NF, NLOC), generator=gen, dtype=F64) * 2.0,
        "atom_ener_coeff": torch.where(torch.rand((NF, NLOC), generator=gen) < 0.5, -1.0, 1.0).to(
            F64
        ),
    }
    if ngc:
        label["drdq"] = rand(gen, NF, NLOC * 3 * ngc)
    find = dict(FOUND, **find_over)
    lr0 = 1e-3
    lr = lr0 * lr_ratio
    up_pred = {
        "energy": pred["energy"][:, None],
        "force": pred["force"],
        "virial": pred["virial"],
        "atom_energy": pred["atom_energy"][..., None],
    }
    for v in up_pred.values():
        v.requires_grad_(True)
    up_label = {
        "energy": label["energy"][:, None],
        "force": label["force"],
        "virial": label["virial"],
        "atom_ener": label["atom_ener"],
        "atom_pref": label["atom_pref"].repeat_interleave(3, dim=1),
        "atom_ener_coeff": label["atom_ener_coeff"],
    }
    if ngc:
        up_label["drdq"] = label["drdq"]
    for key, ok in find.items():
        up_label[f"find_{key}"] = 1.0 if ok else 0.0
    if section["use_default_pf"] and not find["atom_pref"]:
        up_label["atom_pref"] = torch.ones_like(up_label["atom_pref"])  # what the loader fills in
        label.pop("atom_pref")
    kwargs = {k: v for k, v in section.items() if k != "type"}
    loss_fn = EnergyStdLoss(starter_learning_rate=lr0, **kwargs)
    inputs = {"atype": atype} if masked else {}
    _, loss, more = loss_fn(inputs, StandIn(up_pred), up_label, NLOC, lr)
    grad = grads(loss, up_pred)
    grad = {k: g.reshape(pred[k].shape) for k, g in grad.items()}
    cfg = {"section": section, "lr0": lr0, "lr": lr, "natoms": NLOC, "masked": masked, "find": find}
    out = {f"{name}/config": json.dumps(cfg)}
    out.update(np_dict(f"{name}/pred", pred))
    out.update(np_dict(f"{name}/label", label))
    out.update(np_dict(f"{name}/in", {"mask": atype >= 0}))
    out.update(np_dict(f"{name}/out", {"loss": loss}))
    out.update(np_dict(f"{name}/metric", metrics_out(more)))
    out.update(np_dict(f"{name}/grad", grad))
    return out


# name: (section overrides, intensive, task_dim, phantom atoms, mask given)
PROPERTY_CASES = {
    "smooth_mae": (dict(beta=1.0), False, 3, False, True),
    "smooth_mae_beta": (
        dict(beta=0.2, metric=["smooth_mae", "mae", "mse", "rmse", "mape"]),
        True,
        3,
        False,
        True,
    ),
    "mae_phantom": (dict(loss_func="mae", metric=["mae", "rmse"]), False, 2, True, True),
    "mse_nomask": (dict(loss_func="mse", metric=["mse", "smooth_mae"]), False, 3, False, False),
    "rmse": (dict(loss_func="rmse", metric=["rmse", "mape"]), True, 1, True, True),
    "mape": (dict(loss_func="mape", metric=["mape", "mae"]), False, 3, True, True),
    "mape_intensive": (dict(loss_func="mape", metric=[]), True, 2, False, True),
}


def property_case(name: str, seed: int) -> dict:
    over, intensive, task_dim, phantom, masked = PROPERTY_CASES[name]
    section = dict(
        {"type": "property", "loss_func": "smooth_mae", "metric": ["mae"], "beta": 1.0}, **over
    )
    gen = torch.Generator().manual_seed(seed)
    atype = torch.tensor(ATYPE_PHANTOM if phantom else ATYPE)
    pred = {"property": rand(gen, NF, task_dim, scale=4.0)}
    label = {"band": rand(gen, NF, task_dim, scale=4.0)}
    out_bias = rand(gen, task_dim)
    out_std = 0.5 + torch.rand(task_dim, generator=gen, dtype=F64)
    up_pred = {"band": pred["property"].clone().requires_grad_(True)}
    loss_fn = PropertyLoss(
        task_dim=task_dim,
        var_name="band",
        loss_func=section["loss_func"],
        metric=section["metric"],
        beta=section["beta"],
        out_bias=out_bias.tolist(),
        out_std=out_std.tolist(),
        intensive=intensive,
    )
    inputs = {"atype": atype} if masked else {}
    up_label = {"band": label["band"].clone()}
    _, loss, more = loss_fn(inputs, StandIn(up_pred), up_label, NLOC, 0.0)
    (grad,) = torch.autograd.grad(loss, [up_pred["band"]])
    cfg = {
        "section": section,
        "natoms": NLOC,
        "masked": masked,
        "task_dim": task_dim,
        "var_name": "band",
        "intensive": intensive,
    }
    out = {f"{name}/config": json.dumps(cfg)}
    out.update(np_dict(f"{name}/pred", pred))
    out.update(np_dict(f"{name}/label", label))
    out.update(
        np_dict(f"{name}/in", {"mask": atype >= 0, "out_bias": out_bias, "out_std": out_std})
    )
    out.update(np_dict(f"{name}/out", {"loss": loss}))
    out.update(np_dict(f"{name}/metric", metrics_out(more)))
    out.update(np_dict(f"{name}/grad", {"property": grad}))
    return out


class DensStats:
    """The model-side statistics the upstream dens loss reads: ``(E - sum_i b_{t_i}) / s``, ``F / rmsd``."""

    def __init__(self, energy_bias: torch.Tensor, energy_std: float, force_rmsd: float) -> None:
        self.energy_bias, self.energy_std, self.force_rmsd = energy_bias, energy_std, force_rmsd

    def norm_dens_energy(self, energy, atype):
        return (energy - self.energy_bias[:, None]) / self.energy_std

    def denorm_dens_energy(self, energy, atype):
        return energy * self.energy_std + self.energy_bias[:, None]

    def norm_dens_force(self, force):
        return force / self.force_rmsd

    def denorm_dens_force(self, force):
        return force * self.force_rmsd


DENS_DEFAULTS = {
    "type": "dens",
    "start_pref_e": 0.02,
    "limit_pref_e": 1.0,
    "start_pref_f": 1000,
    "limit_pref_f": 1.0,
    "loss_func": "mae",
    "dens_prob": 0.5,
    "dens_fixed_noise_std": True,
    "dens_std": 0.025,
    "dens_corrupt_ratio": 0.5,
    "dens_denoising_pos_coefficient": 10.0,
}
# name: (section overrides, training, phantom atoms, prediction keys, find overrides)
FULL = ("energy", "energy_norm", "force", "force_norm", "clean_force_norm", "denoising_force_norm")
MINIMAL = ("energy", "force")
DENS_CASES = {
    "mae_full": (dict(dens_prob=1.0), True, False, FULL, {}),
    "mse_full_phantom": (dict(dens_prob=1.0, loss_func="mse"), True, True, FULL, {}),
    "mae_minimal": (dict(dens_prob=1.0, dens_corrupt_ratio=0.3), True, True, MINIMAL, {}),
    "mse_all_corrupt": (
        dict(dens_prob=1.0, dens_corrupt_ratio=None, loss_func="mse"),
        True,
        True,
        MINIMAL,
        {},
    ),
    "mae_all_corrupt": (dict(dens_prob=1.0, dens_corrupt_ratio=None), True, False, FULL, {}),
    "mse_clean_batch": (dict(dens_prob=0.0, loss_func="mse"), True, True, FULL, {}),
    "mae_eval": (dict(dens_prob=1.0), False, True, MINIMAL, {}),
    "mae_prob_half": (dict(dens_prob=0.5, dens_std=0.1), True, False, FULL, {}),
    "mse_no_energy": (dict(dens_prob=1.0, loss_func="mse"), True, False, FULL, {"energy": False}),
    "mae_no_force": (dict(dens_prob=1.0), True, True, FULL, {"force": False}),
}


def dens_case(name: str, seed: int) -> dict:
    over, training, phantom, keys, find_over = DENS_CASES[name]
    section = dict(DENS_DEFAULTS, **over)
    gen = torch.Generator().manual_seed(seed)
    atype = torch.tensor(ATYPE_PHANTOM if phantom else ATYPE)
    coord = rand(gen, NF, NLOC, 3, scale=3.0)
    bias_t = rand(gen, 2)
    real = (atype >= 0).to(F64)
    energy_bias = (bias_t[atype.clamp_min(0)] * real).sum(-1)
    stats = DensStats(energy_bias, 0.7, 1.3)
    every = {
        "energy": rand(gen, NF, scale=3.0),
        "energy_norm": rand(gen, NF),
        "force": rand(gen, NF, NLOC, 3),
        "force_norm": rand(gen, NF, NLOC, 3),
        "clean_force_norm": rand(gen, NF, NLOC, 3),
        "denoising_force_norm": rand(gen, NF, NLOC, 3),
    }
    pred = {k: every[k] for k in keys}
    label = {"energy": rand(gen, NF, scale=3.0), "force": rand(gen, NF, NLOC, 3)}
    find = {"energy": True, "force": True, **find_over}
    up_pred = {
        k: (v[:, None] if v.ndim == 1 else v).clone().requires_grad_(True) for k, v in pred.items()
    }
    up_label = {"energy": label["energy"][:, None], "force": label["force"]}
    for k, ok in find.items():
        up_label[f"find_{k}"] = 1.0 if ok else 0.0
    kwargs = {k: v for k, v in section.items() if k != "type"}
    lr0, lr = 1e-3, 0.35e-3
    loss_fn = DeNSLoss(starter_learning_rate=lr0, **kwargs)
    model = StandIn(up_pred, stats)
    model.train(training)
    seed_rng = 1000 + seed
    torch.manual_seed(seed_rng)
    _, loss, more = loss_fn({"atype": atype, "coord": coord}, model, up_label, NLOC, lr)
    grad = {k: g.reshape(pred[k].shape) for k, g in grads(loss, up_pred).items()}
    cfg = {
        "section": section,
        "lr0": lr0,
        "lr": lr,
        "natoms": NLOC,
        "find": find,
        "seed": seed_rng,
        "training": training,
        "force_input": "force_input" in model.seen,
    }
    out = {f"{name}/config": json.dumps(cfg)}
    out.update(np_dict(f"{name}/pred", pred))
    out.update(np_dict(f"{name}/label", label))
    extra = {
        "atype": atype,
        "coord": coord,
        "energy_bias": energy_bias,
        "energy_std": torch.tensor(stats.energy_std, dtype=F64),
        "force_rmsd": torch.tensor(stats.force_rmsd, dtype=F64),
    }
    out.update(np_dict(f"{name}/in", extra))
    seen = {"loss": loss, "coord": model.seen["coord"], "noise_mask": model.seen["noise_mask"]}
    out.update(np_dict(f"{name}/out", seen))
    out.update(np_dict(f"{name}/metric", metrics_out(more)))
    out.update(np_dict(f"{name}/grad", grad))
    return out


def main() -> None:
    torch.set_default_dtype(F64)
    groups = {
        "loss_ener": (ENER_CASES, ener_case),
        "loss_property": (PROPERTY_CASES, property_case),
        "loss_dens": (DENS_CASES, dens_case),
    }
    for file, (cases, make) in groups.items():
        data: dict = {}
        for seed, name in enumerate(cases):
            data.update(make(name, seed))
        np.savez_compressed(OUT / f"{file}.npz", **data)
        metrics = sorted({k.split("/")[2] for k in data if k.split("/")[1] == "metric"})
        print(f"{file}: {len(cases)} cases, metrics {metrics}")
        assert all(math.isfinite(float(data[f"{c}/out/loss"])) for c in cases)


if __name__ == "__main__":
    main()
