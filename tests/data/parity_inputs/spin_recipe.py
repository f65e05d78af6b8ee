"""Parity cases of spin models (``spin_native``, ``spin_deepspin``); see README.md, "Recipes".

The shared NiO data (``data/spin``) stores each Ni spin as a third atom type, a virtual atom
0.4 Å from its Ni. This script turns it into spin data: types Ni, O (32 atoms),
``spin.npy = (r_virtual - r_Ni) / 0.314`` (so ``virtual_scale 0.314`` puts the virtual atom back
where it was), ``force.npy = F_real + F_virtual`` on Ni, ``force_mag.npy = 0.314 F_virtual``.
Then, like ``make_parity_fixtures.py``: 3 steps of ``dp --pt train`` with the ``ener_spin``
loss, every trainable parameter perturbed, and upstream ``DeepPot.eval(..., spin=...)``.

usage (DeePMD-kit 3.2.0 environment):
  python spin_recipe.py CASE INPUT OUTDIR [--steps N] [--rel R]

``expected.npz`` holds the usual per-frame keys plus ``NAME/spin (nat, 3)``,
``NAME/force_mag (nat, 3)`` and ``NAME/mask_mag (nat,)``.
"""

import argparse
import json
import os
import subprocess
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "..", "..", "shared", "data", "spin")
if not os.path.isdir(DATA):
    DATA = "/work/shared/data/spin"
SCALE = 0.314
NREAL = 32  # 16 Ni + 16 O; atoms 32..47 are the Ni virtual atoms


def convert(src: str, dst: str) -> None:
    """One system of the virtual-atom layout -> real atoms + spin.npy + force_mag.npy."""
    sd = os.path.join(dst, "set.000")
    os.makedirs(sd, exist_ok=True)
    c = np.load(os.path.join(src, "set.000", "coord.npy")).reshape(-1, 48, 3)
    f = np.load(os.path.join(src, "set.000", "force.npy")).reshape(-1, 48, 3)
    nf = c.shape[0]
    spin = np.zeros((nf, NREAL, 3))
    spin[:, :16] = (c[:, 32:] - c[:, :16]) / SCALE
    force = f[:, :NREAL].copy()
    force[:, :16] += f[:, 32:]
    fmag = np.zeros((nf, NREAL, 3))
    fmag[:, :16] = SCALE * f[:, 32:]
    np.save(os.path.join(sd, "coord.npy"), c[:, :NREAL].reshape(nf, -1))
    np.save(os.path.join(sd, "force.npy"), force.reshape(nf, -1))
    np.save(os.path.join(sd, "spin.npy"), spin.reshape(nf, -1))
    np.save(os.path.join(sd, "force_mag.npy"), fmag.reshape(nf, -1))
    for name in ("energy.npy", "box.npy"):
        np.save(os.path.join(sd, name), np.load(os.path.join(src, "set.000", name)))
    types = np.loadtxt(os.path.join(src, "type.raw"), dtype=int)[:NREAL]
    open(os.path.join(dst, "type.raw"), "w").write("\n".join(map(str, types)) + "\n")
    open(os.path.join(dst, "type_map.raw"), "w").write("Ni\nO\n")


def frames(root: str):
    """(name, coord, box, atype, spin) of the evaluation frames."""
    sd = os.path.join(root, "data_1", "set.000")
    c = np.load(os.path.join(sd, "coord.npy")).reshape(-1, NREAL, 3)
    b = np.load(os.path.join(sd, "box.npy")).reshape(-1, 3, 3)
    s = np.load(os.path.join(sd, "spin.npy")).reshape(-1, NREAL, 3)
    t = np.loadtxt(os.path.join(root, "data_1", "type.raw"), dtype=int)
    rng = np.random.default_rng(31)
    odd = s[1].copy()
    odd[[0, 5]] = 0.0  # magnetic atoms without a moment
    odd[[2, 7]] *= 0.35  # short moments
    odd[16:] = rng.normal(size=(16, 3))  # ignored: O carries no spin
    return [
        ("spin_pbc_0", c[0], b[0], t, s[0]),
        ("spin_pbc_1", c[1], b[1], t, s[1]),
        ("spin_nopbc", c[0], None, t, s[0]),
        ("spin_odd", c[1], b[1], t, odd),
    ]


def train(inp: str, work: str, root: str, steps: int) -> dict:
    cfg = json.load(open(inp))
    tr = cfg["training"]
    tr["training_data"]["systems"] = [os.path.join(root, "data_0")]
    tr["validation_data"]["systems"] = [os.path.join(root, "data_1")]
    tr.update(numb_steps=steps, save_freq=steps, disp_freq=1, enable_ema=False)
    json.dump(cfg, open(os.path.join(work, "input.json"), "w"), indent=1)
    with open(os.path.join(work, "train.log"), "w") as log:
        subprocess.run(
            ["dp", "--pt", "train", "input.json", "--skip-neighbor-stat"],
            cwd=work,
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return cfg


def perturbed(ck: dict, rel: float, floor: float = 0.3, seed: int = 20261124):
    from deepmd.pt.model.model import get_model
    from deepmd.pt.train.wrapper import ModelWrapper

    model = get_model(ck["model"]["_extra_state"]["model_params"])
    wrapper = ModelWrapper(model)
    wrapper.load_state_dict(ck["model"])
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, p in wrapper.named_parameters():
            if p.dtype.is_floating_point:
                scale = rel * max(float(p.abs().mean()), floor)
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
                n += p.numel()
    return model, wrapper, n


def perturb(ckpt_in: str, ckpt_out: str, frame, rels) -> tuple[int, float]:
    """Largest noise level whose forces stay finite and below 3 eV/Å on ``frame``."""
    ck = torch.load(ckpt_in, map_location="cpu", weights_only=False)
    _, c, b, t, s = frame
    for rel in rels:
        model, wrapper, n = perturbed(ck, rel)
        out = model(
            torch.tensor(c.reshape(1, -1, 3)),
            torch.tensor(t.reshape(1, -1)),
            spin=torch.tensor(s.reshape(1, -1, 3)),
            box=torch.tensor(b.reshape(1, 9)),
        )
        mag = float(out["force"].abs().mean())
        ok = bool(torch.isfinite(out["force"]).all()) and mag < 3.0
        print(
            f"noise rel={rel:g} -> |F| {mag:.3g}, |Fm| {float(out['force_mag'].abs().mean()):.3g}"
        )
        if ok:
            ck["model"] = wrapper.state_dict()
            ck.pop("optimizer", None)
            torch.save(ck, ckpt_out)
            return n, rel
    raise RuntimeError("no stable perturbation found")


def evaluate(ckpt: str, frs) -> dict:
    from deepmd.infer import DeepPot

    dp = DeepPot(ckpt)
    out = {}
    for name, c, b, t, s in frs:
        bb = None if b is None else b.reshape(1, 9)
        e, f, v, ae, av, fm, mm = dp.eval(
            c.reshape(1, -1), bb, t, atomic=True, spin=s.reshape(1, -1)
        )
        out.update(
            {
                f"{name}/coord": c,
                f"{name}/atype": t,
                f"{name}/spin": s,
                f"{name}/energy": e.reshape(-1),
                f"{name}/force": f.reshape(-1, 3),
                f"{name}/virial": v.reshape(3, 3),
                f"{name}/atom_energy": ae.reshape(-1),
                f"{name}/atom_virial": av.reshape(-1, 9),
                f"{name}/force_mag": fm.reshape(-1, 3),
                f"{name}/mask_mag": np.asarray(mm).reshape(-1).astype(bool),
            }
        )
        if b is not None:
            out[f"{name}/box"] = b
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("input")
    ap.add_argument("outdir")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rel", type=float, default=None)
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"parity_{a.case}_")
    root = os.path.join(work, "spin")
    for name in ("data_0", "data_1"):
        convert(os.path.join(DATA, name), os.path.join(root, name))
    cfg = train(a.input, work, root, a.steps)
    frs = frames(root)
    rels = [a.rel] if a.rel is not None else [0.5, 0.3, 0.2, 0.12, 0.08, 0.05]
    out_ck = os.path.join(a.outdir, "model.pt")
    n, rel = perturb(os.path.join(work, "model.ckpt.pt"), out_ck, frs[0], rels)
    np.savez(os.path.join(a.outdir, "expected.npz"), **evaluate(out_ck, frs))
    text = json.dumps(cfg, indent=1).replace(work + "/", "<scratch>/")
    open(os.path.join(a.outdir, "input.json"), "w").write(text)
    meta = {
        "case": a.case,
        "upstream": "deepmd-kit 3.2.0",
        "perturbed_params": n,
        "noise_rel": rel,
        "frames": [f[0] for f in frs],
        "recipe": "spin",
    }
    json.dump(meta, open(os.path.join(a.outdir, "meta.json"), "w"), indent=1)
    print("wrote", a.outdir, "perturbed", n)


if __name__ == "__main__":
    main()
