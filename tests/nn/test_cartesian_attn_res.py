"""Cartesian tensor products and depth attention residuals: parity with DeePMD-kit fixtures
(``tests/module_fixtures/make_cartesian_attn_res.py``) and symmetry checks."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from equivariance import parity_signs, rotation_matrix
from torch import nn

from sezm.config import normalize_model
from sezm.config.descriptor_options import parse_node_cartesian
from sezm.geometry.wigner import WignerD
from sezm.model.build import build_model
from sezm.model.descriptor import Descriptor
from sezm.nn.attn_res import DepthAttnRes, depth_attn_res
from sezm.nn.cartesian import (
    EdgeCartesianTensorProduct,
    NodeCartesianTensorProduct,
    cartesian_basis,
)
from sezm.nn.edge_cache import EdgeCache

DATA = Path(__file__).parents[1] / "data" / "modules"
F64 = torch.float64
TOL = 1e-10


@cache
def fixture(fname: str):
    z = np.load(DATA / fname)
    return {k: z[k] for k in z.files}


def configs(fname: str) -> list[dict]:
    return json.loads(str(fixture(fname)["configs"]))


def section(fname: str, name: str, kind: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}/{kind}/"
    z = fixture(fname)
    return {k[len(prefix) :]: torch.from_numpy(z[k]) for k in z if k.startswith(prefix)}


def params(fname: str):
    return pytest.mark.parametrize("cfg", configs(fname), ids=lambda c: c["name"])


def check_parity(fname: str, cfg: dict, module: nn.Module, run, grad_keys) -> None:
    """Load the state strictly, run on the stored inputs, compare outputs and input gradients."""
    name = cfg["name"]
    module.load_state_dict(section(fname, name, "state"), strict=True)
    inputs = section(fname, name, "in")
    cots = {k[4:]: inputs.pop(k) for k in list(inputs) if k.startswith("cot_")}
    for k in grad_keys:
        inputs[k].requires_grad_(True)
    out = run(**inputs)
    outs = out if isinstance(out, dict) else {"y": out}
    want = section(fname, name, "out")
    assert outs.keys() == want.keys()
    loss = sum((v * cots[k]).sum() for k, v in outs.items())
    leaves = [inputs[k] for k in grad_keys]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    for k, v in outs.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=TOL)
    want_grad = section(fname, name, "grad")
    for k, g in zip(grad_keys, grads, strict=True):
        g = torch.zeros_like(inputs[k]) if g is None else g
        torch.testing.assert_close(g, want_grad[k], rtol=0, atol=TOL, msg=f"grad {k}")


# --------------------------------------------------------------------------- Cartesian products


def edge_tp(cfg: dict) -> EdgeCartesianTensorProduct:
    keys = ("lmax", "focus_dim", "n_focus", "n_layers", "activation_function", "mlp_bias", "eps")
    return EdgeCartesianTensorProduct(**{k: cfg[k] for k in keys}, dtype=F64)


def node_tp(cfg: dict, **kw) -> NodeCartesianTensorProduct:
    keys = ("lmax", "focus_dim", "n_focus", "n_layers", "symmetric", "activation_function")
    return NodeCartesianTensorProduct(**{k: cfg[k] for k in keys}, **kw, dtype=F64)


@params("cart_edge.npz")
def test_edge_product_parity(cfg):
    tp = edge_tp(cfg)
    check_parity("cart_edge.npz", cfg, tp, tp, ["x", "edge_vec", "rad_feat"])


@params("cart_node.npz")
def test_node_product_parity(cfg):
    tp = node_tp(cfg, mlp_bias=cfg["mlp_bias"])
    assert parse_node_cartesian(cfg["spec"]) == (True, cfg["symmetric"], cfg["n_layers"])
    check_parity("cart_node.npz", cfg, tp, tp, ["message", "node"])


def test_node_cartesian_spec():
    (spec,) = configs("cart_spec.npz")
    for text, want in zip(spec["good"], spec["parsed"], strict=True):
        assert list(parse_node_cartesian(text)) == want, text
    for text in spec["bad"]:
        with pytest.raises(ValueError):
            parse_node_cartesian(text)


def conv_descriptor(**descriptor) -> Descriptor:
    """A float64 one-type descriptor built through the public path (schema -> ``build_model``)."""
    desc = {"type": "dpa4", "rcut": 3.0, "n_radial": 4, "precision": "float64", **descriptor}
    raw = {"type_map": ["O"], "descriptor": desc, "fitting_net": {"neuron": [4]}}
    return build_model(normalize_model(raw)).descriptor


def edge_cache(src, dst, edge_vec, edge_env, inv_sqrt_deg) -> EdgeCache:
    """Edges with given envelopes and degree norms (the fixtures draw them at random); the
    radial basis and frames are left empty: the Cartesian path and stand-in units never read them."""
    n_edge = src.shape[0]
    return EdgeCache(
        src=src,
        dst=dst,
        n_nodes=inv_sqrt_deg.shape[0],
        keep=torch.ones(n_edge, 1, dtype=F64),
        vec=edge_vec,
        env=edge_env,
        rbf=torch.zeros(n_edge, 0, dtype=F64),
        quat=torch.zeros(n_edge, 4, dtype=F64),
        inv_sqrt_deg=inv_sqrt_deg,
    )


def cartesian_conv(cfg: dict) -> nn.Module:
    """The production ``edge_cartesian`` SO(2) convolution of a one-block descriptor."""
    keys = ("lmax", "mixing_layers", "n_focus", "focus_dim", "node_cartesian", "mlp_bias")
    desc = conv_descriptor(
        **{k: cfg[k] for k in keys},
        channels=cfg["channels"],
        activation_function=cfg["activation_function"],
        eps=cfg["eps"],
        n_blocks=1,
        edge_cartesian=True,
        n_atten_head=0,
        edge_norm=True,  # the fixture's focus competition normalises its scalars
    )
    return desc.blocks[0].so2_conv


@params("cart_conv.npz")
def test_cartesian_convolution_wiring(cfg):
    conv = cartesian_conv(cfg)
    assert conv.edge_cartesian_tp is not None

    def run(x, src, dst, edge_vec, edge_env, inv_sqrt_deg, radial):
        return conv(x, edge_cache(src, dst, edge_vec, edge_env, inv_sqrt_deg), radial)

    check_parity("cart_conv.npz", cfg, conv, run, ["x", "edge_vec", "radial"])


# --------------------------------------------------------------------------- symmetry


def random_rotation(seed: int, lmax: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, dtype=F64, generator=g)
    q = q / q.norm()
    return rotation_matrix(q)[0], WignerD(lmax, dtype=F64)(q)[0]


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, dtype=p.dtype, generator=g))
    return module


@pytest.mark.parametrize("lmax", [1, 2])
def test_basis_intertwines_wigner(lmax):
    basis = cartesian_basis(lmax)
    d = basis.shape[0]
    torch.testing.assert_close(torch.einsum("pij,qij->pq", basis, basis), torch.eye(d, dtype=F64))
    rot, wigner = random_rotation(7, lmax)
    lhs = rot @ basis @ rot.T  # R B_d R^T
    rhs = torch.einsum("nd,nij->dij", wigner, basis)  # sum_n D_nd B_n
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lmax,n_layers", [(1, 0), (1, 2), (2, 0), (2, 3)])
def test_edge_product_equivariant(lmax, n_layers):
    tp = perturbed(
        EdgeCartesianTensorProduct(
            lmax=lmax, focus_dim=3, n_focus=2, n_layers=n_layers, mlp_bias=True, dtype=F64
        )
    )
    g = torch.Generator().manual_seed(1)
    d = (lmax + 1) ** 2
    x, vec = torch.randn(6, d, 6, dtype=F64, generator=g), torch.randn(6, 3, dtype=F64, generator=g)
    rad = torch.randn(6, lmax + 1, 6, dtype=F64, generator=g)
    rot, wigner = random_rotation(3, lmax)
    rotated = tp(wigner @ x, vec @ rot.T, rad)
    torch.testing.assert_close(rotated, wigner @ tp(x, vec, rad), rtol=0, atol=1e-12)


@pytest.mark.parametrize("lmax,symmetric", [(1, False), (1, True), (2, False), (2, True)])
def test_node_product_equivariant(lmax, symmetric):
    tp = perturbed(
        NodeCartesianTensorProduct(
            lmax=lmax,
            focus_dim=2,
            n_focus=2,
            n_layers=2,
            symmetric=symmetric,
            mlp_bias=True,
            dtype=F64,
        )
    )
    g = torch.Generator().manual_seed(2)
    d = (lmax + 1) ** 2
    msg, node = torch.randn(2, 5, d, 4, dtype=F64, generator=g)
    _, wigner = random_rotation(4, lmax)
    torch.testing.assert_close(
        tp(wigner @ msg, wigner @ node), wigner @ tp(msg, node), rtol=0, atol=1e-12
    )
    # inversion: degree l picks up (-1)^l; only the symmetrised product respects it
    parity = parity_signs(lmax)[:, None]
    flipped, want = tp(parity * msg, parity * node), parity * tp(msg, node)
    assert torch.allclose(flipped, want, atol=1e-12) == symmetric


# --------------------------------------------------------------------------- attention residuals


@params("attnres_module.npz")
def test_depth_attn_res_parity(cfg):
    attn = DepthAttnRes(
        channels=cfg["channels"],
        input_dependent=cfg["input_dependent"],
        eps=cfg["eps"],
        bias=cfg["bias"],
        dtype=F64,
        layout=cfg["layout"],
    )
    n_src = sum(k.startswith("s") for k in section("attnres_module.npz", cfg["name"], "in"))
    keys = [f"s{i}" for i in range(n_src)]

    def run(current, **inputs):
        return attn([inputs[k] for k in keys], current)

    check_parity("attnres_module.npz", cfg, attn, run, [*keys, "current"])


def test_depth_attn_res_starts_uniform():
    attn = depth_attn_res("dependent", 6, dtype=F64, layout="so2")
    sources = list(torch.randn(4, 2, 5, 3, 3, dtype=F64))  # (F, E, D_m, C)
    torch.testing.assert_close(attn(sources, sources[0]), sum(sources) / 4)
    assert depth_attn_res("none", 3, dtype=F64) is None


def test_depth_attn_res_scalar_extractor_override():
    """Edge-major sources with an explicit extractor == the ``so2`` layout on ``(F, E, D_m, C)``."""
    attn = perturbed(depth_attn_res("dependent", 6, dtype=F64, layout="so2"))
    sources = list(torch.randn(3, 2, 5, 4, 3, dtype=F64))  # (F, E, D_m, C)
    current = torch.randn(2, 5, 4, 3, dtype=F64)
    edge_major = attn(
        sources=[v.transpose(0, 1) for v in sources],
        current_x=current.transpose(0, 1),
        scalar_extractor=lambda v: v[:, :, 0].reshape(v.shape[0], -1),
    )
    torch.testing.assert_close(edge_major.transpose(0, 1), attn(sources, current))


def unit(w: torch.Tensor):
    return lambda x: torch.tanh(x @ w) + 0.1 * x


def stand_in_descriptor(cfg: dict, weights: list[torch.Tensor]) -> Descriptor:
    """The production descriptor of the fixture's degree pyramid, its units replaced by
    ``tanh(x W) + 0.1 x``: what remains is the residual / depth-attention wiring."""
    mode, query = cfg["mode"], cfg["query"]
    lmax = [math.isqrt(dim) - 1 for dim in cfg["node_dims"]]
    desc = conv_descriptor(
        channels=cfg["channels"],
        l_schedule=lmax,
        ffn_blocks=cfg["ffn_blocks"],
        mlp_bias=cfg["bias"],
        full_attn_res=query if mode == "full" else "none",
        block_attn_res=query if mode == "block" else "none",
    )
    for block, ws in zip(desc.blocks, weights, strict=True):
        units = [unit(w) for w in ws]
        block.so2_unit = lambda x, edges, radial, f=units[0]: f(x)
        block.ffn_unit = lambda x, k, chunks=None, fs=units[1:]: fs[k](x)
    return desc


def load_attention(desc: Descriptor, state: dict[str, torch.Tensor]) -> None:
    """Load the fixture's depth-attention weights; every attention weight must be among them."""
    missing, unexpected = desc.load_state_dict(state, strict=False)
    assert not unexpected
    assert not [k for k in missing if "attn_res" in k]


# DeePMD-kit's blocks may hold no FFN; sezm's schema asks for at least one.
BLOCK_CONFIGS = [c for c in configs("attnres_blocks.npz") if c["ffn_blocks"] > 0]


@pytest.mark.parametrize("cfg", BLOCK_CONFIGS, ids=lambda c: c["name"])
def test_attn_res_blocks_parity(cfg):
    """``Descriptor`` blocks with plain, ``full`` and ``block`` depth-attention residuals."""
    fname, name = "attnres_blocks.npz", cfg["name"]
    inputs = section(fname, name, "in")
    weights = [inputs[f"units{i}"] for i in range(len(cfg["node_dims"]))]
    desc = stand_in_descriptor(cfg, weights)
    if cfg["mode"] != "none":
        load_attention(desc, section(fname, name, "state"))
    x = inputs["x"].requires_grad_(True)
    n_edge = 2
    edges = edge_cache(
        torch.zeros(n_edge, dtype=torch.long),
        torch.zeros(n_edge, dtype=torch.long),
        torch.ones(n_edge, 3, dtype=F64),
        torch.ones(n_edge, 1, dtype=F64),
        torch.ones(x.shape[0], 1, 1, dtype=F64),
    )
    radial = torch.zeros(n_edge, 3, cfg["channels"], dtype=F64)
    want = section(fname, name, "out")["y"]
    # the reference reads out the l = 0 row only; sezm keeps the read-out degree's rows
    y = desc._run_blocks(x, edges, radial)[:, : want.shape[1]]
    (grad,) = torch.autograd.grad((y * inputs["cot_y"]).sum(), x)
    torch.testing.assert_close(y, want, rtol=0, atol=TOL)
    torch.testing.assert_close(grad, section(fname, name, "grad")["x"], rtol=0, atol=TOL)
