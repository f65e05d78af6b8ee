"""`sezm change-bias` against DeePMD-kit 3.2's `dp --pt change-bias`.

The reference (tests/data/modules/change_bias.npz, made by
tests/module_fixtures/make_change_bias.py) holds two small water systems of different
compositions and the `out_bias`/`out_std` DeePMD-kit wrote for the `tiny` parity checkpoint in
mode change, mode set and with `-b`, every frame used (`-n 0`).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.cli import build_parser, run
from sezm.infer.change_bias import change_bias, default_output

DATA = Path(__file__).parents[1] / "data"
TINY = DATA / "parity" / "tiny" / "model.pt"
PROPERTY = DATA / "parity" / "property" / "model.pt"
REF = np.load(DATA / "modules" / "change_bias.npz")
PREFIX = "model.Default.atomic_model."


@pytest.fixture(scope="module")
def systems(tmp_path_factory) -> Path:
    """The reference's two systems as DeePMD-kit npy folders."""
    root = tmp_path_factory.mktemp("change_bias") / "data"
    for name in ("full", "cut"):
        folder = root / name
        (folder / "set.000").mkdir(parents=True)
        np.savetxt(folder / "type.raw", REF[f"{name}/type"], fmt="%d")
        (folder / "type_map.raw").write_text("O\nH\n")
        for key in ("coord", "box", "energy"):
            np.save(folder / "set.000" / f"{key}.npy", REF[f"{name}/{key}"])
    return root


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    shutil.copy(TINY, path)
    return path


def _stats(path: Path, prefix: str = PREFIX) -> tuple[np.ndarray, np.ndarray]:
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return state[prefix + "out_bias"].numpy(), state[prefix + "out_std"].numpy()


@pytest.mark.parametrize("mode", ["change", "set"])
def test_fitted_bias_matches_deepmd(mode, model, systems, caplog) -> None:
    out = model.parent / f"{mode}.pt"
    with caplog.at_level(logging.INFO, logger="sezm"):
        assert run(["change-bias", str(model), "-s", str(systems), "-m", mode, "-o", str(out)]) == 0
    bias, std = _stats(out)
    np.testing.assert_allclose(bias, REF[f"{mode}/out_bias"], rtol=1e-6, atol=0)
    # the std of the residual: float32 predictions, so a little looser than the bias
    np.testing.assert_allclose(std, REF[f"{mode}/out_std"], rtol=1e-5, atol=0)
    assert "RMSE of energy per atom after linear regression" in caplog.text
    assert "change output bias of ['O', 'H'] from [-93.57364, -187.14728] to" in caplog.text
    assert f"saved model to {out}" in caplog.text


def test_bias_values_match_deepmd(model) -> None:
    values = [str(v) for v in REF["bias_value"]]
    assert run(["change-bias", str(model), "-b", *values]) == 0
    bias, std = _stats(model.parent / "model_updated.pt")  # DeePMD-kit's default name
    np.testing.assert_allclose(bias, REF["user/out_bias"], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(std, REF["user/out_std"])  # untouched


def test_only_the_bias_changes(model, systems) -> None:
    """Every other entry (tensors, model_params, train_infos) is carried over unchanged."""
    out = model.parent / "out.pt"
    change_bias(model, str(systems), output=out)
    old = torch.load(model, map_location="cpu", weights_only=True)
    new = torch.load(out, map_location="cpu", weights_only=True)
    assert old.keys() == new.keys()
    assert old["model"].keys() == new["model"].keys()
    assert new["model"]["_extra_state"] == old["model"]["_extra_state"]
    changed = []
    for key, value in old["model"].items():
        if torch.is_tensor(value):
            assert new["model"][key].dtype == value.dtype
            if not torch.equal(new["model"][key], value):
                changed.append(key)
    assert sorted(changed) == [PREFIX + "out_bias", PREFIX + "out_std"]


def test_default_output_name() -> None:
    assert default_output("runs/a.b/model.pt") == Path("runs/a.b/model_updated.pt")


def test_numb_batch_draws_that_many_frames_per_system(model, systems) -> None:
    """``-n 1``: the set-by-statistic fit equals the fit of one frame of each system."""
    out = model.parent / "one.pt"
    result = change_bias(model, str(systems), numb_batch=1, mode="set", output=out, seed=3)
    counts = {
        name: np.bincount(REF[f"{name}/type"], minlength=2).astype(float)
        for name in ("full", "cut")
    }
    fits = []
    for i, j in itertools.product(range(3), range(3)):
        coef = np.stack([counts["full"], counts["cut"]])
        label = np.array([REF["full/energy"][i], REF["cut/energy"][j]])
        fits.append(np.linalg.lstsq(coef, label, rcond=None)[0])
    after = result.after[:, 0]
    assert min(np.abs(fit - after).max() for fit in fits) < 1e-8 * np.abs(after).max()


def test_datafile_lists_the_systems(model, systems, tmp_path) -> None:
    listing = tmp_path / "systems.txt"
    listing.write_text(f"{systems / 'full'}\n\n{systems / 'cut'}\n")
    out = tmp_path / "listed.pt"
    assert run(["change-bias", str(model), "-f", str(listing), "-m", "set", "-o", str(out)]) == 0
    np.testing.assert_allclose(_stats(out)[0], REF["set/out_bias"], rtol=1e-6, atol=0)


def _multitask(path: Path) -> Path:
    """The tiny checkpoint twice, as branches ``a`` and ``b`` (``b`` alias ``water``)."""
    raw = torch.load(TINY, map_location="cpu", weights_only=True)["model"]
    params = raw["_extra_state"]["model_params"]
    state = {}
    for branch in ("a", "b"):
        for key, value in raw.items():
            if key != "_extra_state":
                state[key.replace("model.Default.", f"model.{branch}.")] = value.clone()
    branch_b = {**params, "model_branch_alias": ["water"]}
    state["_extra_state"] = {
        "model_params": {"model_dict": {"a": params, "b": branch_b}},
        "train_infos": {"lr": 1e-3, "step": 9},
    }
    torch.save({"model": state}, path)
    return path


def test_multitask_changes_the_chosen_branch(tmp_path, systems, capsys) -> None:
    model = _multitask(tmp_path / "multi.pt")
    assert run(["change-bias", str(model), "-s", str(systems)]) == 2
    assert "multi-task checkpoint; choose a head from ['a', 'b']" in capsys.readouterr().err
    out = tmp_path / "multi_b.pt"
    argv = [
        "change-bias",
        str(model),
        "-s",
        str(systems),
        "--model-branch",
        "water",
        "-o",
        str(out),
    ]
    assert run(argv) == 0
    np.testing.assert_allclose(
        _stats(out, "model.b.atomic_model.")[0], REF["change/out_bias"], rtol=1e-6, atol=0
    )
    np.testing.assert_array_equal(
        _stats(out, "model.a.atomic_model.")[0], _stats(model, "model.a.atomic_model.")[0]
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-b", "1.0"], "1 bias value(s) given for the 2 types of the type map ['O', 'H']"),
        (["-n", "-1"], "numb_batch must be >= 0"),
    ],
)
def test_bad_requests_are_user_errors(argv, message, model, capsys) -> None:
    assert run(["change-bias", str(model), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sezm: error: change-bias failed: ") and message in err


def test_frozen_model_is_refused_by_name(tmp_path, capsys) -> None:
    frozen = tmp_path / "frozen_model.pt2"
    frozen.write_bytes(b"")
    assert run(["change-bias", str(frozen), "-b", "1", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{frozen}: a frozen model; change-bias reads a training checkpoint (.pt)" in err


def test_bias_values_are_for_energy_models(tmp_path, capsys) -> None:
    model = tmp_path / "property.pt"
    shutil.copy(PROPERTY, model)
    assert run(["change-bias", str(model), "-b", "1", "2", "3", "4"]) == 2
    assert f"{model}: a property model; bias values (-b) are for energy models" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "property_updated.pt").exists()


def test_systems_without_energy_are_a_data_error(model, tmp_path, capsys) -> None:
    folder = tmp_path / "unlabelled"
    (folder / "set.000").mkdir(parents=True)
    np.savetxt(folder / "type.raw", REF["full/type"], fmt="%d")
    for key in ("coord", "box"):
        np.save(folder / "set.000" / f"{key}.npy", REF[f"full/{key}"])
    assert run(["change-bias", str(model), "-s", str(folder)]) == 2
    assert "'energy' labels" in capsys.readouterr().err


def test_every_option_has_help() -> None:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    command = action.choices["change-bias"]
    for option in command._actions:
        if not isinstance(option, argparse._HelpAction):
            assert option.help, option.dest


def test_set_recomputes_the_fparam_statistics(systems, tmp_path) -> None:
    """Mode set also refits ``fparam`` avg/inv_std (DeePMD-kit's ``compute_input_stats``);
    mode change leaves them."""
    data = tmp_path / "fp"
    shutil.copytree(systems, data)
    values = {"full": [[0.5], [1.5], [1.0]], "cut": [[2.0], [2.5], [3.0]]}
    for name, fparam in values.items():
        natoms = len(REF[f"{name}/type"])
        np.save(data / name / "set.000" / "fparam.npy", np.array(fparam))
        np.save(data / name / "set.000" / "aparam.npy", np.ones((3, natoms)))
    model = tmp_path / "fparam.pt"
    shutil.copy(DATA / "parity" / "fparam1" / "model.pt", model)
    fit = "model.Default.atomic_model.fitting_net."
    before = torch.load(model, weights_only=True)["model"]
    for mode in ("set", "change"):
        change_bias(model, str(data), mode=mode, output=tmp_path / f"{mode}.pt")
    changed = torch.load(tmp_path / "set.pt", weights_only=True)["model"]
    flat = np.concatenate(list(values.values())).ravel()
    np.testing.assert_allclose(changed[fit + "fparam_avg"].numpy(), [flat.mean()], rtol=1e-6)
    np.testing.assert_allclose(changed[fit + "fparam_inv_std"].numpy(), [1 / flat.std()], rtol=1e-6)
    kept = torch.load(tmp_path / "change.pt", weights_only=True)["model"]
    for name in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std"):
        assert torch.equal(kept[fit + name], before[fit + name])


def test_dens_models_change_by_set_or_values(tmp_path, systems, capsys) -> None:
    model = tmp_path / "dens.pt"
    shutil.copy(DATA / "parity" / "dens" / "model.pt", model)
    assert run(["change-bias", str(model), "-s", str(systems)]) == 2
    assert f"{model}: a dens model; mode change needs" in capsys.readouterr().err
    assert run(["change-bias", str(model), "-s", str(systems), "-m", "set"]) == 0
