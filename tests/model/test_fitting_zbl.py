"""Energy / property fitting heads, their output statistics and the ZBL pair term vs DeePMD-kit.

Reference data: ``tests/module_fixtures/make_fitting_zbl.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sezm.config.fitting_options import fitting_options
from sezm.config.normalize import complete_model
from sezm.model.fitting import EnergyFitting, atom_keep_mask, auto_neuron, energy_out_stat
from sezm.model.property import PropertyFitting, property_output
from sezm.model.zbl import ZBL, atomic_number

DATA = Path(__file__).parents[1] / "data" / "modules"
F64 = torch.float64
EXCLUDE = [2]


def load(name: str) -> dict[str, dict]:
    """``{case: {"config": dict, "state": {...}, "in": {...}, "out": {...}, ...}}``."""
    cases: dict[str, dict] = {}
    with np.load(DATA / f"{name}.npz") as data:
        for key in data.files:
            case, group, *rest = key.split("/", 2)
            value = data[key]
            entry = cases.setdefault(case, {})
            if group == "config":
                entry["config"] = json.loads(str(value))
            elif rest:
                entry.setdefault(group, {})[rest[0]] = torch.from_numpy(value)
            else:
                entry[group] = torch.from_numpy(value)
    return cases


ENERGY, PROPERTY, MODELS, PAIRS = (
    load(n) for n in ("fit_energy", "fit_property", "fit_model", "zbl_pairs")
)


def head(section: dict, ntypes: int = 3, dim_descrpt: int = 8):
    """A fitting head built as models build it: the section normalised, then its typed record."""
    model = complete_model(
        {
            "type_map": ["O", "H", "C"][:ntypes],
            "descriptor": {"type": "dpa4"},
            "fitting_net": section,
        }
    )
    cls = PropertyFitting if model["fitting_net"]["type"] == "property" else EnergyFitting
    return cls(ntypes, dim_descrpt, fitting_options(model))


#: A constructor keyword of DeePMD-kit's head that no input file can set (not in its schema).
UPSTREAM_ONLY = {"bias_out"}


def build_loaded(cls, case: dict):
    section = {"type": "property" if cls is PropertyFitting else "dpa4_ener", **case["config"]}
    module = head(section, dim_descrpt=case["in"]["descriptor"].shape[-1])
    module.load_state_dict(case["state"], strict=True)
    return module


def tolerance(module) -> dict:
    return {"rtol": 1e-10, "atol": 1e-10} if module.dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("cls, cases", [(EnergyFitting, ENERGY), (PropertyFitting, PROPERTY)])
def test_fitting_matches_upstream(cls, cases) -> None:
    for name, case in cases.items():
        if UPSTREAM_ONLY & set(case["config"]):
            continue
        fitting = build_loaded(cls, case)
        inp = case["in"]
        descriptor = inp["descriptor"].clone().requires_grad_(True)
        kwargs = {"fparam": inp.get("fparam"), "aparam": inp.get("aparam")}
        atomic = fitting(descriptor, inp["atype"], **kwargs)
        keep = atom_keep_mask(inp["atype"], EXCLUDE)[..., None]  # upstream masks in the fitting
        tol = tolerance(fitting)
        assert atomic.dtype == F64
        torch.testing.assert_close(atomic * keep, case["out"]["atomic"], **tol, msg=name)
        (grad,) = torch.autograd.grad(((atomic * keep) * case["cot"]).sum(), descriptor)
        torch.testing.assert_close(grad, case["grad"]["descriptor"], **tol, msg=name)
        feature = fitting.atomic_feature(descriptor, inp["atype"], **kwargs)
        torch.testing.assert_close(feature.to(F64), case["out"]["feature"].to(F64), **tol, msg=name)
        if "atomic_default" in case["out"]:
            default = fitting(descriptor, inp["atype"], aparam=inp.get("aparam")) * keep
            torch.testing.assert_close(default, case["out"]["atomic_default"], **tol, msg=name)
        assert set(fitting.state_dict()) == set(case["state"]), name


def test_auto_neuron_rule() -> None:
    for dim_in in range(1, 200):
        assert auto_neuron([0], dim_in) == [32 * math.ceil((8.0 * dim_in / 3.0) / 32.0)]
    assert auto_neuron([0, 16, 0], 64) == [192, 16, 192]
    options = {"numb_fparam": 2, "dim_case_embd": 5}
    film = head({**options, "case_film_embd": True}, 2, 58)  # 60 inputs
    concat = head(options, 2, 58)  # 65
    assert (film.neuron, concat.neuron) == ([160], [192])
    with pytest.raises(ValueError):
        auto_neuron([-1], 8)


def test_set_case() -> None:
    fitting = head({"neuron": [8], "dim_case_embd": 3}, 2, 4)
    fitting.set_case(1, 3)
    torch.testing.assert_close(fitting.case_embd, torch.tensor([0.0, 1.0, 0.0]))
    assert "case_embd" in fitting.state_dict()
    with pytest.raises(ValueError):
        fitting.set_case(0, 2)
    fitting.double()  # the network input follows the parameter dtype
    descriptor = torch.randn(1, 2, 4, dtype=F64)
    assert fitting.atomic_feature(descriptor).dtype == F64
    fitting.set_case(2)
    assert fitting.case_embd.dtype == F64


def test_energy_model_pipeline() -> None:
    """E_i = (fit_i + out_bias[t_i] + ZBL_i) · m_i; ZBL edges need both endpoints kept."""
    case = MODELS["energy_zbl"]
    cfg, state, inp = case["config"], case["state"], case["in"]
    prefix = "atomic_model.fitting_net."
    fitting = head(cfg["fitting_net"])
    fitting.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    zbl = ZBL(cfg["type_map"])
    zbl.load_state_dict({"atomic_numbers": state["inter_potential.atomic_numbers"]})

    atype = inp["atype"]
    safe = atype.clamp(min=0)
    keep = atom_keep_mask(atype, cfg["atom_exclude_types"])  # (nf, nloc)
    src, dst = inp["zbl_edge_index"]
    pair_ok = ~((safe.view(-1)[src] == 1) & (safe.view(-1)[dst] == 1))  # pair_exclude [[1, 1]]
    edge_mask = inp["edge_mask_raw"] & keep.view(-1)[src] & keep.view(-1)[dst] & pair_ok
    assert torch.equal(edge_mask, inp["zbl_edge_mask"])

    energy = energy_out_stat(fitting(inp["descriptor"], safe), safe, state["atomic_model.out_bias"])
    energy = energy + zbl(inp["zbl_edge_vec"], inp["zbl_edge_index"], safe, edge_mask)[..., None]
    energy = energy * keep[..., None]
    torch.testing.assert_close(energy, case["out"]["atom_energy"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(energy.sum(1), case["out"]["energy"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["property_intensive", "property_extensive"])
def test_property_model_pipeline(name: str) -> None:
    case = MODELS[name]
    cfg, state, inp = case["config"], case["state"], case["in"]
    prefix = "atomic_model.fitting_net."
    fitting = head(cfg["fitting_net"])
    fitting.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    atype = inp["atype"]
    safe = atype.clamp(min=0)
    total, atom = property_output(
        fitting(inp["descriptor"], safe),
        safe,
        atom_keep_mask(atype, cfg["atom_exclude_types"]),
        state["atomic_model.out_bias"],
        state["atomic_model.out_std"],
        intensive=fitting.intensive,
        distinguish_types=fitting.distinguish_types,
    )
    torch.testing.assert_close(atom, case["out"]["atom_band_prop"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(total, case["out"]["band_prop"], rtol=1e-10, atol=1e-10)


def test_property_state_dict_aliasing() -> None:
    """``networks`` and ``_networks`` are one module list: one set of parameters, both keys."""
    fitting = head({"type": "property", "property_name": "p", "neuron": [8]}, 2, 4)
    keys = set(fitting.state_dict())
    assert {k.replace("._networks.", ".networks.") for k in keys} == {
        k for k in keys if "._networks." not in k
    }
    assert len(list(fitting.parameters())) == 5  # matrix, bias, idt (4 -> 8), output matrix, bias


def _zbl_reference(r: float, zi: float, zj: float) -> float:
    """Published ZBL universal potential (eV, Å)."""
    a = 0.88534 * 0.5291772109 / (zi**0.23 + zj**0.23)
    x = r / a
    phi = (
        0.18175 * math.exp(-3.1998 * x)
        + 0.50986 * math.exp(-0.94229 * x)
        + 0.28022 * math.exp(-0.4029 * x)
        + 0.028171 * math.exp(-0.20162 * x)
    )
    return 14.3996 * zi * zj / r * phi


@pytest.mark.parametrize("types, z", [([0, 0], (8, 8)), ([0, 1], (8, 1)), ([1, 1], (1, 1))])
@pytest.mark.parametrize("r", [1.0, 0.8, 0.05])
def test_zbl_known_values(types, z, r) -> None:
    zbl = ZBL(["O", "H"])
    edge_vec = torch.tensor([[r, 0.0, 0.0], [-r, 0.0, 0.0]], dtype=F64)
    edge_index = torch.tensor([[1, 0], [0, 1]])
    energy = zbl(edge_vec, edge_index, torch.tensor(types), torch.ones(2, dtype=torch.bool))
    expected = _zbl_reference(r, *z)
    torch.testing.assert_close(
        energy, torch.full((2,), expected / 2, dtype=F64), rtol=1e-13, atol=0
    )


def test_zbl_matches_upstream() -> None:
    case = PAIRS["pairs"]
    zbl = ZBL(case["config"]["type_map"])
    zbl.load_state_dict(case["state"], strict=True)
    inp = case["in"]
    edge_vec = inp["edge_vec"].clone().requires_grad_(True)
    energy = zbl(edge_vec, inp["edge_index"], inp["atype"], inp["edge_mask"])
    torch.testing.assert_close(energy, case["out"], rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(energy.sum(), edge_vec)
    torch.testing.assert_close(grad, case["grad"]["edge_vec"], rtol=1e-12, atol=1e-12)
    assert (
        energy.view(2, 3).shape
        == zbl(edge_vec, inp["edge_index"], inp["atype"].view(2, 3), inp["edge_mask"]).shape
    )


def test_zbl_gradient_finite_difference() -> None:
    case = PAIRS["pairs"]
    zbl = ZBL(case["config"]["type_map"])
    inp = case["in"]
    valid = inp["edge_mask"] & (inp["edge_vec"].norm(dim=-1) > 0.2)  # skip the 0.05 Å pair

    def total(vec: torch.Tensor) -> torch.Tensor:
        return zbl(vec, inp["edge_index"], inp["atype"], valid).sum()

    edge_vec = inp["edge_vec"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(total(edge_vec), edge_vec)
    h, fd = 1e-6, torch.zeros_like(grad)
    for e in range(edge_vec.shape[0]):
        for k in range(3):
            step = torch.zeros_like(grad)
            step[e, k] = h
            fd[e, k] = (total(inp["edge_vec"] + step) - total(inp["edge_vec"] - step)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-6)
    assert torch.all(grad[~valid] == 0)


def test_zbl_elements() -> None:
    assert [atomic_number(s) for s in ("H", "O", "Og")] == [1, 8, 118]
    for bad in ("Xx", "X", "h"):
        with pytest.raises(ValueError, match="unknown element"):
            ZBL(["O", bad])
