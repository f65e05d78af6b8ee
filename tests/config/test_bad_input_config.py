"""Bad input files for `sezm train`: each mistake ends in one `sezm: error:` line that names
the file, the key and what is expected, with exit status 2 and no traceback. Every case stops
before any data statistics or training."""

from __future__ import annotations

import pytest
from tiny_run import tiny_config, write_input

from sezm.cli import run


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Files a run writes to the working folder (out.json, lcurve.out) go to the test's own."""
    monkeypatch.chdir(tmp_path)


def _set(path: str, value):
    """A mutation setting ``a/b/c`` of the config to ``value`` (``DELETE``: remove it)."""

    def mutate(config: dict) -> None:
        *parents, last = path.split("/")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value

    return mutate


DELETE = object()

CASES = {
    "misspelt descriptor key": (_set("model/descriptor/chanels", 8), ["chanels", "channels"]),
    "misspelt section": (_set("trainig", {}), ["trainig", "training"]),
    "misspelt training key": (_set("training/numb_step", 3), ["numb_step"]),
    "disp_freq 0": (_set("training/disp_freq", 0), ["training/disp_freq", "0", ">= 1"]),
    "negative numb_steps": (_set("training/numb_steps", -5), ["training/numb_steps", "-5"]),
    "numb_epoch 0": (
        lambda c: (c["training"].pop("numb_steps"), c["training"].update(numb_epoch=0)),
        ["numb_epoch", "> 0"],
    ),
    "steps and epochs": (_set("training/numb_epoch", 2), ["numb_steps", "numb_epoch", "exclude"]),
    "tensorboard_freq 0": (_set("training/tensorboard_freq", 0), ["tensorboard_freq", ">= 1"]),
    "duplicate type_map": (_set("model/type_map", ["O", "H", "O"]), ["model/type_map", "twice"]),
    "type_map not a list": (_set("model/type_map", "O H"), ["model/type_map"]),
    "channels not a number": (_set("model/descriptor/channels", "eight"), ["channels", "eight"]),
    "rcut as a string": (_set("model/descriptor/rcut", "6.0"), ["rcut"]),
    "model type": (_set("model/type", "se_e2_a"), ["model/type", "se_e2_a"]),
    "fitting type": (_set("model/fitting_net/type", "dipole"), ["fitting_net", "dipole"]),
    "loss type": (_set("loss/type", "energy"), ["loss", "energy"]),
    "optimizer type": (_set("optimizer/type", "SGD"), ["optimizer", "SGD"]),
    "learning-rate type": (_set("learning_rate/type", "step"), ["learning_rate", "step"]),
    "no start_lr": (_set("learning_rate/start_lr", DELETE), ["learning_rate/start_lr"]),
    "stop_lr and ratio": (
        _set("learning_rate/stop_lr_ratio", 0.01),
        ["stop_lr", "stop_lr_ratio", "exclude"],
    ),
    "wsd decay_type": (_set("learning_rate/decay_type", "cubic"), ["decay_type", "cosine"]),
    "warm-up too long": (_set("learning_rate/warmup_ratio", 1.0), ["warmup_ratio", "numb_steps"]),
    "no training data": (_set("training/training_data", DELETE), ["training_data"]),
    "no systems": (_set("training/training_data/systems", DELETE), ["systems"]),
    "stat_file_mode read": (
        _set("training/stat_file_mode", "read"),
        ["training/stat_file_mode", "'read' needs `stat_file`"],
    ),
    "ema_decay 1": (_set("training/ema_decay", 1.0), ["ema_decay", "< 1"]),
    "ckpt_keep_ratio": (_set("training/ckpt_keep_ratio", 1.5), ["ckpt_keep_ratio", "1.5"]),
    "ema with zero_stage 2": (
        lambda c: c["training"].update(enable_ema=True, zero_stage=2),
        ["enable_ema", "zero_stage"],
    ),
    "validation_freq 0": (_set("validating/validation_freq", 0), ["validation_freq", ">= 1"]),
    "max_best_ckpt 0": (_set("validating/max_best_ckpt", 0), ["max_best_ckpt", ">= 1"]),
    "full validation without a metric weight": (
        lambda c: (
            c["validating"].update(full_validation=True, validation_metric="V:MAE"),
            c["loss"].update(start_pref_v=0),
        ),
        ["validation_metric", "V:MAE"],
    ),
    "full validation without data": (
        lambda c: (
            c["validating"].update(full_validation=True),
            c["training"].pop("validation_data"),
        ),
        ["validation_data"],
    ),
    "unknown metric": (
        lambda c: c["validating"].update(full_validation=True, validation_metric="Q:MAE"),
        ["validation_metric", "Q:MAE"],
    ),
    "seed as a string": (_set("training/seed", "one"), ["training/seed"]),
    "gradient_max_norm as a list": (
        _set("training/gradient_max_norm", [1.0]),
        ["gradient_max_norm"],
    ),
    "lmax negative": (_set("model/descriptor/lmax", "two"), ["lmax"]),
    "fitting neuron not a list": (_set("model/fitting_net/neuron", "big"), ["neuron"]),
    "bridging_method": (
        _set("model/bridging_method", "LJ"),
        ["`model/bridging_method`", "'LJ'", "'ZBL', 'None'", "any case"],
    ),
}


@pytest.mark.parametrize(("mutate", "expected"), CASES.values(), ids=CASES.keys())
def test_bad_input_file(tmp_path, capsys, mutate, expected) -> None:
    config = tiny_config()
    mutate(config)
    inp = write_input(tmp_path, config=config)
    assert run(["train", str(inp), "--skip-neighbor-stat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sezm: error: "), err
    assert str(inp) in err, err
    for text in expected:
        assert text in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "not valid JSON"),
        ("{'model': {}}", "not valid JSON"),
        ('{"model": {"type": "dpa4"},}', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('"model"', "JSON object"),
    ],
    ids=["empty", "single quotes", "trailing comma", "a list", "a string"],
)
def test_input_that_is_not_a_json_object(tmp_path, capsys, content, expected) -> None:
    inp = tmp_path / "input.json"
    inp.write_text(content)
    assert run(["train", str(inp)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_missing_input_file_is_named(tmp_path, capsys) -> None:
    assert run(["train", str(tmp_path / "nowhere.json")]) == 2
    assert f"input file not found: {tmp_path / 'nowhere.json'}" in capsys.readouterr().err


def test_input_is_a_folder(tmp_path, capsys) -> None:
    assert run(["train", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "Traceback" not in err


def test_unknown_command_line_option_is_status_2(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        run(["train", "input.json", "--numb-step", "3", "--bogus"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_numb_steps_option_must_be_an_integer(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        run(["train", "input.json", "--numb-steps", "ten"])
    assert stop.value.code == 2
    assert "--numb-steps: invalid int value: 'ten'" in capsys.readouterr().err
