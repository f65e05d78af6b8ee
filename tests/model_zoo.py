"""Tiny float64 DPA4 energy models over a spread of options, shared by the physics, streaming
and convolution tests: every parameter perturbed by ``0.1 N(0, 1)`` so that zero-initialised
branches take part."""

from __future__ import annotations

from functools import cache

import torch

from sezm.config import normalize_model
from sezm.model.build import build_model

RCUT = 3.5
ZBL = {"bridging_method": "ZBL", "bridging_r_inner": 0.5, "bridging_r_outer": 0.8}

# name -> (descriptor overrides, model-section overrides)
COMBOS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "attn_heads2_no_edge_norm": ({"edge_norm": False, "n_atten_head": 2}, {}),
    "no_attention": ({"n_atten_head": 0}, {}),
    "no_env_seed": ({"use_env_seed": False}, {}),
    "cartesian": ({"edge_cartesian": True, "node_cartesian": "default:1"}, {}),
    "extra_node_l": ({"extra_node_l": 1, "l_schedule": [2, 1]}, {}),
    "s2_e3nn_grids": (
        {
            "s2_activation": [True, True],
            "lebedev_quadrature": False,
            "node_wise_s2": True,
            "message_node_s2": True,
        },
        {},
    ),
    "so3_grids": (
        {
            "ffn_so3_grid": True,
            "message_node_so3": True,
            "so3_readout": "mlp",
            "grid_branch": [0, 0, 2],
            "readout_layers": 2,
        },
        {},
    ),
    "node_wise_so3": ({"node_wise_so3": True, "kmax": 2, "grid_mlp": True}, {}),
    "full_attn_res": (
        {"full_attn_res": "dependent", "layer_scale": True, "sandwich_norm": [True] * 4},
        {},
    ),
    "zbl": ({}, ZBL),
    "focus": ({"channels": 16, "n_focus": 2, "focus_dim": 8, "n_atten_head": 2}, {}),
    "radial_degree": ({"radial_so2_mode": "degree", "so2_norm": True}, {}),
    "exclude": (
        {"exclude_types": [[1, 1]]},
        {"pair_exclude_types": [[1, 1]], "atom_exclude_types": [1]},
    ),
}


def make_model(descriptor: dict, model: dict | None = None, seed: int = 0):
    """Tiny float64 energy model with every floating parameter perturbed by ``0.1 N(0,1)``."""
    desc = {
        "rcut": RCUT,
        "channels": 8,
        "n_radial": 4,
        "lmax": 2,
        "n_blocks": 2,
        "mixing_layers": 2,
        "precision": "float64",
        "use_amp": False,
        "seed": 1,
        **descriptor,
    }
    raw = {
        "type": "dpa4",
        "type_map": ["O", "H"],
        "descriptor": desc,
        "fitting_net": {"neuron": [8], "precision": "float64", "seed": 1},
        **(model or {}),
    }
    net = build_model(normalize_model(raw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            assert p.dtype == torch.float64, f"{name} is {p.dtype} in a float64 model"
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for name, b in net.named_buffers():
        assert not b.is_floating_point() or b.dtype == torch.float64, f"buffer {name} is {b.dtype}"
    return net.eval()


@cache
def model_of(combo: str):
    """The perturbed model of option set ``combo`` (built once)."""
    return make_model(*COMBOS[combo])
