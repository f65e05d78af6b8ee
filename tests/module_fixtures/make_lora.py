"""Reference data for the LoRA adapters and the LoRA fine-tune policy.

Run with the DeePMD-kit venv: ``/tmp/oracle/bin/python tests/module_fixtures/make_lora.py``.

* ``so3/<i>``, ``so2/<i>``: an upstream ``SO3Linear`` / ``SO2Linear`` (float64) wrapped in
  ``LoRASO3`` / ``LoRASO2``, every parameter perturbed by ``0.1 * randn`` (so ``B != 0``);
  keys ``config`` (JSON), ``state/<name>``, ``in``, ``out`` (adapter forward), ``merged/<name>``
  (``build_merged_state_dict``) and ``out_merged`` (forward of ``merge_into_base()``).
* ``policy/<i>``: ``apply_lora_to_sezm`` on a small SeZM model; ``config`` (the normalised
  model section), ``adapters`` (LoRA module names) and ``trainable`` (parameter names left
  trainable), both without the ``atomic_model.`` prefix.

Output: ``tests/data/modules/lora.npz``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from deepmd.pt.model.descriptor.sezm_nn.lora import (
    LoRASO2,
    LoRASO3,
    apply_lora_to_sezm,
    build_merged_state_dict,
)
from deepmd.pt.model.descriptor.sezm_nn.so2 import SO2Linear
from deepmd.pt.model.descriptor.sezm_nn.so3 import SO3Linear
from deepmd.pt.model.model import get_model
from deepmd.utils.argcheck import normalize

OUT = Path(__file__).resolve().parents[1] / "data" / "modules" / "lora.npz"
F64 = torch.float64

SO3_CASES = [
    dict(lmax=2, in_channels=3, out_channels=4, n_focus=1, mlp_bias=False, rank=2, alpha=3.0),
    dict(lmax=1, in_channels=4, out_channels=3, n_focus=2, mlp_bias=True, rank=1, alpha=None),
    dict(lmax=0, in_channels=2, out_channels=2, n_focus=1, mlp_bias=True, rank=3, alpha=1.5),
]
SO2_CASES = [
    dict(
        lmax=2, mmax=1, in_channels=3, out_channels=2, n_focus=1, mlp_bias=False, rank=2, alpha=3.0
    ),
    dict(
        lmax=2, mmax=2, in_channels=2, out_channels=3, n_focus=2, mlp_bias=True, rank=1, alpha=None
    ),
    dict(
        lmax=1, mmax=0, in_channels=2, out_channels=2, n_focus=1, mlp_bias=True, rank=2, alpha=5.0
    ),
]
POLICY_CASES = [
    dict(
        channels=8,
        n_radial=4,
        lmax=2,
        mmax=1,
        n_blocks=2,
        mixing_layers=2,
        n_focus=2,
        n_atten_head=2,
        atten_v_proj=True,
        atten_o_proj=True,
        atten_f_mix=True,
        layer_scale=True,
        so2_attn_res="independent",
        mlp_bias=True,
        edge_norm=True,
        so3_readout="mlp",
        full_attn_res="independent",
        use_amp=False,
        seed=1,
    ),
    dict(
        channels=8,
        n_radial=4,
        lmax=1,
        mmax=1,
        n_blocks=1,
        mixing_layers=2,
        block_attn_res="dependent",
        ffn_so3_grid=True,
        grid_branch=[0, 0, 1],
        message_node_so3=True,
        use_amp=False,
        seed=2,
    ),
]


def perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def store(out: dict, prefix: str, cfg: dict, lora, x: torch.Tensor) -> None:
    out[f"{prefix}/config"] = np.array(json.dumps(cfg))
    for k, v in lora.state_dict().items():
        out[f"{prefix}/state/{k}"] = v.numpy()
    for k, v in build_merged_state_dict(lora).items():
        out[f"{prefix}/merged/{k}"] = v.numpy()
    out[f"{prefix}/in"] = x.numpy()
    with torch.no_grad():
        out[f"{prefix}/out"] = lora(x).numpy()
        out[f"{prefix}/out_merged"] = lora.merge_into_base()(x).numpy()


def linear_cases(out: dict) -> None:
    torch.manual_seed(0)
    for i, cfg in enumerate(SO3_CASES):
        kw = {k: v for k, v in cfg.items() if k not in ("rank", "alpha")}
        base = SO3Linear(**kw, dtype=F64, trainable=True, seed=i)
        lora = LoRASO3(base, rank=cfg["rank"], alpha=cfg["alpha"])
        perturb(lora, 10 + i)
        x = torch.randn(3, (cfg["lmax"] + 1) ** 2, cfg["n_focus"], cfg["in_channels"], dtype=F64)
        store(out, f"so3/{i}", cfg, lora, x)
    for i, cfg in enumerate(SO2_CASES):
        kw = {k: v for k, v in cfg.items() if k not in ("rank", "alpha")}
        base = SO2Linear(**kw, dtype=F64, trainable=True, seed=i)
        lora = LoRASO2(base, rank=cfg["rank"], alpha=cfg["alpha"])
        perturb(lora, 20 + i)
        lmax, mmax = cfg["lmax"], cfg["mmax"]
        dim = lmax + 1 + sum(2 * (lmax - m + 1) for m in range(1, mmax + 1))
        x = torch.randn(cfg["n_focus"], 4, dim, cfg["in_channels"], dtype=F64)
        store(out, f"so2/{i}", cfg, lora, x)


def policy_cases(out: dict) -> None:
    for i, desc in enumerate(POLICY_CASES):
        raw = {
            "model": {
                "type": "dpa4",
                "type_map": ["O", "H"],
                "descriptor": {"type": "dpa4", "rcut": 4.0, **desc},
                "fitting_net": {"type": "dpa4_ener", "neuron": [16], "seed": 3},
                "lora": {"rank": 2, "alpha": 4.0},
            },
            "training": {"training_data": {"systems": ["x"]}, "numb_steps": 1},
        }
        params = normalize(raw)["model"]
        model = get_model(json.loads(json.dumps(params)))
        apply_lora_to_sezm(model, rank=2, alpha=4.0)
        strip = lambda name: name.removeprefix("atomic_model.")  # noqa: E731
        adapters = [strip(n) for n, m in model.named_modules() if isinstance(m, (LoRASO3, LoRASO2))]
        trainable = [strip(n) for n, p in model.named_parameters() if p.requires_grad]
        out[f"policy/{i}/config"] = np.array(json.dumps(params))
        out[f"policy/{i}/adapters"] = np.array(sorted(adapters))
        out[f"policy/{i}/trainable"] = np.array(sorted(trainable))


def main() -> None:
    out: dict[str, np.ndarray] = {}
    linear_cases(out)
    policy_cases(out)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({len(out)} arrays)")


if __name__ == "__main__":
    main()
