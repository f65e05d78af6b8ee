"""Fine-tuning (``--finetune``): branch rules, weight transfer with a changed type_map, the
change-by-statistic energy bias, a new fitting, ``--use-pretrain-script``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.config import normalize_input, normalize_model
from sezm.data.graph import build_graph
from sezm.model.build import build_model
from sezm.train.checkpoint import branches_state, model_state
from sezm.train.finetune import finetune_rules
from sezm.train.trainer import Resume, Trainer

DATA = Path(__file__).parents[1] / "data"
MOLS = DATA / "systems" / "nopbc"
WATER = DATA / "systems" / "water"
DESC = {
    "rcut": 4.0,
    "channels": 8,
    "n_radial": 4,
    "n_blocks": 1,
    "lmax": 1,
    "mmax": 1,
    "mixing_layers": 2,
    "radial_so2_mode": "none",
    "edge_norm": False,
    "use_amp": False,
    "seed": 1,
}


def model_section(type_map: list[str], **desc) -> dict:
    raw = {
        "type": "dpa4",
        "type_map": type_map,
        "descriptor": {**DESC, **desc},
        "fitting_net": {"neuron": [16], "seed": 2},
    }
    return normalize_model(raw)


def perturbed_model(params: dict, seed: int):
    model = build_model(params)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        n = len(params["type_map"])
        model.out_bias.copy_(-10.0 * torch.arange(1, n + 1, dtype=torch.float64).view(1, n, 1))
        model.fitting_net.bias_atom_e.copy_(torch.randn(n, 1, generator=gen, dtype=torch.float64))
    return model


def pretrained_checkpoint(path: Path, type_map: list[str], seed: int = 0, **desc):
    """A single-task checkpoint with perturbed weights; returns (model, params)."""
    params = model_section(type_map, **desc)
    model = perturbed_model(params, seed)
    torch.save({"model": model_state(model, params, 1e-3, 9)}, path)
    return model, params


def finetune_input(type_map: list[str], steps: int = 1, **model) -> dict:
    raw = {
        "model": {"type": "dpa4", "type_map": type_map, "descriptor": dict(DESC), **model},
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-4},
        "loss": {"type": "ener", "start_pref_e": 1, "limit_pref_e": 1},
        "training": {
            "training_data": {"systems": [str(p) for p in sorted(MOLS.iterdir())]},
            "numb_steps": steps,
            "disp_freq": 1,
            "save_freq": steps,
            "seed": 5,
        },
    }
    raw["model"].setdefault("fitting_net", {"neuron": [16], "seed": 2})
    return normalize_input(raw)


def trainer(config: dict, path: Path, **resume) -> Trainer:
    return Trainer(config, Resume(finetune=str(path), skip_neighbor_stat=True, **resume))


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def water_graph(rcut: float):
    coord = np.load(WATER / "data_0" / "set.000" / "coord.npy")[:1].reshape(1, -1, 3)
    box = np.load(WATER / "data_0" / "set.000" / "box.npy")[:1].reshape(1, 3, 3)
    atype = np.loadtxt(WATER / "data_0" / "type.raw", dtype=int)[None]  # 0 = O, 1 = H
    return lambda order: build_graph(coord, box, order[atype], rcut)


def net_energy(model, graph) -> torch.Tensor:
    """Atomic energies without ``out_bias`` (what the transferred weights alone give)."""
    with torch.no_grad():
        e = model.atomic_energy(graph, graph.edge_vec)
    return e - model.out_bias[0, graph.atype, 0]


def test_changed_type_map_keeps_rows_by_element(run_dir) -> None:
    pre, _ = pretrained_checkpoint(run_dir / "pre.pt", ["O", "H"])
    tr = trainer(finetune_input(["H", "O", "C"]), run_dir / "pre.pt")
    new = tr.model
    fresh = build_model(tr.model_params)  # what a new H, O, C model starts from
    for key in (
        "descriptor.type_embedding.adam_type_embedding",
        "descriptor.env_seed_embedding.env_type_embed.adam_type_embedding",
    ):
        old_rows, new_rows = pre.state_dict()[key], new.state_dict()[key]
        assert torch.equal(new_rows[0], old_rows[1]) and torch.equal(new_rows[1], old_rows[0])
        assert torch.equal(new_rows[2:], fresh.state_dict()[key][2:])  # C and the padding row
    bias = new.fitting_net.bias_atom_e
    assert bias[:2].tolist() == pre.fitting_net.bias_atom_e[[1, 0]].tolist()
    assert bias[2].item() == 0.0
    same = [k for k in pre.state_dict() if "type_embed" not in k and "bias" not in k]
    same.remove("out_std")
    assert all(torch.equal(pre.state_dict()[k], new.state_dict()[k]) for k in same)
    # the same water frame, O/H relabelled: identical energies apart from out_bias
    graph = water_graph(new.rcut)
    e_pre = net_energy(pre, graph(np.array([0, 1])))
    e_new = net_energy(new.eval(), graph(np.array([1, 0])))
    assert torch.allclose(e_pre, e_new, rtol=0, atol=1e-5)


def test_change_by_statistic_solves_the_residual_least_squares(run_dir) -> None:
    pretrained_checkpoint(run_dir / "pre.pt", ["O", "H"])
    tr = trainer(finetune_input(["H", "O", "C"]), run_dir / "pre.pt")
    model = tr.model.eval()
    counts, residual = [], []
    for system in sorted(MOLS.iterdir()):  # every frame is sampled (5 < 10 batches)
        atype = np.loadtxt(system / "type.raw", dtype=int)  # data C H O -> model H O C
        atype = np.array([2, 0, 1])[atype]
        coord = np.load(system / "set.000" / "coord.npy").reshape(-1, len(atype), 3)
        label = np.load(system / "set.000" / "energy.npy")
        graph = build_graph(coord, None, np.tile(atype, (len(coord), 1)), model.rcut)
        with torch.no_grad():
            pred = model.atomic_energy(graph, graph.edge_vec).sum(-1).numpy()
        counts.append(np.tile(np.bincount(atype, minlength=3), (len(coord), 1)))
        residual.append(label - pred)
    counts, residual = np.concatenate(counts), np.concatenate(residual)
    # normal equations of the bias fit: the new bias leaves no residual along any type count
    assert np.abs(counts.T @ residual).max() < 1e-6 * np.abs(counts.T @ counts).max()
    assert torch.allclose(model.out_std, torch.as_tensor(residual.std()).expand_as(model.out_std))


def test_random_fitting_and_branch_rules(run_dir) -> None:
    pre, params = pretrained_checkpoint(run_dir / "pre.pt", ["C", "H", "O"])
    tr = trainer(finetune_input(["C", "H", "O"]), run_dir / "pre.pt", model_branch="RANDOM")
    fresh = build_model(tr.model_params)
    for key, value in tr.model.state_dict().items():
        want = pre.state_dict()[key] if key.startswith("descriptor.") else None
        if want is not None:
            assert torch.equal(value, want), key
        elif key.startswith("fitting_net.filter_layers"):
            assert torch.equal(value, fresh.state_dict()[key]), key
    # set-by-statistic: the plain data statistics (not pretrained out_bias + a shift)
    assert not torch.equal(tr.model.out_bias, pre.out_bias)
    assert tr.model_params["info"] == {}

    # a multi-task pretrained model: branches, aliases, the first branch with a new fitting
    other = perturbed_model(params, 7)
    multi = {"model_dict": {"a": params, "b": {**params, "model_branch_alias": ["B"]}}}
    state = branches_state({"a": pre, "b": other}, multi, 1e-3, 3)
    torch.save({"model": state}, run_dir / "multi.pt")
    tr = trainer(finetune_input(["C", "H", "O"]), run_dir / "multi.pt", model_branch="B")
    head = "fitting_net.filter_layers.networks.0.output_layer.matrix"
    assert torch.equal(tr.model.state_dict()[head], other.state_dict()[head])
    model_cfg = finetune_input(["C", "H", "O"])["model"]
    _, rules = finetune_rules(model_cfg, multi)
    assert (rules["Default"].branch, rules["Default"].random_fitting) == ("a", True)
    with pytest.raises(ValueError, match="no branch"):
        finetune_rules(model_cfg, multi, "c")
    with pytest.raises(ValueError, match="only the 'Default' branch"):
        finetune_rules(model_cfg, params, "a")
    # a multi-task target: a named head, a resumed branch, a new branch
    target = {"model_dict": {"b": dict(model_cfg), "x": {**model_cfg, "finetune_head": "a"}}}
    target["model_dict"]["y"] = dict(model_cfg)
    _, rules = finetune_rules(target, multi)
    assert rules["b"].resuming and rules["b"].branch == "b"
    assert (rules["x"].branch, rules["x"].random_fitting, rules["x"].resuming) == (
        "a",
        False,
        False,
    )
    assert (rules["y"].branch, rules["y"].random_fitting) == ("a", True)


def test_use_pretrain_script_and_cli_run(run_dir) -> None:
    pretrained_checkpoint(run_dir / "pre.pt", ["O", "H"], channels=12)
    config = finetune_input(["H", "O", "C"])
    config["model"]["descriptor"]["trainable"] = False
    with pytest.raises(Exception, match="shape"):  # input descriptor has 8 channels
        trainer(config, run_dir / "pre.pt")
    tr = trainer(config, run_dir / "pre.pt", use_pretrain_script=True)
    desc = tr.model_params["descriptor"]
    assert desc["channels"] == 12 and desc["trainable"] is False
    # the command line: one step, out.json holds the pretrained descriptor
    (run_dir / "input.json").write_text(json.dumps(finetune_input(["H", "O", "C"])))
    from sezm.cli import main

    main(["train", "input.json", "--finetune", "pre.pt", "--use-pretrain-script"])
    assert json.loads((run_dir / "out.json").read_text())["model"]["descriptor"]["channels"] == 12
    raw = torch.load(run_dir / "model.ckpt-1.pt", weights_only=True)["model"]
    assert raw["_extra_state"]["model_params"]["type_map"] == ["H", "O", "C"]
