"""Parity case ``dens`` (``loss.type = "dens"``); see ../parity/README.md, "Recipes".

Like ``make_parity_fixtures.py`` (3 steps of ``dp --pt train``, every trainable parameter
perturbed, upstream ``DeepPot.eval`` on the water frames; a checkpoint with a dens head is
evaluated in the dens mode: no descriptor, NaN virials) into ``expected.npz``, plus three
records of the upstream model called directly, in ``dens.npz``:

* ``NAME/dens/*``: the dens-mode outputs (eval mode) for a fixed corruption of the frame:
  inputs ``noisy_coord``, ``noise_mask``, ``force_input``; outputs ``energy``, ``atom_energy``,
  ``force``, ``energy_norm``, ``atom_energy_norm``, ``force_norm``, ``clean_force_norm``,
  ``denoising_force_norm``;
* ``loss_<func>/*``: one training-mode ``DeNSLoss`` evaluation (mae and mse) on frames 0 and 1 of
  ``data_3`` after ``torch.manual_seed(LOSS_SEED)`` (the loss draws the corruption), with the
  drawn ``noise_mask`` / ``noisy_coord`` and every metric;
* ``stat/force_rmsd``: upstream's ``dens_force_rmsd`` statistic of frames 0-3 of ``data_0``.

usage (DeePMD-kit 3.2.0 environment):
  PARITY_TOOL=/path/to/make_parity_fixtures.py python dens_recipe.py CASE INPUT OUTDIR [--rel R]
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(os.environ["PARITY_TOOL"])))
import make_parity_fixtures as mpf

LOSS_SEED = 20261125
LOSS_LR = 2.0e-4
DENS_FRAMES = ("water_pbc_0", "water_nopbc", "small_cell")


def load_model(ckpt_path):
    from deepmd.pt.model.model import get_model
    from deepmd.pt.train.wrapper import ModelWrapper

    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = get_model(ck["model"]["_extra_state"]["model_params"])
    ModelWrapper(model).load_state_dict(ck["model"])
    return model


def dens_outputs(model, frames):
    rng = np.random.default_rng(4242)
    model.eval()
    out = {}
    for name, c, b, t in frames:
        if name not in DENS_FRAMES:
            continue
        nat = len(t)
        mask = rng.random(nat) < 0.5
        mask[:2] = True
        noisy = c + 0.025 * rng.standard_normal((nat, 3)) * mask[:, None]
        force = 0.8 * rng.standard_normal((nat, 3))
        force[1] = 0.0  # a corrupted atom without force: the embedding is its l=0 bias
        pred = model(
            torch.tensor(noisy[None]),
            torch.tensor(t[None]),
            box=None if b is None else torch.tensor(b.reshape(1, 9)),
            force_input=torch.tensor(force[None]),
            noise_mask=torch.tensor(mask[None]),
        )
        rec = {"noisy_coord": noisy, "noise_mask": mask, "force_input": force}
        for key in (
            "energy", "atom_energy", "force", "energy_norm", "atom_energy_norm", "force_norm",
            "clean_force_norm", "denoising_force_norm",
        ):  # fmt: skip
            rec[key] = pred[key].detach().numpy()[0]
        out.update({f"{name}/dens/{k}": v for k, v in rec.items()})
    return out


def loss_outputs(model, loss_cfg):
    from deepmd.pt.loss.dens import DeNSLoss

    d = os.path.join(mpf.DATA, "water", "data_3", "set.000")
    f64 = np.float64  # the training data loader's precision
    coord = torch.tensor(np.load(d + "/coord.npy")[:2].astype(f64))
    box = torch.tensor(np.load(d + "/box.npy")[:2].astype(f64))
    atype = torch.tensor(
        np.loadtxt(os.path.join(mpf.DATA, "water", "data_3", "type.raw"), dtype=int)
    )
    atype = atype[None].expand(2, -1).clone()
    label = {
        "energy": torch.tensor(np.load(d + "/energy.npy")[:2].astype(f64)).reshape(2, 1),
        "force": torch.tensor(np.load(d + "/force.npy")[:2].astype(f64)).reshape(2, -1, 3),
        "find_energy": 1.0,
        "find_force": 1.0,
    }
    inputs = {"coord": coord, "atype": atype, "box": box}
    out = {"loss/coord": coord.numpy().reshape(2, -1, 3), "loss/box": box.numpy().reshape(2, 3, 3)}
    out["loss/atype"] = atype.numpy()
    out["loss/energy_label"] = label["energy"].numpy().reshape(-1)
    out["loss/force_label"] = label["force"].numpy()
    model.train()
    for func in ("mae", "mse"):
        cfg = {k: v for k, v in loss_cfg.items() if k != "type"}
        loss = DeNSLoss(starter_learning_rate=4.5e-4, **{**cfg, "loss_func": func})
        torch.manual_seed(LOSS_SEED)
        model_input, _, _, noise_mask, _, use_dens = loss._prepare_dens_inputs(
            inputs, label, enable_dens=True
        )
        torch.manual_seed(LOSS_SEED)
        _, value, more = loss(inputs, model, label, 192, LOSS_LR)
        key = f"loss_{func}"
        out[f"{key}/noise_mask"] = noise_mask.numpy()
        out[f"{key}/noisy_coord"] = model_input["coord"].numpy().reshape(2, -1, 3)
        out[f"{key}/use_dens"] = np.array(use_dens)
        out[f"{key}/loss"] = np.array(float(value))
        for name, v in more.items():
            out[f"{key}/{name}"] = np.array(float(v))
    model.eval()
    return out


def stat_outputs(model):
    d = os.path.join(mpf.DATA, "water", "data_0")
    t = np.loadtxt(d + "/type.raw", dtype=int)
    force = np.load(d + "/set.000/force.npy")[:4].astype(np.float64)  # as loaded for training
    samples = [
        {"force": torch.tensor(force), "atype": torch.tensor(np.broadcast_to(t, (4, len(t))).copy()),
         "find_force": 1.0}
    ]  # fmt: skip
    am = model.atomic_model
    saved = am.dens_force_rmsd.clone()
    am._compute_or_load_dens_force_stat(samples)
    value = float(am.dens_force_rmsd)
    am.dens_force_rmsd.copy_(saved)
    return {"stat/force_rmsd": np.array(value), "stat/frames": np.arange(4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("input")
    ap.add_argument("outdir")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rel", type=float, default=None)
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"parity_{a.case}_")
    cfg = mpf.train(a.input, work, a.steps, False)
    header = open(os.path.join(work, "lcurve.out")).readline().split()[1:]
    out_ck = os.path.join(a.outdir, "model.pt")
    rels = None if a.rel is None else [a.rel]
    n, rel = mpf.perturb(os.path.join(work, "model.ckpt.pt"), out_ck, False, rels=rels)
    ck = torch.load(out_ck, map_location="cpu", weights_only=False)
    ck.pop("optimizer", None)
    torch.save(ck, out_ck)
    frames = mpf.water_frames()
    np.savez(os.path.join(a.outdir, "expected.npz"), **mpf.evaluate(out_ck, frames, False))
    model = load_model(out_ck)
    assert model.get_active_mode() == "dens"
    res = dens_outputs(model, frames)
    res.update(loss_outputs(model, cfg["loss"]))
    res.update(stat_outputs(model))
    np.savez(os.path.join(a.outdir, "dens.npz"), **res)
    text = json.dumps(cfg, indent=1).replace(os.path.abspath(mpf.DATA) + "/", "../../data/")
    open(os.path.join(a.outdir, "input.json"), "w").write(text)
    meta = {
        "case": a.case,
        "upstream": "deepmd-kit 3.2.0",
        "perturbed_params": n,
        "noise_rel": rel,
        "frames": [f[0] for f in frames],
        "dens_frames": list(DENS_FRAMES),
        "recipe": "dens",
        "loss_seed": LOSS_SEED,
        "loss_lr": LOSS_LR,
        "lcurve_columns": header,
    }
    json.dump(meta, open(os.path.join(a.outdir, "meta.json"), "w"), indent=1)
    print("wrote", a.outdir, "perturbed", n, "rel", rel)


if __name__ == "__main__":
    main()
