"""Input schema: equality with DeePMD-kit 3.2's normalization, defaults, aliases and errors.

References under tests/data/config/upstream were produced by DeePMD-kit itself
(tests/data/config/make_upstream_refs.py); these tests need no DeePMD-kit installation.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path

import pytest

from sezm.config import (
    DEFAULT_STOP_LR,
    ConfigError,
    ConfigWarning,
    check_learning_rate,
    check_trainable,
    expand_shared_params,
    input_schema,
    normalize_input,
    normalize_model,
    override_numb_steps,
)
from sezm.config.schema_training import SEZM_ONLY_DATA_KEYS

DATA = Path(__file__).parents[1] / "data" / "config"
VARIATIONS = json.loads((DATA / "variations.json").read_text())
REFS = {p.stem: json.loads(p.read_text()) for p in sorted((DATA / "upstream").glob("*.json"))}
INPUT_REFS = {k: v for k, v in REFS.items() if not k.startswith("checkpoint_")}
ACCEPTED = sorted(
    k for k, v in INPUT_REFS.items() if "normalized" in v and k != "property_input_torch"
)
REJECTED = sorted(k for k, v in INPUT_REFS.items() if "error" in v)
EXAMPLES = sorted(p.name for p in (DATA / "examples").glob("*.json"))

# what sezm fills into an absent `validating` section (DeePMD-kit leaves it `{}`)
VALIDATING_DEFAULTS = {
    "full_validation": False,
    "ema_full_validation": False,
    "validation_freq": 5000,
    "save_best": True,
    "save_best_dir": None,
    "max_best_ckpt": 1,
    "validation_metric": "E:MAE",
    "full_val_file": "val.log",
    "full_val_start": 0.5,
    "compiled_infer": False,
    "tf32_infer": False,
    "amp_infer": False,
}


def _load_fingerprint_module():
    spec = importlib.util.spec_from_file_location("fp", DATA / "schema_fingerprint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FP = _load_fingerprint_module()

MINIMAL_MODEL = {"type": "dpa4", "type_map": ["O", "H"], "descriptor": {"rcut": 6.0}}


def raw_input(name: str) -> dict:
    origin = INPUT_REFS[name]["origin"]
    if origin.startswith("examples/"):
        return json.loads((DATA / origin).read_text())
    return copy.deepcopy(VARIATIONS[origin.split(":", 1)[1]])


def minimal_input() -> dict:
    return {
        "model": copy.deepcopy(MINIMAL_MODEL),
        "learning_rate": {"start_lr": 1e-3},
        "training": {"training_data": {"systems": ["data"]}, "numb_steps": 10},
    }


def quiet_normalize(raw: dict, source: str | None = None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return normalize_input(raw, source)


def reject(raw: dict, source: str | None = "input.json", model_only: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        if model_only:
            normalize_model(raw, source)
        else:
            quiet_normalize(raw, source)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# equality with DeePMD-kit


def test_reference_set_is_complete():
    assert len(ACCEPTED) >= 30
    assert len(REJECTED) >= 15
    assert {r["deepmd_version"] for r in INPUT_REFS.values()} == {"3.2.0"}


def _drop_sezm_data_keys(node: dict) -> int:
    """Remove the sezm-only keys from every data section of a fingerprint; return how many."""
    dropped = 0
    for name, sub in node["fields"]:
        if name in ("training_data", "validation_data"):
            kept = [f for f in sub["fields"] if f[0] not in SEZM_ONLY_DATA_KEYS]
            assert [f[0] for f in sub["fields"][len(kept) :]] == list(SEZM_ONLY_DATA_KEYS)
            dropped += len(sub["fields"]) - len(kept)
            sub["fields"] = kept
        dropped += _drop_sezm_data_keys(sub)
    for variant in node["variants"].values():
        dropped += sum(_drop_sezm_data_keys(c) for c in variant["choices"].values())
    return dropped


@pytest.mark.parametrize("multi_task", [False, True])
def test_schema_declares_what_upstream_declares(multi_task):
    """Every option of DeePMD-kit's input (for the dpa4 model and the losses sezm has): same
    names, order, types, defaults, aliases and switches. The only deliberate differences: no
    `nvnmd` section (TensorFlow only), `model/type` defaults to dpa4, `fitting_net` optional,
    and the data sections' sezm-only keys for files read with ASE (declared last there)."""
    kind = "multi_task" if multi_task else "single_task"
    upstream = json.loads((DATA / "upstream_schema.json").read_text())[kind]
    choices = FP.MULTI_TASK_CHOICES if multi_task else FP.SINGLE_TASK_CHOICES
    mine = FP.fingerprint(input_schema(multi_task), choices)
    assert _drop_sezm_data_keys(mine) == 2 * len(SEZM_ONLY_DATA_KEYS)

    upstream["fields"] = [f for f in upstream["fields"] if f[0] != "nvnmd"]
    model = dict(upstream["fields"])["model"]
    if multi_task:
        model = dict(model["fields"])["model_dict"]
    assert model["variants"]["type"]["default_tag"] == "standard"
    model["variants"]["type"]["default_tag"] = "dpa4"
    dpa4_fields = dict(model["variants"]["type"]["choices"]["dpa4"]["fields"])
    assert dpa4_fields["fitting_net"]["optional"] is False
    dpa4_fields["fitting_net"]["optional"] = True
    assert mine == upstream


def test_descriptor_has_all_upstream_options():
    upstream = json.loads((DATA / "upstream_schema.json").read_text())["single_task"]
    dpa4 = dict(dict(upstream["fields"])["model"]["variants"]["type"]["choices"]["dpa4"]["fields"])
    names = [
        name for name, _ in dpa4["descriptor"]["variants"]["type"]["choices"]["dpa4"]["fields"]
    ]
    assert len(names) == 58
    descriptor = normalize_model(MINIMAL_MODEL)["descriptor"]
    assert list(descriptor) == ["rcut", "type", *[n for n in names if n != "rcut"]]


@pytest.mark.parametrize("name", ACCEPTED)
def test_model_section_identical_to_upstream(name):
    raw = raw_input(name)
    expected = json.dumps(INPUT_REFS[name]["normalized"]["model"])  # key order included
    assert json.dumps(quiet_normalize(raw, name)["model"]) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        assert json.dumps(normalize_model(raw["model"], name)) == expected


@pytest.mark.parametrize("name", ACCEPTED)
def test_other_sections_match_upstream(name):
    """Equal except where sezm fills a section DeePMD-kit leaves absent or empty."""
    raw = raw_input(name)
    mine = json.loads(json.dumps(quiet_normalize(raw, name)))
    upstream = copy.deepcopy(INPUT_REFS[name]["normalized"])
    if "validating" not in raw:
        assert upstream["validating"] == {}
        upstream["validating"] = VALIDATING_DEFAULTS
    if "loss" not in raw and "loss_dict" not in raw:
        assert "loss" not in upstream
        upstream["loss"] = mine["loss"]
        assert mine["loss"]["type"] == ("ener_spin" if "spin" in raw["model"] else "ener")
    optimizer = raw.get("optimizer", {})
    if optimizer.get("type") == "AdamW" and "weight_decay" not in optimizer:
        # `dp train` upgrades inputs with Adam's weight_decay 0.0; the schema default is 0.001
        assert upstream["optimizer"]["weight_decay"] == 0.0
        upstream["optimizer"]["weight_decay"] = 0.001
    assert mine == upstream


@pytest.mark.parametrize("name", REJECTED)
def test_rejects_what_upstream_rejects(name):
    reject(raw_input(name), name)


@pytest.mark.parametrize("case", ["mini", "property", "tiny", "zbl"])
def test_checkpoint_model_params(case):
    """Equal to what DeePMD-kit stored in a trained checkpoint, except the trainer's record of
    the element types it saw in the data (`info.observed_type`)."""
    stored = REFS[f"checkpoint_{case}"]["model_params"]
    assert set(stored["info"]) == {"observed_type"}
    stored["info"] = {}
    raw = json.loads((DATA / "examples" / f"parity_{case}_input.json").read_text())
    assert json.dumps(normalize_model(raw["model"])) == json.dumps(stored)


# ---------------------------------------------------------------------------------------------
# examples and minimal inputs


@pytest.mark.parametrize("filename", EXAMPLES)
def test_every_example_normalizes(filename):
    raw = json.loads((DATA / "examples" / filename).read_text())
    if filename == "property_input_torch.json":  # a DPA1 model: not this model family
        message = reject(raw, filename)
        assert "`model/descriptor/type`" in message and "'dpa1'" in message
        return
    normalized = quiet_normalize(raw, filename)
    assert normalized["model"].get("type") == "dpa4" or "model_dict" in normalized["model"]
    assert "_comment" not in normalized


def test_documented_minimal_model():
    model = normalize_model(MINIMAL_MODEL)
    assert model["descriptor"]["type"] == "dpa4"
    assert model["descriptor"]["sel"] == 256 and isinstance(model["descriptor"]["sel"], int)
    assert model["descriptor"]["channels"] == 64
    fitting = model["fitting_net"]
    assert fitting["type"] == "dpa4_ener"
    assert fitting["neuron"] == [0] and fitting["activation_function"] == "silu"
    assert fitting["precision"] == "float32"
    assert json.dumps(model) == json.dumps(INPUT_REFS["minimal_doc"]["normalized"]["model"])
    assert INPUT_REFS["minimal_doc"]["patched"] == ["model"]  # upstream needed `fitting_net: {}`


def test_minimal_full_input():
    data = normalize_input(minimal_input())
    assert data["loss"]["type"] == "ener" and data["loss"]["start_pref_f"] == 1000
    assert data["optimizer"] == {
        "type": "Adam",
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "weight_decay": 0.0,
    }
    lr = data["learning_rate"]
    assert lr["type"] == "exp" and lr["stop_lr"] == DEFAULT_STOP_LR and lr["decay_steps"] == 5000
    assert data["training"]["validation_data"] is None
    assert data["training"]["disp_freq"] == 1000
    assert data["validating"] == VALIDATING_DEFAULTS


def test_model_type_defaults_to_dpa4():
    model = normalize_model({"type_map": ["O"], "descriptor": {}})
    assert model["type"] == "dpa4"


def test_default_loss_follows_the_fitting():
    raw = minimal_input()
    raw["model"]["fitting_net"] = {"type": "property", "property_name": "gap"}
    assert normalize_input(raw)["loss"]["type"] == "property"
    raw = minimal_input()
    raw["model"]["spin"] = {"use_spin": [True, False], "scheme": "native"}
    assert normalize_input(raw)["loss"]["type"] == "ener_spin"


def test_input_is_not_modified():
    raw = minimal_input()
    before = copy.deepcopy(raw)
    normalize_input(raw)
    assert raw == before


def test_comments_are_dropped():
    data = quiet_normalize(raw_input("comments_everywhere"))
    assert "_comment" not in data and "_c" not in data["model"]
    assert "_note" not in data["model"]["descriptor"]
    assert data["model"]["info"] == {"k": "v"}


# ---------------------------------------------------------------------------------------------
# aliases


@pytest.mark.parametrize("model_type", ["dpa4", "DPA4", "SeZM", "sezm"])
def test_model_and_descriptor_type_aliases(model_type):
    model = normalize_model(
        {**MINIMAL_MODEL, "type": model_type, "descriptor": {"type": model_type}}
    )
    assert model["type"] == "dpa4" and model["descriptor"]["type"] == "dpa4"


def test_option_aliases():
    raw = minimal_input()
    raw["model"]["descriptor"]["so2_layers"] = 2
    raw["model"]["fitting_net"] = {"type": "sezm_ener", "n_neuron": [32]}
    raw["training"] = {
        "training_data": {"systems": "d", "auto_prob_style": "prob_uniform", "sys_weights": [1.0]},
        "validation_data": {"systems": "v", "numb_batch": 3},
        "stop_batch": 7,
    }
    raw["optimizer"] = {"type": "HybridMuon", "muon_momentum": 0.9}
    raw["loss"] = {"type": "ener_hess"}
    data = normalize_input(raw)
    descriptor = data["model"]["descriptor"]
    assert descriptor["mixing_layers"] == 2 and "so2_layers" not in descriptor
    assert data["model"]["fitting_net"]["type"] == "dpa4_ener"
    assert data["model"]["fitting_net"]["neuron"] == [32]
    training = data["training"]
    assert training["numb_steps"] == 7 and "stop_batch" not in training
    assert training["validation_data"]["numb_btch"] == 3
    assert training["training_data"]["auto_prob"] == "prob_uniform"
    assert training["training_data"]["sys_probs"] == [1.0]
    assert data["optimizer"]["momentum"] == 0.9
    assert data["loss"]["type"] == "ener"


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("where", "typo", "path", "suggestion"),
    [
        ((), "trainig", "trainig", "training"),
        (("model",), "discriptor", "model/discriptor", "descriptor"),
        (("model", "descriptor"), "chanels", "model/descriptor/chanels", "channels"),
        (("model", "fitting_net"), "nueron", "model/fitting_net/nueron", "neuron"),
        (("learning_rate",), "stop_lr_ration", "learning_rate/stop_lr_ration", "stop_lr_ratio"),
        (("training",), "numb_step_", "training/numb_step_", "numb_steps"),
        (
            ("training", "training_data"),
            "batchsize",
            "training/training_data/batchsize",
            "batch_size",
        ),
    ],
)
def test_unknown_key_names_path_file_and_closest_key(where, typo, path, suggestion):
    raw = minimal_input()
    raw["model"]["fitting_net"] = {}
    node = raw
    for key in where:
        node = node[key]
    node[typo] = 1
    message = reject(raw, "water.json")
    assert message.startswith(f"water.json: `{path}`: unknown key")
    assert f"did you mean `{suggestion}`?" in message


def test_unknown_key_in_deep_optional_sections():
    raw = minimal_input()
    raw["validating"] = {"ful_validation": True}
    assert "`validating/ful_validation`" in reject(raw)
    raw = minimal_input()
    raw["model"]["spin"] = {"use_spin": [True, False], "shceme": "native"}
    assert "did you mean `scheme`?" in reject(raw)


def test_unknown_key_in_multitask_branch():
    raw = raw_input("multitask_levels")
    raw["model"]["model_dict"]["b"]["fitting_net"]["neuronn"] = [1]
    message = reject(raw, "mt.json")
    assert "`model/model_dict/b/fitting_net/neuronn`" in message and "`neuron`" in message
    raw = raw_input("multitask_levels")
    raw["loss"] = {}
    assert "did you mean `loss_dict`?" in reject(raw)


def test_key_of_another_type_is_explained():
    raw = minimal_input()
    raw["learning_rate"].update(type="cosine", decay_steps=100)
    message = reject(raw)
    assert "`learning_rate/decay_steps`" in message and "type `exp`, not `cosine`" in message


def test_wrong_type_names_path_expected_and_given():
    raw = minimal_input()
    raw["model"]["descriptor"]["channels"] = "64"
    message = reject(raw, "in.json")
    assert message.startswith("in.json: `model/descriptor/channels`: expected int, got str")
    message = reject({**MINIMAL_MODEL, "descriptor": {"sel": [1.5]}}, None, model_only=True)
    assert message.startswith("`model/descriptor/sel`: expected")
    assert "list[int]" in message and "got list [1.5]" in message
    raw = minimal_input()
    raw["training"]["numb_steps"] = 1.5
    assert "`training/numb_steps`: expected int, got float" in reject(raw)


def test_unsupported_type_tag():
    message = reject({**MINIMAL_MODEL, "type": "standard"}, None, model_only=True)
    assert message.startswith("`model/type`: unsupported value 'standard'")
    raw = minimal_input()
    raw["model"]["fitting_net"] = {"type": "ener"}
    assert "`model/fitting_net/type`" in reject(raw)


def test_bad_value_and_missing_key():
    model = {**MINIMAL_MODEL, "descriptor": {"so3_readout": "linear"}}
    message = reject(model, None, model_only=True)
    assert "`model/descriptor/so3_readout`" in message and "'glu'" in message
    model = {**MINIMAL_MODEL, "fitting_net": {"type": "property"}}
    message = reject(model, None, model_only=True)
    assert "`model/fitting_net/property_name`: required key is missing" in message
    assert "`model/descriptor`: required" in reject({"type": "dpa4"}, None, model_only=True)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        normalize_input({"model": 1})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        normalize_input([])


def test_options_of_other_backends_warn():
    raw = minimal_input()
    raw["training"]["acc_freq"] = 4
    raw["model"]["srtab_add_bias"] = True  # the default: silent
    with pytest.warns(ConfigWarning, match="`training/acc_freq`") as record:
        normalize_input(raw)
    assert "srtab_add_bias" not in str(record[0].message)


# ---------------------------------------------------------------------------------------------
# multi-task and learning-rate rules


def test_shared_params_expansion_and_links():
    raw = raw_input("multitask_levels")
    model, links = expand_shared_params(raw["model"])
    a, b = model["model_dict"]["a"], model["model_dict"]["b"]
    assert a["type_map"] == ["O", "H"] and b["descriptor"] == raw["model"]["shared_dict"]["desc"]
    assert a["use_compile"] is True and b["use_compile"] is False  # top-level value cascades
    assert "use_compile" not in model
    assert links == {
        "desc": [
            {"model_key": "a", "shared_type": "descriptor", "shared_level": 0},
            {"model_key": "b", "shared_type": "descriptor", "shared_level": 1},
        ],
        "fit": [{"model_key": "a", "shared_type": "fitting_net", "shared_level": 0}],
    }


def test_shared_reference_errors():
    raw = raw_input("multitask_levels")
    raw["model"]["model_dict"]["a"]["descriptor"] = "dsec"
    message = reject(raw)
    assert "`model/model_dict/a/descriptor`" in message and "did you mean `desc`?" in message
    raw = raw_input("multitask_levels")
    raw["model"]["model_dict"]["a"]["type_map"] = ["O", "H"]
    raw["model"]["model_dict"]["b"]["type_map"] = ["O", "H"]
    assert "shared `type_map`" in reject(raw)


def test_learning_rate_rules():
    lr = {"type": "cosine", "start_lr": 1e-3, "stop_lr": None, "stop_lr_ratio": None}
    check_learning_rate(lr)
    assert lr["stop_lr"] == DEFAULT_STOP_LR
    lr = {"type": "cosine", "start_lr": 1e-3, "stop_lr": None, "stop_lr_ratio": 0.1}
    check_learning_rate(lr)
    assert lr["stop_lr"] is None
    with pytest.raises(ConfigError, match="exclude each other"):
        check_learning_rate({"start_lr": 1.0, "stop_lr": 1e-5, "stop_lr_ratio": 0.1})
    raw = minimal_input()
    raw["learning_rate"] = {"type": "wsd", "start_lr": 1e-3, "stop_lr_ratio": -1.0}
    assert "`learning_rate/stop_lr_ratio`" in reject(raw)


# ---------------------------------------------------------------------------------------------
# absent sections: DeePMD-kit's defaults, or an error naming every key without one


def test_absent_sections_take_the_documented_defaults():
    """Only the model, the learning rate and the run length given: the rest is filled."""
    data = normalize_input(minimal_input())
    assert set(data) == {"model", "learning_rate", "optimizer", "loss", "training", "validating"}
    assert data["optimizer"]["type"] == "Adam" and data["loss"]["type"] == "ener"
    upstream = INPUT_REFS["minimal_doc"]["normalized"]
    assert data["training"] == upstream["training"]
    assert data["learning_rate"] == upstream["learning_rate"]


def test_keys_without_a_default_are_named_together():
    """DeePMD-kit has no default learning rate, run length or training systems (its trainer
    stops on a bare KeyError); all missing ones are named in one message."""
    raw = {"model": copy.deepcopy(MINIMAL_MODEL), "training": {}}
    message = reject(raw)  # no run length: normalization refuses it, as DeePMD-kit's does
    assert message.startswith("input.json: `training/numb_steps`: required key is missing")
    assert "--numb-steps" in message
    assert (
        '`learning_rate/start_lr` (DeePMD-kit has no default learning rate; e.g. "learning_rate": {"start_lr": 0.001})'
        in message
    )
    assert "`training/training_data/systems`" in message
    raw = minimal_input()
    del raw["learning_rate"]
    data = normalize_input(raw)  # DeePMD-kit's schema accepts it, its trainer does not
    with pytest.raises(ConfigError) as info:
        check_trainable(data, source="input.json")
    assert str(info.value).startswith("input.json: `learning_rate/start_lr`: required key is")
    assert "also missing" not in str(info.value)
    del data["training"]["training_data"]
    with pytest.raises(ConfigError, match="also missing: `training/training_data/systems`"):
        check_trainable(data)
    check_trainable(normalize_input(minimal_input()))
    assert "`training`: required key is missing" in reject({"model": MINIMAL_MODEL})


def test_override_numb_steps_replaces_the_run_length():
    raw = minimal_input()
    raw["training"] = {"training_data": {"systems": ["data"]}, "stop_batch": 7}
    data = normalize_input(override_numb_steps(raw, 3))
    assert data["training"]["numb_steps"] == 3
    assert raw["training"]["stop_batch"] == 7  # the input itself is not modified
    raw["training"] = {"training_data": {"systems": ["data"]}, "numb_epoch": 2.5}
    data = normalize_input(override_numb_steps(raw, 3))
    assert data["training"]["numb_steps"] == 3 and "numb_epoch" not in data["training"]
    del raw["training"]["training_data"]  # the override does not hide other missing keys
    with pytest.raises(ConfigError, match="`training/training_data/systems`"):
        check_trainable(normalize_input(override_numb_steps(raw, 3)))


def test_warmup_longer_than_the_run_names_both_keys():
    """The property example warms up for 5000 steps: a short run of it is refused with the
    values, as DeePMD-kit refuses it (there only once training starts)."""
    raw = json.loads((DATA / "examples" / "property_input_dpa4.json").read_text())
    quiet_normalize(raw)  # the example itself is fine
    message = reject(override_numb_steps(raw, 100))
    assert message.startswith("input.json: `learning_rate/warmup_steps`: the warm-up (5000 steps)")
    assert "`training/numb_steps` (100)" in message
    raw = minimal_input()
    raw["learning_rate"]["warmup_ratio"] = 1.0
    message = reject(raw)
    assert "`learning_rate/warmup_ratio`" in message and "1.0 of 10 steps = 10 steps" in message
    raw["learning_rate"]["warmup_ratio"] = 0.9
    normalize_input(raw)


BUNDLED = sorted((Path(__file__).parents[2] / "examples" / "water").glob("*.json"))


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_examples_are_complete_inputs(path):
    """The README's examples normalise and name data that exists next to them."""
    config = normalize_input(json.loads(path.read_text()), source=str(path))
    assert config["learning_rate"]["start_lr"] > 0 and config["training"]["numb_steps"] > 0
    training = config["training"]
    sections = list(training.get("data_dict", {}).values()) or [training]  # multi-task: per branch
    assert sections
    for section in sections:
        assert section["training_data"] is not None
        for key in ("training_data", "validation_data"):
            for system in (section[key] or {"systems": []})["systems"]:
                assert (path.parent / system / "type.raw").is_file(), system


def test_stored_multitask_model_fits_the_schema():
    """A checkpoint stores each branch's shared type_map expanded; reading it back neither warns
    nor changes the model section, while an input file with copied lists is still refused."""
    from sezm.config.normalize import check_stored_model, complete_model

    stored = normalize_input(raw_input("multitask_levels"))["model"]
    assert all(isinstance(b["type_map"], list) for b in stored["model_dict"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        check_stored_model(copy.deepcopy(stored), "model.ckpt.pt")
    completed = complete_model(copy.deepcopy(stored))
    assert completed["model_dict"] == stored["model_dict"]
    raw = raw_input("multitask_levels")
    for branch in raw["model"]["model_dict"].values():
        branch["type_map"] = ["O", "H"]
    assert "shared `type_map`" in reject(raw)
    stored["model_dict"]["b"]["type_map"] = ["H", "O"]  # branches disagree: still a warning
    with pytest.warns(ConfigWarning, match="shared `type_map`"):
        check_stored_model(stored, "model.ckpt.pt")
