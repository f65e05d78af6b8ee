"""Cartesian tensor products and depth attention residuals: parity with DeePMD-kit fixtures
(``tests/module_fixtures/make_cartesian_attn_res.py``) and symmetry checks."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sezm.geometry.edge_frame import rotation_matrix
from sezm.geometry.layout import degree_of_rows
from sezm.geometry.wigner import WignerD
from sezm.nn.attn_res import (
    DepthAttnRes,
    attn_res_blocks,
    attn_res_stack,
    block_attn_res_units,
    depth_attn_res,
    full_attn_res_units,
    residual_units,
)
from sezm.nn.cartesian import (
    EdgeCartesianTensorProduct,
    NodeCartesianTensorProduct,
    cartesian_basis,
    cartesian_message,
    parse_node_cartesian,
)
from sezm.nn.linear import ChannelLinear, SO3Linear
from sezm.nn.norm import ScalarRMSNorm

DATA = Path(__file__).parent / "data" / "modules"
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


class CartesianConv(nn.Module):
    """An ``edge_cartesian`` SO(2) convolution without attention, wired as the fixture's."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        lmax, c, f = cfg["lmax"], cfg["channels"], cfg["n_focus"]
        cf = cfg["focus_dim"] or c
        bias = cfg["mlp_bias"]
        self.pre_focus_mix = SO3Linear(lmax, c, f * cf, dtype=F64, mlp_bias=bias)
        self.post_focus_mix = SO3Linear(lmax, f * cf, c, dtype=F64, mlp_bias=bias)
        self.edge_cartesian_tp = EdgeCartesianTensorProduct(
            lmax=lmax,
            focus_dim=cf,
            n_focus=f,
            n_layers=cfg["mixing_layers"],
            mlp_bias=bias,
            dtype=F64,
        )
        spec = parse_node_cartesian(cfg["node_cartesian"])
        self.node_cartesian_tp = None
        if spec.enabled:
            self.node_cartesian_tp = NodeCartesianTensorProduct(
                lmax=lmax,
                focus_dim=cf,
                n_focus=f,
                n_layers=spec.n_layers,
                symmetric=spec.symmetric,
                mlp_bias=bias,
                dtype=F64,
            )
        self.radial_hidden_proj = (
            ChannelLinear(c, f * cf, dtype=F64, bias=False) if f * cf != c else None
        )
        self.n_focus = f
        if f > 1:
            self.focus_compete_norm = ScalarRMSNorm(cf, n_focus=f, eps=1e-7, dtype=F64)
            self.adamw_focus_compete_w = nn.Parameter(torch.zeros(cf, f, dtype=F64))
            self.focus_compete_bias = nn.Parameter(torch.zeros(f, dtype=F64)) if bias else None

    def focus_alpha(self, gate_src: torch.Tensor) -> torch.Tensor:  # (E, F, Cf) -> (E, F)
        logits = torch.einsum(
            "efi,if->ef", self.focus_compete_norm(gate_src), self.adamw_focus_compete_w
        )
        if self.focus_compete_bias is not None:
            logits = logits + self.focus_compete_bias
        return torch.softmax(logits, dim=1) * 0.98 + 0.02 / self.n_focus

    def forward(self, x, src, dst, edge_vec, edge_env, inv_sqrt_deg, radial, **_):
        x = self.pre_focus_mix(x[:, :, None]).squeeze(2)  # (N, D, C_wide)
        message, _ = cartesian_message(
            self.edge_cartesian_tp,
            x,
            src,
            edge_vec,
            radial,
            radial_proj=self.radial_hidden_proj,
            focus_alpha=self.focus_alpha if self.n_focus > 1 else None,
        )
        out = x.new_zeros(x.shape).index_add(0, dst, message * edge_env[:, :, None])
        out = out * inv_sqrt_deg
        if self.node_cartesian_tp is not None:
            out = self.node_cartesian_tp(out, x)
        return self.post_focus_mix(out[:, :, None]).squeeze(2)


@params("cart_conv.npz")
def test_cartesian_convolution_wiring(cfg):
    conv = CartesianConv(cfg)
    check_parity("cart_conv.npz", cfg, conv, conv, ["x", "edge_vec", "radial"])


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
    parity = (-1.0) ** degree_of_rows(lmax).to(F64)[:, None]
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


def test_attn_res_stack_matches_residual_stack_at_uniform_limit():
    """With one layer the average is over a single source: the plain residual stack."""
    attns = [depth_attn_res("independent", 4, dtype=F64)]
    w = torch.randn(4, 4, dtype=F64)
    x = torch.randn(3, 4, 1, 4, dtype=F64)
    torch.testing.assert_close(attn_res_stack(x, [unit(w)], attns), residual_units(x, [unit(w)]))


def unit(w: torch.Tensor):
    return lambda x: torch.tanh(x @ w) + 0.1 * x


class AttnResDescriptor(nn.Module):
    """Blocks of stand-in units with the descriptor's attention-residual module names."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg, mode = cfg, cfg["mode"]
        n_units = cfg["ffn_blocks"] + 1

        def make():
            kw = dict(eps=1e-7, bias=cfg["bias"], dtype=F64)
            return depth_attn_res(cfg["query"] if mode != "none" else "none", cfg["channels"], **kw)

        self.blocks = nn.ModuleList()
        for _ in cfg["node_dims"]:
            block = nn.Module()
            if mode != "none":
                setattr(block, f"{mode}_attn_res_so2", make())
                setattr(
                    block,
                    f"{mode}_attn_res_ffns",
                    nn.ModuleList(make() for _ in range(n_units - 1)),
                )
            self.blocks.append(block)
        if mode != "none":
            setattr(self, f"final_{mode}_attn_res", make())

    def forward(self, x, units0, units1, units2, **_):
        cfg, mode = self.cfg, self.cfg["mode"]
        weights = [units0, units1, units2]
        units = [[unit(w) for w in ws] for ws in weights]
        if mode == "none":
            for dim, us in zip(cfg["node_dims"], units, strict=True):
                x = residual_units(x[:, :dim], us)
            return x
        runner = full_attn_res_units if mode == "full" else block_attn_res_units

        def block_fn(i):
            blk = self.blocks[i]
            attns = [getattr(blk, f"{mode}_attn_res_so2"), *getattr(blk, f"{mode}_attn_res_ffns")]

            def run(x, history):
                out, new = runner(x, history, units[i], attns)
                return out, new if mode == "full" else [new]

            return run

        blocks = [block_fn(i) for i in range(len(self.blocks))]
        final = getattr(self, f"final_{mode}_attn_res")
        return attn_res_blocks(x, blocks, cfg["node_dims"], final, cfg["readout_dim"])


@params("attnres_blocks.npz")
def test_attn_res_blocks_parity(cfg):
    model = AttnResDescriptor(cfg)
    check_parity("attnres_blocks.npz", cfg, model, model, ["x"])
