"""Reference data for learning-rate schedules and optimizers.

Run with the DeePMD-kit venv: ``/tmp/oracle/bin/python tests/module_fixtures/make_optim.py``.

``tests/data/modules/optim_lr.npz``: for each case ``"<case>/config"`` (JSON of the raw
``learning_rate`` section and ``numb_steps``) and ``"<case>/lr"``, upstream's learning rate at
steps ``0 .. numb_steps + 10`` (its section normalized by upstream's own schema).

``tests/data/modules/optim_steps.npz``: the trainable parameters of the ``tiny`` parity
checkpoint (the two largest left out to keep the file small) plus a few synthetic ones that
exercise the name/shape routing corner cases. ``"names"`` (JSON), ``"init/<name>"``,
``"grad/<step>/<name>"`` (correlated random gradients), ``"lr"`` (one rate per step) and per
optimizer case ``"<case>/config"`` (JSON of the raw ``optimizer`` section, the parameter dtype
and the gradients dropped per step) and ``"<case>/final/<name>"``. HybridMuon cases also store
``"<case>/routes"``, upstream's routing table. Sections are normalized by upstream's schema;
Adam/AdamW are built the way upstream's trainer builds them (one group over all parameters,
``fused`` off on CPU); HybridMuon gets the parameter names through ``set_param_names`` like in
the trainer. The learning rate is written into the parameter groups before each step, as the
trainer's scheduler does.

``tests/data/modules/optim_gram.npz``: ``"gram/<i>/in"`` and ``"gram/<i>/out"``, upstream's
compiled Gram Newton-Schulz on matrices whose Frobenius norm is exact in any summation order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from deepmd.dpmodel.utils.learning_rate import BaseLR
from deepmd.pt.model.model import get_model
from deepmd.pt.optimizer import AdaMuonOptimizer, HybridMuonOptimizer
from deepmd.pt.optimizer.hybrid_muon import _GramNewtonSchulzOrthogonalizer
from deepmd.pt.train.wrapper import ModelWrapper
from deepmd.utils.argcheck import learning_rate_args, optimizer_args

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "modules"
TINY = ROOT / "data" / "parity" / "tiny" / "model.pt"
DROPPED = ("ffns.0.so3_linear_1.weight", "ffns.0.act.scalar_gate.weight")
EXTRA = {  # routing corner cases
    "extra.b": (4, 3),
    "extra.layers.3": (5, 7),
    "extra.Out_BIAS": (3, 5),
    "extra.ADAMW_gain": (4, 4),
    "extra.w4": (2, 3, 8, 12),
    "extra.col": (1, 9, 1),
    "extra.one": (1, 1),
}
N_STEPS = 3
LRS = [2e-3, 5e-3, 3e-3]

LR_CASES = {
    "exp_stair": ({"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-8, "decay_steps": 50}, 1000),
    "exp_smooth_warm": (
        {
            "type": "exp",
            "start_lr": 1e-3,
            "stop_lr": 1e-8,
            "decay_steps": 50,
            "smooth": True,
            "warmup_steps": 100,
            "warmup_start_factor": 0.1,
        },
        1000,
    ),
    "exp_rate": (
        {"type": "exp", "start_lr": 2e-3, "stop_lr": 1e-5, "decay_steps": 30, "decay_rate": 0.9},
        1000,
    ),
    "exp_auto_steps": (
        {"type": "exp", "start_lr": 1e-3, "stop_lr_ratio": 1e-3, "warmup_ratio": 0.1},
        800,
    ),
    "exp_short": ({"type": "exp", "start_lr": 1e-3}, 50),
    "exp_default": ({"start_lr": 1e-3, "stop_lr": 3.51e-8, "decay_steps": 500}, 20000),
    "cosine_warm": (
        {"type": "cosine", "start_lr": 1e-3, "stop_lr": 1e-6, "warmup_ratio": 0.05},
        1000,
    ),
    "cosine": ({"type": "cosine", "start_lr": 5e-4, "stop_lr_ratio": 0.01}, 700),
    "wsd_inverse": ({"type": "wsd", "start_lr": 1e-3, "stop_lr": 1e-6, "warmup_steps": 50}, 1000),
    "wsd_cosine_tiny": (
        {
            "type": "wsd",
            "start_lr": 5e-4,
            "stop_lr": 1e-6,
            "warmup_ratio": 0.003,
            "warmup_start_factor": 0.2,
            "decay_phase_ratio": 0.65,
            "decay_type": "cosine",
        },
        1000,
    ),
    "wsd_linear_full": (
        {
            "type": "wsd",
            "start_lr": 1e-3,
            "stop_lr_ratio": 0.05,
            "warmup_ratio": 0.1,
            "decay_phase_ratio": 1.0,
            "decay_type": "linear",
        },
        600,
    ),
}

HM_CASES = {
    "hm_default": ({"type": "HybridMuon"}, "float32", {}),
    "hm_standard_ns": (
        {"type": "HybridMuon", "enable_gram": False, "magma_muon": False, "flash_muon": False},
        "float32",
        {},
    ),
    "hm_2d": (
        {
            "type": "HybridMuon",
            "muon_mode": "2d",
            "lr_adjust": 10.0,
            "weight_decay": 0.01,
            "enable_gram": False,
        },
        "float32",
        {},
    ),
    "hm_flat": (
        {
            "type": "HybridMuon",
            "muon_mode": "flat",
            "momentum": 0.9,
            "adam_beta1": 0.8,
            "adam_beta2": 0.99,
            "lr_adjust_coeff": 0.2,
        },
        "float32",
        {
            1: [
                "model.Default.atomic_model.descriptor.blocks.0.so2_conv.so2_linears.0.weight_m0",
                "model.Default.atomic_model.descriptor.radial_basis.adam_freqs",
                "model.Default.atomic_model.descriptor.blocks.0.so2_conv.adamw_attn_logit_w",
            ]
        },
    ),
    "hm_float64": ({"type": "HybridMuon"}, "float64", {}),
}
ADAM_CASES = {
    "adam": ({"type": "Adam"}, "float32", {}),
    "adam_l2": ({"type": "Adam", "weight_decay": 0.01, "adam_beta2": 0.99}, "float32", {}),
    "adamw": ({"type": "AdamW", "adam_beta1": 0.8}, "float32", {}),
    "adamuon": ({"type": "AdaMuon"}, "float32", {}),
    "adamuon_rms": ({"type": "AdaMuon", "lr_adjust": 0.0, "weight_decay": 0.01}, "float32", {}),
}


def lr_refs() -> dict[str, np.ndarray]:
    out = {}
    arg = learning_rate_args()
    for case, (raw, numb_steps) in LR_CASES.items():
        section = arg.normalize_value(dict(raw), trim_pattern="_*")
        arg.check_value(section, strict=True)
        schedule = BaseLR(**section, num_steps=numb_steps)
        values = [schedule.value(step) for step in range(numb_steps + 11)]
        out[f"{case}/config"] = np.array(json.dumps({"section": raw, "numb_steps": numb_steps}))
        out[f"{case}/lr"] = np.array(values, dtype=np.float64)
    return out


def tiny_parameters() -> dict[str, torch.Tensor]:
    ck = torch.load(TINY, map_location="cpu", weights_only=False)
    wrapper = ModelWrapper(get_model(ck["model"]["_extra_state"]["model_params"]))
    wrapper.load_state_dict(ck["model"])
    params = {
        name: p.detach().clone()
        for name, p in wrapper.named_parameters()
        if not name.endswith(DROPPED)
    }
    g = torch.Generator().manual_seed(5)
    for name, shape in EXTRA.items():
        params[name] = 0.3 * torch.randn(shape, generator=g)
    return params


def gradients(init: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Gradients that keep some alignment between steps, each parameter on its own scale."""
    g = torch.Generator().manual_seed(11)
    scales = {n: 10.0 ** (-2.0 * torch.rand((), generator=g).item()) for n in init}
    steps, prev = [], None
    for _ in range(N_STEPS):
        cur = {}
        for name, p in init.items():
            noise = scales[name] * torch.randn(p.shape, generator=g)
            cur[name] = noise if prev is None else 0.6 * prev[name] + 0.8 * noise
        steps.append(cur)
        prev = cur
    return steps


def build(section: dict, params: list[torch.Tensor], names: list[str]) -> torch.optim.Optimizer:
    """The optimizer as upstream's trainer builds it (``Trainer.__init__``)."""
    arg = optimizer_args()
    opt = arg.normalize_value(dict(section), trim_pattern="_*")
    arg.check_value(opt, strict=True)
    betas = (opt["adam_beta1"], opt["adam_beta2"])
    kind = opt["type"]
    if kind in ("Adam", "AdamW"):
        cls = torch.optim.Adam if kind == "Adam" else torch.optim.AdamW
        return cls(params, lr=LRS[0], weight_decay=opt["weight_decay"], betas=betas, fused=False)
    common = dict(
        lr=LRS[0],
        weight_decay=opt["weight_decay"],
        adam_betas=betas,
        momentum=opt["momentum"],
        lr_adjust=opt["lr_adjust"],
        lr_adjust_coeff=opt["lr_adjust_coeff"],
    )
    if kind == "AdaMuon":
        return AdaMuonOptimizer(params, **common)
    optimizer = HybridMuonOptimizer(
        params,
        muon_mode=opt["muon_mode"],
        enable_gram=opt["enable_gram"],
        flash_muon=opt["flash_muon"],
        magma_muon=opt["magma_muon"],
        **common,
    )
    optimizer.set_param_names(list(zip(names, params, strict=True)))
    return optimizer


def run_case(section, dtype, skips, init, grads) -> tuple[dict, torch.optim.Optimizer]:
    names = list(init)
    params = [torch.nn.Parameter(init[n].to(getattr(torch, dtype), copy=True)) for n in names]
    optimizer = build(section, params, names)
    for step in range(N_STEPS):
        for name, p in zip(names, params, strict=True):
            dropped = name in skips.get(step, [])
            p.grad = None if dropped else grads[step][name].to(p.dtype, copy=True)
        for group in optimizer.param_groups:
            group["lr"] = LRS[step]
        optimizer.step()
    return {n: p.detach().clone() for n, p in zip(names, params, strict=True)}, optimizer


def routes(optimizer: HybridMuonOptimizer) -> dict:
    (route,) = optimizer._routing
    return {
        "muon": {e["name"]: [e["batch_size"], e["rows"], e["cols"]] for e in route["muon_params"]},
        "adam": sorted(e["name"] for e in route["adam_no_decay"]),
        "adamw": sorted(e["name"] for e in route["adam_decay"]),
    }


def step_refs() -> dict[str, np.ndarray]:
    init = tiny_parameters()
    grads = gradients(init)
    out = {"names": np.array(json.dumps(list(init))), "lr": np.array(LRS)}
    for name, p in init.items():
        out[f"init/{name}"] = p.numpy()
        for step in range(N_STEPS):
            out[f"grad/{step}/{name}"] = grads[step][name].numpy()
    for case, (section, dtype, skips) in {**HM_CASES, **ADAM_CASES}.items():
        final, optimizer = run_case(section, dtype, skips, init, grads)
        config = {"section": section, "dtype": dtype, "skip": {str(k): v for k, v in skips.items()}}
        out[f"{case}/config"] = np.array(json.dumps(config))
        if isinstance(optimizer, HybridMuonOptimizer):
            out[f"{case}/routes"] = np.array(json.dumps(routes(optimizer)))
        for name, p in final.items():
            out[f"{case}/final/{name}"] = p.numpy()
    return out


def gram_refs() -> dict[str, np.ndarray]:
    """Upstream's compiled Gram Newton-Schulz on wide matrices whose Frobenius norm is exact in
    any summation order: entries +-2^-5 on k^2 random positions, zero elsewhere."""
    g = torch.Generator().manual_seed(17)
    orth = _GramNewtonSchulzOrthogonalizer()
    out = {}
    for i, (batch, m, n, k) in enumerate([(3, 16, 48, 24), (2, 8, 12, 9), (1, 6, 32, 13)]):
        x = torch.zeros(batch, m * n)
        for b in range(batch):
            where = torch.randperm(m * n, generator=g)[: k * k]
            x[b, where] = torch.randint(0, 2, (k * k,), generator=g).float() * 2 - 1
        x = (x / 32).reshape(batch, m, n)
        out[f"gram/{i}/in"], out[f"gram/{i}/out"] = x.numpy(), orth(x).numpy()
    return out


def main() -> None:
    torch.set_num_threads(1)
    np.savez_compressed(OUT / "optim_lr.npz", **lr_refs())
    np.savez_compressed(OUT / "optim_steps.npz", **step_refs())
    np.savez_compressed(OUT / "optim_gram.npz", **gram_refs())


if __name__ == "__main__":
    main()
