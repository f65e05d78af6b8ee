"""LoRA: adapter parity with DeePMD-kit (module outputs, merged weights, the trainable/frozen
policy), upstream LoRA checkpoints, and a LoRA fine-tune run with exact restart and a merged
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import finetune_input, pretrained_checkpoint

import sezm
from sezm.cli import main
from sezm.compat.deepmd import load_checkpoint, load_into
from sezm.config import ConfigError, normalize_model
from sezm.model.build import build_model
from sezm.nn.linear import SO3Linear
from sezm.nn.so2 import SO2Linear
from sezm.train.lora import ADAPTERS, apply_lora, fold_lora, merged_state_dict
from sezm.train.lora_adapters import LoRASO2, LoRASO3

DATA = Path(__file__).parents[1] / "data"
FIXTURE = DATA / "modules" / "lora.npz"
MOLS = DATA / "systems" / "nopbc"


def fixture(prefix: str) -> dict:
    with np.load(FIXTURE) as data:
        return {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}


def group(case: dict, name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) :]: torch.as_tensor(v) for k, v in case.items() if k.startswith(name)}


def adapter(kind: str, cfg: dict):
    widths = cfg["in_channels"], cfg["out_channels"]
    common = dict(n_focus=cfg["n_focus"], dtype=torch.float64, mlp_bias=cfg["mlp_bias"])
    if kind == "so3":
        return LoRASO3(SO3Linear(cfg["lmax"], *widths, **common), cfg["rank"], cfg["alpha"])
    common.update(in_channels=widths[0], out_channels=widths[1])
    return LoRASO2(
        SO2Linear(lmax=cfg["lmax"], mmax=cfg["mmax"], **common), cfg["rank"], cfg["alpha"]
    )


@pytest.mark.parametrize("case", [f"{k}/{i}" for k in ("so3", "so2") for i in range(3)])
def test_adapter_matches_upstream(case: str) -> None:
    ref = fixture(case + "/")
    cfg = json.loads(str(ref["config"]))
    module = adapter(case.split("/")[0], cfg)
    module.load_state_dict(group(ref, "state/"), strict=True)
    x = torch.as_tensor(ref["in"])
    out = module(x)
    assert torch.allclose(out, torch.as_tensor(ref["out"]), rtol=1e-12, atol=1e-12)
    merged = merged_state_dict(module)
    want = group(ref, "merged/")
    assert merged.keys() == want.keys()
    assert all(torch.allclose(merged[k].to(want[k].dtype), want[k], atol=1e-13) for k in want)
    assert fold_lora(module.state_dict()).keys() == want.keys()
    plain = SO3Linear if case.startswith("so3") else SO2Linear
    base = next(c for c in type(module).__mro__ if c is plain)
    widths = cfg["in_channels"], cfg["out_channels"]
    kwargs = dict(n_focus=cfg["n_focus"], dtype=torch.float64, mlp_bias=cfg["mlp_bias"])
    if base is SO3Linear:
        plain_module = base(cfg["lmax"], *widths, **kwargs)
    else:
        plain_module = base(
            lmax=cfg["lmax"],
            mmax=cfg["mmax"],
            in_channels=widths[0],
            out_channels=widths[1],
            **kwargs,
        )
    plain_module.load_state_dict(merged, strict=True)
    assert torch.equal(plain_module(x), out.detach())  # merged forward == adapter forward


@pytest.mark.parametrize("case", [0, 1])
def test_policy_matches_upstream(case: int) -> None:
    ref = fixture(f"policy/{case}/")
    model = apply_lora(build_model(json.loads(str(ref["config"]))), 2, 4.0, seed=0)
    adapters = sorted(n for n, m in model.named_modules() if isinstance(m, ADAPTERS))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert adapters == ref["adapters"].tolist()
    assert trainable == ref["trainable"].tolist()


def test_upstream_lora_checkpoint_adapters_equal_folded() -> None:
    """Upstream's LoRA checkpoint (adapters trained and perturbed) evaluated with the adapters
    kept and folded at load; both give upstream's energy."""
    path = DATA / "parity" / "lora" / "model.pt"
    ckpt = load_checkpoint(path)
    assert any(k.endswith(".B_m0") for k in ckpt.state)
    lora = ckpt.model_params["lora"]
    adapted = apply_lora(build_model(ckpt.model_params), lora["rank"], lora["alpha"])
    load_into(adapted, dict(ckpt.state), str(path))  # adapter keys load as they are
    folded = sezm.DeepPot(path)
    ref = np.load(DATA / "parity" / "lora" / "expected.npz")
    name = "water_pbc_0"
    coord, box, atype = ref[f"{name}/coord"], ref[f"{name}/box"], ref[f"{name}/atype"]
    e_fold = folded.eval(coord.reshape(1, -1), box.reshape(1, 9), atype)[0].item()
    folded.model = adapted.eval()
    e_adapt = folded.eval(coord.reshape(1, -1), box.reshape(1, 9), atype)[0].item()
    e_ref = ref[f"{name}/energy"].item()
    assert abs(e_fold - e_ref) / len(atype) < 1e-5
    assert abs(e_adapt - e_fold) / len(atype) < 1e-6


def test_lora_is_single_task_only() -> None:
    branch = {"type": "dpa4", "type_map": "tm", "descriptor": "d", "lora": {"rank": 2}}
    raw = {"shared_dict": {"tm": ["O"], "d": {"rcut": 4.0}}, "model_dict": {"a": branch}}
    with pytest.raises(ConfigError, match="single-task"):
        normalize_model(raw)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_lora_finetune_restart_and_merged_checkpoint(run_dir) -> None:
    pre, _ = pretrained_checkpoint(run_dir / "pre.pt", ["C", "H", "O"])
    config = finetune_input(["C", "H", "O"], steps=2, lora={"rank": 2, "alpha": 4.0})
    config["training"]["save_freq"] = 1
    (run_dir / "input.json").write_text(json.dumps(config))
    args = ["train", "input.json", "--skip-neighbor-stat"]
    main([*args, "--finetune", "pre.pt"])
    curve = (run_dir / "lcurve.out").read_text()

    # the latest checkpoint keeps the adapters (trained) and the frozen weights (untouched)
    raw = torch.load(run_dir / "model.ckpt-2.pt", weights_only=True)["model"]
    assert raw["_extra_state"]["model_params"]["lora"] == {"rank": 2, "alpha": 4.0}
    desc = "model.Default.atomic_model.descriptor."
    b_keys = [k for k in raw if k.endswith((".B_by_l", ".B_m0"))]
    assert b_keys and any(raw[k].abs().max() > 0 for k in b_keys)
    frozen = ["type_embedding.adam_type_embedding", "blocks.0.so2_conv.so2_linears.0.weight_m0"]
    for key in frozen:
        assert torch.equal(raw[desc + key], pre.state_dict()["descriptor." + key])

    # the merged checkpoint: a plain DPA4 checkpoint with the same numbers
    merged = torch.load(run_dir / "model.ckpt_merged.pt", weights_only=True)["model"]
    assert "lora" not in merged["_extra_state"]["model_params"]
    assert not [k for k in merged if ".A_" in k or ".B_" in k or "lora_scaling" in k]
    system = MOLS / "C3H3O4"
    coord = np.load(system / "set.000" / "coord.npy")[:2]
    atype = np.loadtxt(system / "type.raw", dtype=int)
    e_merged, f_merged, _ = sezm.DeepPot(run_dir / "model.ckpt_merged.pt").eval(coord, None, atype)
    e_folded, f_folded, _ = sezm.DeepPot(run_dir / "model.ckpt-2.pt").eval(coord, None, atype)
    assert np.allclose(e_merged, e_folded, rtol=0, atol=1e-9)
    assert np.allclose(f_merged, f_folded, rtol=0, atol=1e-9)

    # restart from step 1 resumes the adapters exactly
    (run_dir / "model.ckpt-2.pt").unlink()
    main([*args, "--restart", "model.ckpt-1.pt"])
    assert (run_dir / "lcurve.out").read_text() == curve
