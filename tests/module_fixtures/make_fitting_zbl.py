"""Reference data for the energy / property fitting heads, their output statistics and ZBL.

Run with the DeePMD-kit venv: ``/tmp/oracle/bin/python tests/module_fixtures/make_fitting_zbl.py``.
Writes to ``tests/data/modules/``:

* ``fit_energy.npz`` / ``fit_property.npz``: one upstream fitting module per case (float64
  unless the case says otherwise), every parameter and buffer perturbed, atom type 2 excluded
  (upstream zeroes it inside the fitting). Keys ``"<case>/config"`` (JSON: our constructor
  kwargs), ``"<case>/state/<name>"``, ``"<case>/in/<name>"``, ``"<case>/out/<name>"``
  (``atomic`` the fitting output, ``feature`` the last hidden activation, ``atomic_default``
  without fparam) and ``"<case>/grad/descriptor"`` (of ``sum(atomic * cot)``).
* ``fit_model.npz``: tiny complete DPA4 models (energy with ZBL bridging, atom and pair
  exclusion, a phantom atom; property intensive / extensive) with perturbed fitting and
  random ``out_bias``/``out_std``; the descriptor output and ZBL inputs are captured during the
  upstream forward, together with the model outputs.
* ``zbl_pairs.npz``: upstream ``InnerPotential`` on random directed pairs (O/H/C, one pair at
  0.05 Å, masked and padding edges).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from deepmd.pt.model.model import get_sezm_model
from deepmd.pt.model.model.sezm_model import InnerPotential
from deepmd.pt.model.task.property import PropertyFittingNet
from deepmd.pt.model.task.sezm_ener import SeZMEnergyFittingNet, _resolve_auto_neuron

OUT = Path(__file__).resolve().parents[1] / "data" / "modules"
F64 = torch.float64
NTYPES, C, NF, NLOC = 3, 8, 2, 5
ATYPE = [[0, 1, 2, 0, 1], [1, 1, 0, 2, 0]]
EXCLUDE = [2]

ENERGY_CASES = {
    "auto": dict(neuron=[0]),
    "deep_tanh": dict(neuron=[32, 16], activation_function="tanh"),
    "linear": dict(neuron=[]),
    "params": dict(neuron=[16], numb_fparam=2, numb_aparam=2, default_fparam=[0.3, -0.2]),
    "aparam_mask": dict(neuron=[0], numb_aparam=2, use_aparam_as_mask=True),
    "case_concat": dict(neuron=[16], dim_case_embd=3),
    "case_film": dict(neuron=[16, 8], dim_case_embd=3, case_film_embd=True, numb_fparam=1),
    "film_vacuum": dict(neuron=[], dim_case_embd=2, case_film_embd=True, atom_ener=[1.0]),
    "vacuum": dict(neuron=[0], numb_fparam=1, dim_case_embd=2, atom_ener=[None, 1.0, None]),
    "bias_out_gelu": dict(neuron=[16], bias_out=True, activation_function="gelu"),
    "silut": dict(neuron=[16], activation_function="silut:2.0"),
    "fp32": dict(neuron=[0], precision="float32"),
}
PROPERTY_CASES = {
    "auto_params": dict(
        task_dim=3, neuron=[0], numb_fparam=1, numb_aparam=1, dim_case_embd=2, default_fparam=[0.5]
    ),
    "resnet_dt": dict(task_dim=3, neuron=[16, 16, 32], resnet_dt=True),
    "resnet": dict(task_dim=2, neuron=[16, 16], resnet_dt=False, activation_function="silu"),
}


def perturb(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter ~ 0.5 randn; statistics buffers random (inv_std in [0.5, 1.5])."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=F64))
        for name, b in module.named_buffers():
            if name.endswith(("bias_atom_e", "_avg")):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=F64))
            elif name.endswith("_inv_std"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=F64))


def np_dict(prefix: str, tensors: dict) -> dict:
    return {f"{prefix}/{k}": v.detach().cpu().numpy() for k, v in tensors.items()}


def module_case(name: str, fitting, cfg: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    perturb(fitting, gen)
    if fitting.dim_case_embd:
        fitting.set_case_embd(fitting.dim_case_embd - 1)
    inputs = {
        "descriptor": torch.randn(NF, NLOC, C, generator=gen, dtype=F64).requires_grad_(True),
        "atype": torch.tensor(ATYPE),
    }
    if fitting.numb_fparam:
        inputs["fparam"] = torch.randn(NF, fitting.numb_fparam, generator=gen, dtype=F64)
    if fitting.numb_aparam:
        inputs["aparam"] = torch.randn(NF, NLOC, fitting.numb_aparam, generator=gen, dtype=F64)
    ret = fitting(
        inputs["descriptor"],
        inputs["atype"],
        fparam=inputs.get("fparam"),
        aparam=inputs.get("aparam"),
        return_atomic_feature=True,
    )
    atomic = ret[fitting.var_name]
    cot = torch.randn(atomic.shape, generator=gen, dtype=F64)
    (grad,) = torch.autograd.grad((atomic * cot).sum(), inputs["descriptor"])
    outs = {"atomic": atomic, "feature": ret["atomic_feature"]}
    if fitting.default_fparam_tensor is not None:
        outs["atomic_default"] = fitting(
            inputs["descriptor"], inputs["atype"], aparam=inputs.get("aparam")
        )[fitting.var_name]
    data = {f"{name}/config": np.array(json.dumps(cfg)), f"{name}/cot": cot.numpy()}
    data.update(np_dict(f"{name}/state", fitting.state_dict()))
    data.update(np_dict(f"{name}/in", inputs))
    data.update(np_dict(f"{name}/out", outs))
    data[f"{name}/grad/descriptor"] = grad.numpy()
    return data


def energy_fixtures() -> dict:
    data = {}
    for i, (name, cfg) in enumerate(ENERGY_CASES.items()):
        cfg = {"precision": "float64", **cfg}
        fitting = SeZMEnergyFittingNet(NTYPES, C, exclude_types=EXCLUDE, seed=i, **cfg)
        data.update(module_case(name, fitting, cfg, 100 + i))
    return data


def property_fixtures() -> dict:
    data = {}
    for i, (name, cfg) in enumerate(PROPERTY_CASES.items()):
        cfg = {"property_name": "band_prop", "precision": "float64", **cfg}
        upstream = dict(cfg)
        upstream["neuron"] = _resolve_auto_neuron(
            cfg["neuron"],
            dim_descrpt=C,
            numb_fparam=cfg.get("numb_fparam", 0),
            numb_aparam=cfg.get("numb_aparam", 0),
            dim_case_embd=cfg.get("dim_case_embd", 0),
            case_film_embd=False,
            use_aparam_as_mask=False,
        )
        fitting = PropertyFittingNet(NTYPES, C, exclude_types=EXCLUDE, seed=i, **upstream)
        data.update(module_case(name, fitting, cfg, 200 + i))
    return data


DESCRIPTOR = {
    "rcut": 4.0,
    "sel": 16,
    "channels": C,
    "n_radial": 4,
    "lmax": 1,
    "mmax": 1,
    "n_blocks": 1,
    "use_amp": False,
    "precision": "float64",
    "seed": 1,
}
MODEL_CASES = {
    "energy_zbl": dict(
        fitting_net={"neuron": [16], "precision": "float64", "seed": 1},
        atom_exclude_types=[2],
        pair_exclude_types=[[1, 1]],
        bridging_method="ZBL",
    ),
    "property_intensive": dict(
        fitting_net={
            "type": "property",
            "property_name": "band_prop",
            "task_dim": 3,
            "intensive": True,
            "neuron": [0],
            "precision": "float64",
            "seed": 1,
        },
        atom_exclude_types=[2],
    ),
    "property_extensive": dict(
        fitting_net={
            "type": "property",
            "property_name": "band_prop",
            "task_dim": 2,
            "intensive": False,
            "distinguish_types": False,
            "neuron": [16, 16, 32],
            "precision": "float64",
            "seed": 1,
        },
        atom_exclude_types=[2],
    ),
}


def model_case(name: str, extra: dict, seed: int) -> dict:
    params = {"type": "dpa4", "type_map": ["O", "H", "C"], "descriptor": dict(DESCRIPTOR), **extra}
    model = get_sezm_model(params)
    gen = torch.Generator().manual_seed(seed)
    atomic = model.atomic_model
    perturb(atomic.fitting_net, gen)
    with torch.no_grad():
        atomic.out_bias.copy_(torch.randn(atomic.out_bias.shape, generator=gen, dtype=F64))
        atomic.out_std.copy_(0.5 + torch.rand(atomic.out_std.shape, generator=gen, dtype=F64))

    captured = {}
    descriptor = atomic.descriptor
    forward_with_edges = descriptor.forward_with_edges

    def capture_descriptor(*args, **kwargs):
        out = forward_with_edges(*args, **kwargs)
        captured["descriptor"] = out[0]
        captured["edge_mask_raw"] = kwargs["edge_mask"]
        return out

    descriptor.forward_with_edges = capture_descriptor
    if model.inter_potential is not None:

        def capture_zbl(module, args, kwargs, out):
            for key in ("edge_vec", "edge_index", "edge_mask"):
                captured[f"zbl_{key}"] = kwargs[key]

        model.inter_potential.register_forward_hook(capture_zbl, with_kwargs=True)

    coord = 3.0 * torch.rand(NF, NLOC, 3, generator=gen, dtype=F64)
    coord[:, 1] = coord[:, 0] + torch.tensor([0.6, 0.1, 0.0], dtype=F64)  # a short O-H pair
    atype = torch.tensor([[0, 1, 2, 0, 1], [1, 0, 0, 2, -1]])  # one phantom atom
    out = model(coord, atype, box=None)
    keep = ("atom_energy", "energy") if "energy" in out else ("atom_band_prop", "band_prop")
    cfg = {"type_map": params["type_map"], **extra}
    data = {f"{name}/config": np.array(json.dumps(cfg))}
    state = {k: v for k, v in model.state_dict().items() if "descriptor" not in k}
    data.update(np_dict(f"{name}/state", state))
    data.update(np_dict(f"{name}/in", {"atype": atype, **captured}))
    data.update(np_dict(f"{name}/out", {k: out[k] for k in keep}))
    return data


def zbl_fixture() -> dict:
    gen = torch.Generator().manual_seed(7)
    pot = InnerPotential(type_map=["O", "H", "C"])
    n_node, n_pair = 6, 9
    atype = torch.tensor([0, 0, 1, 1, 2, 1])
    pairs = torch.randint(0, n_node, (2, n_pair), generator=gen)
    pairs = pairs[:, pairs[0] != pairs[1]]
    pairs = torch.cat([pairs, torch.tensor([[0, 2], [1, 3], [2, 3]]).T], dim=1)  # O-O O-H H-H
    vec = torch.randn(pairs.shape[1], 3, generator=gen, dtype=F64)
    vec = (
        vec
        / vec.norm(dim=-1, keepdim=True)
        * (0.3 + 2.5 * torch.rand(len(vec), 1, generator=gen, dtype=F64))
    )
    vec[-1] = vec[-1] / vec[-1].norm() * 0.05  # tiny distance
    edge_index = torch.cat([pairs, pairs.flip(0)], dim=1)  # both directions
    edge_vec = torch.cat([vec, -vec], dim=0)
    edge_mask = torch.ones(edge_index.shape[1], dtype=torch.bool)
    edge_mask[0] = edge_mask[n_pair] = False  # two masked directed edges
    edge_index = torch.cat([edge_index, torch.zeros(2, 2, dtype=torch.long)], dim=1)  # padding
    edge_vec = torch.cat([edge_vec, torch.zeros(2, 3, dtype=F64)]).requires_grad_(True)
    edge_mask = torch.cat([edge_mask, torch.zeros(2, dtype=torch.bool)])
    energy = pot(edge_vec, edge_index, atype, edge_mask, n_node=n_node).view(n_node)
    (grad,) = torch.autograd.grad(energy.sum(), edge_vec)
    data = {"pairs/config": np.array(json.dumps({"type_map": ["O", "H", "C"]}))}
    data.update(np_dict("pairs/state", pot.state_dict()))
    data.update(
        np_dict(
            "pairs/in",
            {
                "edge_vec": edge_vec,
                "edge_index": edge_index,
                "atype": atype,
                "edge_mask": edge_mask,
            },
        )
    )
    data["pairs/out"] = energy.detach().numpy()
    data["pairs/grad/edge_vec"] = grad.numpy()
    return data


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "fit_energy.npz", **energy_fixtures())
    np.savez_compressed(OUT / "fit_property.npz", **property_fixtures())
    model_data = {}
    for i, (name, extra) in enumerate(MODEL_CASES.items()):
        model_data.update(model_case(name, extra, 300 + i))
    np.savez_compressed(OUT / "fit_model.npz", **model_data)
    np.savez_compressed(OUT / "zbl_pairs.npz", **zbl_fixture())


if __name__ == "__main__":
    main()
