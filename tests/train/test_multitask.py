"""Multi-task training: shared descriptor and case-FiLM fitting, per-branch curves, checkpoints
holding every branch, evaluation branch by branch, exact restart."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_run import tiny_config

import sezm
from sezm.cli import main
from sezm.config import normalize_input
from sezm.train.branches import layout_of
from sezm.train.multitask import BranchDraw, case_indices, model_prob
from sezm.train.progress import LearningCurve

DATA = Path(__file__).parents[1] / "data"
MOLS = DATA / "systems" / "nopbc"


def write_input(tmp_path: Path, steps: int = 4) -> Path:
    tiny = json.loads((DATA / "parity" / "tiny" / "input.json").read_text())
    desc = {**tiny["model"]["descriptor"], "channels": 8, "n_radial": 4}
    fit = {"neuron": [0], "dim_case_embd": 2, "case_film_embd": True, "seed": 1}
    branch = {"type": "dpa4", "type_map": "tm", "descriptor": "desc", "fitting_net": "fit"}
    loss = {**tiny["loss"]}

    def data(system: str, valid: str | None) -> dict:
        out = {"training_data": {"systems": [str(MOLS / system)], "batch_size": 1}}
        if valid:
            out["validation_data"] = {"systems": [str(MOLS / valid)], "batch_size": 1}
        return out

    config = {
        "model": {
            "shared_dict": {"tm": ["C", "H", "O"], "desc": desc, "fit": fit},
            "model_dict": {
                "mol_1": {**branch, "model_branch_alias": ["Mol"]},
                "mol_2": {**branch, "model_branch_alias": ["Mol2"]},
            },
        },
        "learning_rate": tiny["learning_rate"],
        "loss_dict": {"mol_1": loss, "mol_2": loss},
        "optimizer": tiny["optimizer"],
        "training": {
            "model_prob": {"mol_1": 0.5, "mol_2": 0.5},
            "data_dict": {"mol_1": data("C1H4O2", "C3H3O4"), "mol_2": data("C4H3O1", None)},
            "numb_steps": steps,
            "disp_freq": 2,
            "save_freq": 2,
            "seed": 3,
        },
    }
    path = tmp_path / "input.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_multitask_run_checkpoint_and_restart(run_dir) -> None:
    inp = write_input(run_dir)
    main(["train", str(inp), "--skip-neighbor-stat"])

    # learning curve: DeePMD-kit's per-branch columns
    lines = (run_dir / "lcurve.out").read_text().splitlines()
    header = lines[0].split()
    assert header[:2] == ["#", "step"] and header[-1] == "lr"
    assert "mae_e_val_mol_1" in header and "mae_e_trn_mol_1" in header
    assert "mae_e_trn_mol_2" in header and "mae_e_val_mol_2" not in header
    full = [ln for ln in lines if not ln.startswith("#")]
    assert [int(ln.split()[0]) for ln in full] == [1, 2, 4]

    # one checkpoint, every branch; shared tensors equal, per-branch ones not
    raw = torch.load(run_dir / "model.ckpt.pt", weights_only=True)["model"]
    params = raw["_extra_state"]["model_params"]
    assert set(params["model_dict"]) == {"mol_1", "mol_2"}
    assert "shared_dict" in params
    one, two = "model.mol_1.atomic_model.", "model.mol_2.atomic_model."
    keys = [k[len(one) :] for k in raw if k.startswith(one)]
    assert keys and all(two + k in raw for k in keys)
    for k in keys:
        same = torch.equal(raw[one + k], raw[two + k])
        if k.startswith(("descriptor.", "fitting_net.filter_layers.")):
            assert same, k
    assert raw[one + "fitting_net.case_embd"].tolist() == [1.0, 0.0]
    assert raw[two + "fitting_net.case_embd"].tolist() == [0.0, 1.0]

    # each branch evaluates on its own (name or alias)
    system = MOLS / "C1H4O2"
    coord = np.load(system / "set.000" / "coord.npy")[:1]
    atype = np.loadtxt(system / "type.raw", dtype=int)  # C H O, as the model's type_map
    e1 = sezm.DeepPot(run_dir / "model.ckpt.pt", head="Mol").eval(coord, None, atype)[0]
    e2 = sezm.DeepPot(run_dir / "model.ckpt.pt", head="mol_2").eval(coord, None, atype)[0]
    e_ref = np.load(system / "set.000" / "energy.npy")[0]
    assert abs(e1.item() - e_ref) / len(atype) < 1.0
    assert e1.item() != e2.item()
    with pytest.raises(ValueError, match="choose a head"):
        sezm.DeepPot(run_dir / "model.ckpt.pt")

    # exact restart from the middle
    (run_dir / "model.ckpt-4.pt").unlink()
    main(["train", str(inp), "--skip-neighbor-stat", "--restart", "model.ckpt-2"])
    again = [ln for ln in (run_dir / "lcurve.out").read_text().splitlines() if ln[0] != "#"]
    assert again == full


def test_case_indices_and_model_prob() -> None:
    branches = {"b": {"fitting_net": {"dim_case_embd": 2}}, "a": {"fitting_net": {}}}
    with pytest.raises(ValueError, match="dim_case_embd"):
        case_indices(branches)
    branches["a"]["fitting_net"]["dim_case_embd"] = 2
    assert case_indices(branches) == {"a": 0, "b": 1}
    prob = model_prob({"model_prob": {"a": 3, "b": 1}}, ["a", "b"], {"a": 1, "b": 1})
    assert prob.tolist() == [0.75, 0.25]
    assert model_prob({}, ["a", "b"], {"a": 1, "b": 3}).tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="missing"):
        model_prob({"model_prob": {"a": 1}}, ["a", "b"], {"a": 1, "b": 1})


def test_single_task_is_one_default_branch(tmp_path) -> None:
    """A single-task input is a run with one unnamed branch ``Default``: the same curve writer
    gives DeePMD-kit's single-task columns, and with named branches its multi-task ones."""
    single = normalize_input(tiny_config())
    (spec,) = layout_of(single).specs(single)
    assert (spec.name, spec.label, spec.where) == ("Default", "", "training")
    assert spec.loss is single["loss"] and spec.data is single["training"]
    multi = normalize_input(json.loads(write_input(tmp_path).read_text()))
    specs = layout_of(multi).specs(multi)
    assert [(s.name, s.label, s.where) for s in specs] == [
        ("mol_1", "mol_1", "training/data_dict/mol_1"),
        ("mol_2", "mol_2", "training/data_dict/mol_2"),
    ]
    assert BranchDraw(["Default"], np.ones(1), seed=None).next() == "Default"

    def rows(labels: dict[str, str], train: dict, valid: dict) -> list[str]:
        out = io.StringIO()
        LearningCurve(out, labels, write_header=True).write(7, 1e-3, train, valid)
        return out.getvalue().splitlines()

    metrics = {"rmse_f": 0.5, "rmse_e": 0.25}
    head, _, row = rows({"Default": ""}, {"Default": metrics}, {"Default": {"rmse_e": 1.0}})
    assert head.split() == [
        "#",
        "step",
        "rmse_e_val",
        "rmse_e_trn",
        "rmse_f_val",
        "rmse_f_trn",
        "lr",
    ]
    assert row.split() == ["7", "1.00e+00", "2.50e-01", "nan", "5.00e-01", "1.0e-03"]
    head, _, row = rows({"a": "a", "b": "b"}, {"a": metrics, "b": metrics}, {"a": {}, "b": metrics})
    assert head.split()[2:5] == ["rmse_e_trn_a", "rmse_f_trn_a", "rmse_e_val_b"]
    assert row.split()[1:4] == ["2.50e-01", "5.00e-01", "2.50e-01"]
