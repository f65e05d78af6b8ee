"""Parity cases that need more than a plain training input (see README.md, "Recipes").

Wraps the fixture builder `make_parity_fixtures.py` (train a few upstream steps, perturb,
evaluate upstream `DeepPot`) and adds: frame/atomic parameters, charge/spin conditions,
mixed-type training data, extra evaluation frames, LoRA adapters kept in the checkpoint,
and a selected case embedding. Outputs have the builder's format plus the optional
per-frame keys NAME/fparam (nfp,), NAME/aparam (nat, nap), NAME/charge_spin (2,).

usage (DeePMD-kit 3.2.0 environment):
  PARITY_TOOL=/path/to/make_parity_fixtures.py \
  python extra_recipes.py CASE INPUT OUTDIR --recipe RECIPE [--steps N] [--rel R]
recipes: fparam2 (numb_fparam 2 + default_fparam, numb_aparam 1),
         fparam1 (numb_fparam 1, numb_aparam 1), chg_spin (charge/spin frames),
         mixed (mixed-type CHO training data + CHO frames), lora (LoRA adapters kept),
         case_embd (case one-hot set to index 1)
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(os.environ["PARITY_TOOL"])))
import make_parity_fixtures as mpf

SCR = os.environ.get("PARITY_SCRATCH") or tempfile.mkdtemp(prefix="parity_data_")
ORIG_DATA = mpf.DATA


def make_param_data(nfp, nap, tag):
    """Scratch copy of the water data with fparam.npy / aparam.npy."""
    root = os.path.join(SCR, tag)
    rng = np.random.default_rng(12345 + nfp * 10 + nap)
    for sysn in ["data_0", "data_1", "data_2", "data_3"]:
        src = os.path.join(ORIG_DATA, "water", sysn)
        dst = os.path.join(root, "water", sysn)
        os.makedirs(dst, exist_ok=True)
        for f in ["type.raw", "type_map.raw"]:
            if not os.path.exists(os.path.join(dst, f)):
                os.symlink(os.path.join(src, f), os.path.join(dst, f))
        nat = len(np.loadtxt(os.path.join(src, "type.raw"), dtype=int))
        for s in sorted(d for d in os.listdir(src) if d.startswith("set.")):
            sd = os.path.join(dst, s)
            os.makedirs(sd, exist_ok=True)
            for f in os.listdir(os.path.join(src, s)):
                if not os.path.exists(os.path.join(sd, f)):
                    os.symlink(os.path.join(src, s, f), os.path.join(sd, f))
            nfr = np.load(os.path.join(src, s, "coord.npy")).shape[0]
            if nfp:
                np.save(os.path.join(sd, "fparam.npy"), 0.4 + 0.3 * rng.standard_normal((nfr, nfp)))
            if nap:
                np.save(
                    os.path.join(sd, "aparam.npy"),
                    0.2 + 0.5 * rng.standard_normal((nfr, nat * nap)),
                )
    return root


def make_mixed_data():
    """Mixed-type CHO molecules (atom order permuted per frame, real_atom_types.npy)."""
    root = os.path.join(SCR, "mixed")
    rng = np.random.default_rng(777)
    out = []
    for name, nfr in [("C1H4O2", 60), ("C3H3O4", 60)]:
        src = os.path.join(ORIG_DATA, "nopbc", name)
        dst = os.path.join(root, name)
        sd = os.path.join(dst, "set.000")
        os.makedirs(sd, exist_ok=True)
        t = np.loadtxt(os.path.join(src, "type.raw"), dtype=int)
        nat = len(t)
        c = np.load(os.path.join(src, "set.000", "coord.npy"))[:nfr].reshape(nfr, nat, 3)
        f = np.load(os.path.join(src, "set.000", "force.npy"))[:nfr].reshape(nfr, nat, 3)
        e = np.load(os.path.join(src, "set.000", "energy.npy"))[:nfr]
        rt = np.zeros((nfr, nat), dtype=int)
        for i in range(nfr):
            p = rng.permutation(nat)
            c[i] = c[i][p]
            f[i] = f[i][p]
            rt[i] = t[p]
        np.save(os.path.join(sd, "coord.npy"), c.reshape(nfr, -1))
        np.save(os.path.join(sd, "force.npy"), f.reshape(nfr, -1))
        np.save(os.path.join(sd, "energy.npy"), e)
        np.save(os.path.join(sd, "real_atom_types.npy"), rt)
        open(os.path.join(dst, "type.raw"), "w").write("\n".join("0" for _ in range(nat)) + "\n")
        open(os.path.join(dst, "type_map.raw"), "w").write(
            open(os.path.join(src, "type_map.raw")).read()
        )
        open(os.path.join(dst, "nopbc"), "w").write("")
        out.append(dst)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("input")
    ap.add_argument("outdir")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rel", type=float, default=None)
    a = ap.parse_args()

    extras = {}  # frame name -> dict(fparam=..., aparam=..., charge_spin=...)
    base_frames = mpf.water_frames()
    frames = list(base_frames)

    if a.recipe in ("fparam2", "fparam1"):
        nfp = 2 if a.recipe == "fparam2" else 1
        mpf.DATA = make_param_data(nfp, 1, a.recipe)
        rng = np.random.default_rng(99)
        for i, (name, c, _b, t) in enumerate(frames):
            ex = {"aparam": (0.2 + 0.5 * rng.standard_normal((len(t), 1)))}
            # fparam2 has default_fparam: give explicit fparam on some frames only
            if a.recipe == "fparam1" or i in (0, 2):
                ex["fparam"] = 0.4 + 0.3 * rng.standard_normal(nfp)
            extras[name] = ex
    elif a.recipe == "chg_spin":
        css = {"water_pbc_0": [1.0, 3.0], "water_triclinic": [-2.0, 0.0], "small_cell": [0.0, 5.0]}
        for name, cs in css.items():
            extras[name] = {"charge_spin": np.array(cs)}
    elif a.recipe == "mixed":
        systems = make_mixed_data()

        def train(inp, workdir, steps, prop):
            cfg = json.load(open(inp))
            tr = cfg["training"]
            tr["training_data"]["systems"] = systems
            tr["training_data"]["batch_size"] = 2
            tr["validation_data"]["systems"] = systems[:1]
            tmp = os.path.join(workdir, "input_orig.json")
            json.dump(cfg, open(tmp, "w"))
            # reuse the tool's training (it overrides systems for energy): patch DATA-free path
            import subprocess

            tr["numb_steps"] = steps
            tr["save_freq"] = steps
            tr["disp_freq"] = 1
            tr.pop("stat_file", None)
            tr["enable_ema"] = False
            cfg["model"].get("descriptor", {})["use_amp"] = False
            json.dump(cfg, open(os.path.join(workdir, "input.json"), "w"), indent=1)
            subprocess.run(
                ["dp", "--pt", "train", "input.json", "--skip-neighbor-stat"],
                cwd=workdir,
                check=True,
                stdout=open(os.path.join(workdir, "train.log"), "w"),
                stderr=subprocess.STDOUT,
            )
            return cfg

        mpf.train = train
        # CHO molecules in model type indices (type_map O, H, C); data type_map is C H O
        remap = np.array([2, 1, 0])
        for sysd, k in [(systems[0], 0), (systems[1], 0), (systems[1], 5)]:
            c = np.load(sysd + "/set.000/coord.npy")[k].reshape(-1, 3)
            rt = np.load(sysd + "/set.000/real_atom_types.npy")[k]
            frames.append(("cho_%s_%d" % (os.path.basename(sysd), k), c, None, remap[rt]))
    elif a.recipe == "lora":
        # keep the LoRA adapters in the saved state dict (as a mid-training checkpoint has them)
        import torch
        from deepmd.pt.model.descriptor.sezm_nn.lora import apply_lora_to_sezm

        def _perturbed(ck, rel, floor, seed):
            from deepmd.pt.model.model import get_model
            from deepmd.pt.train.wrapper import ModelWrapper

            params = ck["model"]["_extra_state"]["model_params"]
            keys = [k for k in ck["model"] if ".A_by_l" in k or ".A_m0" in k]
            print("LoRA keys in trained checkpoint:", len(keys))
            model = get_model(params)
            apply_lora_to_sezm(
                model, rank=int(params["lora"]["rank"]), alpha=params["lora"].get("alpha")
            )
            w = ModelWrapper(model)
            w.load_state_dict(ck["model"])
            g = torch.Generator().manual_seed(seed)
            n = 0
            with torch.no_grad():
                for _name, p in w.named_parameters():
                    if not p.dtype.is_floating_point:
                        continue
                    scale = rel * max(float(p.detach().abs().mean()), floor)
                    p.add_(
                        scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                    )
                    n += p.numel()
            return model, w, n

        mpf._perturbed = _perturbed
    elif a.recipe == "case_embd":
        # single-task training leaves the case one-hot at zero; select case 1 as a
        # multi-task branch would
        orig = mpf._perturbed

        def _perturbed(ck, rel, floor, seed):
            model, w, n = orig(ck, rel, floor, seed)
            model.atomic_model.fitting_net.set_case_embd(1)
            return model, w, n

        mpf._perturbed = _perturbed
    else:
        raise SystemExit("unknown recipe")

    mpf.water_frames = lambda: frames

    def evaluate(ckpt, frs, prop):
        from deepmd.infer import DeepPot

        dp = DeepPot(ckpt)
        out = {}
        for name, c, b, t in frs:
            ex = extras.get(name, {})
            cc = c.reshape(1, -1)
            bb = None if b is None else b.reshape(1, 9)
            kw = {}
            if "fparam" in ex:
                kw["fparam"] = np.asarray(ex["fparam"]).reshape(1, -1)
            if "aparam" in ex:
                kw["aparam"] = np.asarray(ex["aparam"]).reshape(1, len(t), -1)
            if "charge_spin" in ex:
                kw["charge_spin"] = np.asarray(ex["charge_spin"]).reshape(1, 2)
            e, f, v, ae, av = dp.eval(cc, bb, t, atomic=True, **kw)
            out[name + "/coord"] = c
            out[name + "/atype"] = t
            if b is not None:
                out[name + "/box"] = b
            for k2, val in ex.items():
                out[name + "/" + k2] = np.asarray(val)
            out[name + "/energy"] = e.reshape(-1)
            out[name + "/force"] = f.reshape(-1, 3)
            out[name + "/virial"] = v.reshape(3, 3)
            out[name + "/atom_energy"] = ae.reshape(-1)
            out[name + "/atom_virial"] = av.reshape(-1, 9)
            out[name + "/descriptor"] = dp.eval_descriptor(cc, bb, t, **kw).reshape(len(t), -1)
        return out

    mpf.evaluate = evaluate

    # the tool's perturb() evaluates the first frame without fparam/aparam/charge_spin;
    # wrap the model forward so that it gets them
    if extras.get(frames[0][0]):
        import deepmd.pt.model.model as mm
        import torch
        from deepmd.pt.model.model import get_model as _gm

        ex0 = extras[frames[0][0]]

        def get_model(params):
            m = _gm(params)
            fwd = m.forward

            def forward(coord, atype, box=None, **kw):
                if "fparam" in ex0:
                    kw.setdefault("fparam", torch.tensor(np.asarray(ex0["fparam"]).reshape(1, -1)))
                if "aparam" in ex0:
                    kw.setdefault(
                        "aparam",
                        torch.tensor(np.asarray(ex0["aparam"]).reshape(1, atype.shape[1], -1)),
                    )
                if "charge_spin" in ex0:
                    kw.setdefault(
                        "charge_spin", torch.tensor(np.asarray(ex0["charge_spin"]).reshape(1, 2))
                    )
                return fwd(coord, atype, box=box, **kw)

            m.forward = forward
            return m

        mm.get_model = get_model

    sys.argv = [sys.argv[0], a.case, a.input, a.outdir, "--steps", str(a.steps)] + (
        [] if a.rel is None else ["--rel", str(a.rel)]
    )
    mpf.main()
    # record the recipe in meta.json
    mp = os.path.join(a.outdir, "meta.json")
    meta = json.load(open(mp))
    meta["recipe"] = a.recipe
    json.dump(meta, open(mp, "w"), indent=1)
    ip = os.path.join(a.outdir, "input.json")
    text = open(ip).read().replace(SCR + "/", "<scratch>/")
    open(ip, "w").write(text)


if __name__ == "__main__":
    main()
