"""Training losses vs DeePMD-kit: loss value, metrics and d loss / d predictions, float64.

Reference data: ``tests/module_fixtures/make_loss.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.config import ConfigError, normalize_section
from sezm.train.losses import DensLoss, EnergyLoss, PropertyLoss, build_loss

DATA = Path(__file__).parents[1] / "data" / "modules"
TOL = {"rtol": 1e-10, "atol": 1e-12}


def load(name: str) -> dict[str, dict]:
    """``{case: {"config": dict, "pred": {...}, "label": {...}, "in": ..., "out": ..., ...}}``."""
    cases: dict[str, dict] = {}
    with np.load(DATA / f"{name}.npz") as data:
        for key in data.files:
            case, group, *rest = key.split("/", 2)
            entry = cases.setdefault(case, {})
            if group == "config":
                entry["config"] = json.loads(str(data[key]))
            else:
                entry.setdefault(group, {})[rest[0]] = torch.from_numpy(data[key])
    return cases


ENER, PROPERTY, DENS = (load(f"loss_{n}") for n in ("ener", "property", "dens"))


def leaves(pred: dict) -> dict:
    return {k: v.clone().requires_grad_(True) for k, v in pred.items()}


def check(case: dict, loss: torch.Tensor, metrics: dict, pred: dict) -> None:
    torch.testing.assert_close(loss, case["out"]["loss"], **TOL)
    expected = case.get("metric", {})
    assert sorted(metrics) == sorted(expected)
    for name, value in expected.items():
        if math.isnan(float(value)):
            assert math.isnan(float(metrics[name])), name
        else:
            torch.testing.assert_close(metrics[name].to(value.dtype), value, **TOL, msg=name)
    ours = torch.autograd.grad(loss, list(pred.values()), allow_unused=True)
    for (key, x), g in zip(pred.items(), ours):
        ref = case["grad"].get(key, torch.zeros_like(x))
        torch.testing.assert_close(torch.zeros_like(x) if g is None else g, ref, **TOL, msg=key)


@pytest.mark.parametrize("name", sorted(ENER))
def test_energy_loss_matches_upstream(name: str) -> None:
    case = ENER[name]
    cfg = case["config"]
    loss_fn = build_loss(cfg["section"], cfg["lr0"])
    assert isinstance(loss_fn, EnergyLoss)
    pred = leaves(case["pred"])
    mask = case["in"]["mask"] if cfg["masked"] else None
    loss, metrics = loss_fn(pred, case["label"], cfg["find"], cfg["natoms"], cfg["lr"], mask=mask)
    check(case, loss, metrics, pred)


@pytest.mark.parametrize("name", sorted(PROPERTY))
def test_property_loss_matches_upstream(name: str) -> None:
    case = PROPERTY[name]
    cfg = case["config"]
    info = {k: cfg[k] for k in ("task_dim", "var_name", "intensive")}
    loss_fn = build_loss(cfg["section"], 1e-3, **info)
    assert isinstance(loss_fn, PropertyLoss)
    pred = leaves(case["pred"])
    stats = {k: case["in"][k] for k in ("out_bias", "out_std")}
    mask = case["in"]["mask"] if cfg["masked"] else None
    loss, metrics = loss_fn(pred, case["label"], {}, cfg["natoms"], mask=mask, **stats)
    check(case, loss, metrics, pred)


@pytest.mark.parametrize("name", sorted(DENS))
def test_dens_loss_matches_upstream(name: str) -> None:
    case = DENS[name]
    cfg, given = case["config"], case["in"]
    loss_fn = build_loss(cfg["section"], cfg["lr0"])
    assert isinstance(loss_fn, DensLoss)
    gen = torch.Generator().manual_seed(cfg["seed"])
    batch = loss_fn.corrupt(
        given["coord"],
        given["atype"],
        case["label"]["force"],
        training=cfg["training"],
        generator=gen,
    )
    torch.testing.assert_close(batch.coord, case["out"]["coord"], rtol=0, atol=0)
    assert torch.equal(batch.noise_mask, case["out"]["noise_mask"])
    assert (batch.force_input is not None) == cfg["force_input"] == batch.use_dens
    pred = leaves(case["pred"])
    stats = {k: given[k] for k in ("energy_bias", "energy_std", "force_rmsd")}
    loss, metrics = loss_fn(
        pred, case["label"], cfg["find"], cfg["natoms"], cfg["lr"], batch=batch, **stats
    )
    check(case, loss, metrics, pred)


def test_mask_of_full_batch_equals_no_mask() -> None:
    """A real-atom mask without phantoms reproduces the unmasked reductions."""
    case = ENER["mse_all_lr"]
    cfg = case["config"]
    loss_fn = EnergyLoss(cfg["section"], cfg["lr0"])
    a, ma = loss_fn(case["pred"], case["label"], cfg["find"], cfg["natoms"], cfg["lr"])
    b, mb = loss_fn(
        case["pred"], case["label"], cfg["find"], cfg["natoms"], cfg["lr"], mask=case["in"]["mask"]
    )
    torch.testing.assert_close(a, b, **TOL)
    assert all(torch.allclose(ma[k], mb[k], rtol=1e-12) for k in ma)


def test_absent_labels_add_nothing() -> None:
    """Dropping a label from the batch equals ``find = False``: no loss, NaN metrics."""
    case = ENER["missing_labels"]
    cfg = case["config"]
    label = {k: v for k, v in case["label"].items() if k not in ("virial", "atom_pref")}
    loss_fn = EnergyLoss(cfg["section"], cfg["lr0"])
    loss, metrics = loss_fn(
        case["pred"], label, {}, cfg["natoms"], cfg["lr"], mask=case["in"]["mask"]
    )
    torch.testing.assert_close(loss, case["out"]["loss"], **TOL)
    assert math.isnan(float(metrics["rmse_v"])) and math.isnan(float(metrics["rmse_pf"]))


def ener_loss(**prefs: float) -> dict:
    """A normalized ``ener`` section with the energy and force terms off unless given."""
    return normalize_section("loss", {"start_pref_e": 0, "start_pref_f": 0, **prefs})


def test_prefactor_schedule_and_activity() -> None:
    loss_fn = EnergyLoss(ener_loss(start_pref_e=0.02, limit_pref_e=1.0, start_pref_v=1.0), 1e-3)
    assert loss_fn.active == ["e"]  # a term needs both prefactors non-zero
    assert loss_fn.prefs["e"](1.0) == pytest.approx(0.02)
    assert loss_fn.prefs["e"](0.0) == pytest.approx(1.0)
    assert loss_fn.prefs["e"](0.25) == pytest.approx(1.0 + (0.02 - 1.0) * 0.25)
    only_pf = EnergyLoss(ener_loss(start_pref_pf=1, limit_pref_pf=1), 1.0)
    assert [r.name for r in only_pf.label_requirements] == ["force", "atom_pref"]


@pytest.mark.parametrize(
    "section, error",
    [
        ({"type": "ener_spin", "start_pref_pf": 1.0, "limit_pref_pf": 1.0}, NotImplementedError),
        ({"type": "ener_spin", "loss_func": "huber"}, ValueError),
        ({"type": "ener", "loss_func": "huber"}, ValueError),
        ({"type": "ener", "f_use_norm": True}, ValueError),
        ({"type": "ener", "start_pref_h": 1.0}, NotImplementedError),
        ({"type": "ener", "use_huber": True, "relative_f": 0.1}, ValueError),
        ({"type": "ener", "start_pref_gf": 1.0, "limit_pref_gf": 1.0}, ValueError),
        ({"type": "dens", "dens_fixed_noise_std": False}, NotImplementedError),
        ({"type": "property"}, ValueError),
    ],
)
def test_rejected_configs(section: dict, error: type) -> None:
    normalized = normalize_section("loss", section)
    with pytest.raises(error):
        build_loss(normalized, 1e-3)


@pytest.mark.parametrize(
    "section, path",
    [({"type": "dos"}, "loss/type"), ({"type": "dens", "start_pref_v": 1.0}, "loss/start_pref_v")],
)
def test_schema_rejects_other_losses_and_terms(section: dict, path: str) -> None:
    """Loss types and terms sezm lacks never reach the losses: normalization names the key."""
    with pytest.raises(ConfigError) as err:
        normalize_section("loss", section)
    assert err.value.path == path
