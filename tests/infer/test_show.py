"""`sezm show` (like `dp --pt show`) and `sezm doc-train-input`.

The parameter counts and observed types of the `tiny` checkpoint are what DeePMD-kit 3.2's
`dp --pt show model.pt size observed-type` prints for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import zipfile
from pathlib import Path

import pytest
import torch

from sezm.cli import build_parser, run
from sezm.config.doc import doc_train_input
from sezm.infer.show import ATTRIBUTES, show

DATA = Path(__file__).parents[1] / "data"
TINY = DATA / "parity" / "tiny" / "model.pt"


def _tiny_params() -> dict:
    raw = torch.load(TINY, map_location="cpu", weights_only=True)
    return raw["model"]["_extra_state"]["model_params"]


def test_every_attribute_of_a_checkpoint() -> None:
    lines = show(TINY)
    assert lines[0] == f"This is a singletask model (checkpoint {TINY})"
    assert "The type_map is ['O', 'H']" in lines
    descriptor = next(x for x in lines if x.startswith("The descriptor parameter is "))
    assert json.loads(descriptor.split(" is ", 1)[1]) == _tiny_params()["descriptor"]
    assert any(x.startswith('The fitting_net parameter is {"neuron": [0]') for x in lines)
    assert "The rcut is 6.0" in lines
    assert "The sel is 256" in lines
    assert lines[lines.index("Parameter counts:") + 1 :][:3] == [
        "Parameters in descriptor: 29,457",  # dp show's numbers
        "Parameters in fitting-net: 2,240",
        "Parameters in total: 31,697",
    ]
    assert "Number of observed types: 2 " in lines
    assert "Observed types: ['H', 'O'] " in lines
    assert "Training steps: 3 (train_infos.step 2, learning rate 0.0005 at the last step)" in lines
    assert any(x.startswith("Written with: versions are not recorded") for x in lines)
    assert not any(x.startswith("Available model branches") for x in lines)


def test_attributes_come_in_a_fixed_order(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="sezm"):
        assert run(["show", str(TINY), "sel", "type-map", "rcut"]) == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "sezm"]
    start = next(i for i, m in enumerate(messages) if m.startswith("This is a singletask"))
    assert messages[start + 1 :] == [
        "The type_map is ['O', 'H']",
        "The rcut is 6.0",
        "The sel is 256",
    ]


def test_unknown_attribute_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        run(["show", str(TINY), "serialization-tree"])
    assert info.value.code == 2
    assert "invalid attribute 'serialization-tree' (choose from model-branch" in (
        capsys.readouterr().err
    )


def test_model_branch_needs_a_multitask_model(capsys) -> None:
    assert run(["show", str(TINY), "model-branch"]) == 2
    assert f"{TINY}: attribute 'model-branch' needs a multi-task model" in capsys.readouterr().err


def test_multitask_checkpoint(tmp_path) -> None:
    raw = torch.load(TINY, map_location="cpu", weights_only=True)["model"]
    params = raw["_extra_state"]["model_params"]
    state = {k.replace("Default", "b"): v for k, v in raw.items() if k != "_extra_state"}
    state.update({k.replace("Default", "a"): v for k, v in raw.items() if k != "_extra_state"})
    state["_extra_state"] = {
        "model_params": {
            "model_dict": {
                "a": {**params, "info": {"observed_type": ["O"]}},
                "b": {**params, "info": {}, "model_branch_alias": ["water"]},
            }
        },
        "train_infos": {"lr": 1e-3, "step": 9},
    }
    path = tmp_path / "multi.pt"
    torch.save({"model": state, "optimizer": {}, "sezm": {"next_step": 10}}, path)
    lines = show(path)
    assert lines[0].startswith("This is a multitask model")
    assert lines[1].startswith("Available model branches are ['a', 'b', 'RANDOM']")
    assert "  b: alias ['water'], info {}" in lines
    assert "The type_map of branch a is ['O', 'H']" in lines
    assert "The rcut of branch b is 6.0" in lines
    assert "Parameter counts for a single branch model (branch a):" in lines
    assert "a: Observed types: ['O'] " in lines  # info.observed_type first
    assert "b: Observed types: ['H', 'O'] " in lines  # from out_bias, by atomic number
    assert "TOTAL observed types in the model: ['H', 'O'] " in lines
    assert "Training steps: 10 (train_infos.step 9, learning rate 0.001 at the last step)" in lines
    assert any("holds sezm's run state" in x for x in lines)


def _fake_pt2(path: Path, meta: dict, model_def: dict | None) -> Path:
    """A zip with a .pt2's extra files only (show reads nothing else)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("frozen_model/extra/metadata.json", json.dumps(meta))
        if model_def is not None:
            zf.writestr("frozen_model/extra/model_def_script.json", json.dumps(model_def))
    return path


def test_frozen_model(tmp_path) -> None:
    meta = {
        "type_map": ["O", "H"],
        "rcut": 6.0,
        "sel": [256],
        "sezm": {
            "version": "9.9.9",
            "torch_version": "2.99.0",
            "checkpoint": "model.ckpt-3.pt",
            "head": None,
        },
    }
    path = _fake_pt2(tmp_path / "frozen_model.pt2", meta, _tiny_params())
    lines = show(path)
    assert (
        lines[0] == f"This is a singletask model (frozen model {path}, frozen from model.ckpt-3.pt)"
    )
    assert "Written with sezm 9.9.9, torch 2.99.0" in lines
    assert "Parameters in total: 31,697" in lines
    assert "The sel is 256" in lines  # the configuration first, as DeePMD-kit
    assert "Training steps: not recorded in a frozen model (frozen from model.ckpt-3.pt)" in lines
    assert "Observed types: ['H', 'O'] " in lines

    bare = _fake_pt2(
        tmp_path / "other.pt2", {"type_map": ["O", "H"], "rcut": 5.0, "sel": [9]}, None
    )
    lines = show(bare, ["type-map", "rcut", "sel", "descriptor", "observed-type", "versions"])
    assert lines[1:] == [
        "The type_map is ['O', 'H']",
        "The descriptor parameter is not recorded",
        "The rcut is 5.0",
        "The sel is [9]",
        "The observed types for this model: not recorded",
        "Written with: not recorded (a .pt2 without sezm metadata: DeePMD-kit's)",
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.pt", b"not a checkpoint", "neither a .pt2 (by its suffix) nor a readable PyTorch"),
        ("broken.pt2", b"not a zip", "not a .pt2 package (not a zip archive)"),
        ("missing.pt", None, "model not found"),
    ],
)
def test_unreadable_files_are_named(name, content, message, tmp_path, capsys) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert run(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_doc_train_input(capsys, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="sezm"):
        assert run(["doc-train-input"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(".. _`model`: ")
    assert "argument path: ``model[dpa4]/descriptor[dpa4]/rcut``" in text
    assert "argument path: ``training/numb_steps``" in text
    assert not any("torch" in r.getMessage() for r in caplog.records)  # no versions line
    assert run(["doc-train-input", "--out-type", "json_schema", "--multi-task"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "model_dict" in schema["properties"]["model"]["properties"]
    declarations = json.loads(doc_train_input("json"))
    assert [d["name"] for d in declarations][:2] == ["model", "learning_rate"]


def test_every_option_has_help() -> None:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name in ("show", "doc-train-input"):
        for option in action.choices[name]._actions:
            if not isinstance(option, argparse._HelpAction):
                assert option.help, (name, option.dest)
    assert all(name in action.choices["show"].format_help() for name in ATTRIBUTES)
